"""Inactive dropout applied to a (virtual) parameter inside a compiled region: the identity, as in eager mode.

DeBERTa-v2's ``pos_dropout(rel_embeddings)`` drops a parameter (or a batch-free transform of one) before it
meets the batch. Eager ``privatize`` (:func:`fxdp.analysis.interceptor.dropout_on_parameter`) returns the
input as is when that dropout is inactive (p = 0 or not training) and refuses it when active (one mask for
the whole batch, which per-sample gradients cannot replay). While a region is bound
(:func:`fxdp.compile.region.bind_call_sites`) the same interceptor runs each graph node, so an active one is
refused with the eager error, and an inactive one hands back its input tensor itself. That node is an
*alias* of its input: the readers of the dropout's result are bound as readers of the (virtual) parameter,
and :func:`remove_aliases` rewires them to the input node and erases the dropout node, so the graph has the
same parameter uses as the eager forward (and no untapped path from the parameter through the dropout).

Only a dropout inactive whatever the graph's inputs is taken as the identity: ``training`` a constant False,
or ``p`` a constant 0. Dynamo makes a float attribute a graph input once its value changes between calls
(``specialize_float`` is off by default: a second model of the class with another dropout rate); such a
dropout, inactive in the call being compiled, could be active when the graph is reused, and is refused at
compile time saying how to make p a constant.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.fx as fx

from fxdp.analysis.interceptor import DROPOUT_TRAINING_DEFAULT
from fxdp.core.errors import UncoveredParameterError
from fxdp.rules import func_name


def _argument(node: fx.Node, index: int, *names):
    if len(node.args) > index:
        return node.args[index]
    return next((node.kwargs[n] for n in names if n in node.kwargs), None)


def alias_source(node: fx.Node, result, env, param_nodes) -> Optional[fx.Node]:
    """The input node of ``node`` if it is a dropout on a (virtual) parameter node that returned that input
    itself (the interceptor's inactive dropout) and is inactive whatever the graph's inputs (``training`` a
    constant False, or ``p`` a constant 0), else None. Refused: such a dropout, inactive in this call, whose
    ``p`` dynamo made a symbolic input of the graph (see module docstring)."""
    if node.op != "call_function" or node.target not in DROPOUT_TRAINING_DEFAULT:
        return None
    source = _argument(node, 0, "input")
    if not isinstance(source, fx.Node) or source not in param_nodes or env.get(source) is not result:
        return None
    p, training = _argument(node, 1, "p"), _argument(node, 2, "training", "train")
    p_fixed, training_fixed = not isinstance(p, fx.Node), not isinstance(training, fx.Node)
    if training is False or p_fixed and (training_fixed or p is not None and float(p) == 0.0):
        return source
    raise UncoveredParameterError(
        f"fxdp backend: graph node {node.name} ({func_name(node.target)}) drops the parameter-only tensor "
        f"{source.name} before it meets the batch, with a p (or training flag) that dynamo made an input of the graph (its value "
        "changed between calls or between models of this class). Inactive in this call, it would be active when "
        "the graph is reused with another p, where fxdp refuses it (one mask for the whole batch, which "
        "per-sample gradients cannot replay). Set torch._dynamo.config.specialize_float = True (dynamo then "
        "compiles each p as a constant), keep that dropout's p fixed at 0, or use eager fxdp.privatize.")


def remove_aliases(gm: fx.GraphModule, aliases: Dict[fx.Node, fx.Node], sites) -> None:
    """Readers of each alias read its source instead (graph and bound sites alike); the alias node is erased."""
    def resolve(n):
        while n in aliases:
            n = aliases[n]
        return n

    for site in sites:
        site.inputs = {k: resolve(v) for k, v in site.inputs.items()}
        site.others = [resolve(o) for o in site.others]
    for alias in reversed(list(aliases)):  # a later alias may read an earlier one
        alias.replace_all_uses_with(resolve(alias))
        gm.graph.erase_node(alias)
