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

A rate that is a graph input: dynamo makes a float attribute a symbolic input once its value changed
between calls (``specialize_float`` is off by default: a sweep over models of one class with different
dropout rates). The graph, compiled where p = 0, may be reused with p > 0; the erased dropout is then
replaced by the ordered op ``fxdp::inactive_dropout(p, check)``, which refuses at run time, with the eager
error, a call where the dropout is active -- before any gradient is formed. A ``training`` flag that is a
graph input (dynamo specialises bools; not seen in practice) is refused at compile time.
"""
from __future__ import annotations

import itertools
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx

from fxdp.analysis.interceptor import DROPOUT_TRAINING_DEFAULT, dropout_on_parameter
from fxdp.core.errors import UncoveredParameterError
from fxdp.rules import func_name

_CHECKS: Dict[int, Tuple[object, Tuple[str, ...]]] = {}  # check id -> (dropout function, parameter names)
_ids = itertools.count(1)


def _argument(node: fx.Node, index: int, *names):
    if len(node.args) > index:
        return node.args[index]
    return next((node.kwargs[n] for n in names if n in node.kwargs), None)


def alias_source(node: fx.Node, result, env, param_nodes) -> Optional[fx.Node]:
    """The input node of ``node`` if it is a dropout on a (virtual) parameter node that returned that input
    itself (the interceptor's inactive dropout), else None. Refused: a ``training`` flag that is a graph
    input (see module docstring)."""
    if node.op != "call_function" or node.target not in DROPOUT_TRAINING_DEFAULT:
        return None
    source = _argument(node, 0, "input")
    if not isinstance(source, fx.Node) or source not in param_nodes or env.get(source) is not result:
        return None
    if isinstance(_argument(node, 2, "training", "train"), fx.Node):
        raise UncoveredParameterError(
            f"fxdp backend: graph node {node.name} ({func_name(node.target)}) drops the parameter-only tensor "
            f"{source.name} before it meets the batch, with a training flag that is an input of the graph; fxdp "
            "cannot tell whether the dropout is active when the graph is reused. Pass the module's training flag "
            "(a constant to dynamo), or use eager fxdp.privatize.")
    return source


def _symbolic_rate(node: fx.Node) -> Optional[fx.Node]:
    """The rate node of an alias whose dropout could be active when the graph is reused, else None."""
    p, training = _argument(node, 1, "p"), _argument(node, 2, "training", "train")
    if training is None:
        training = DROPOUT_TRAINING_DEFAULT[node.target]
    return p if training and isinstance(p, fx.Node) else None


def remove_aliases(gm: fx.GraphModule, aliases: Dict[fx.Node, fx.Node], sites, names: Dict[fx.Node, str]) -> None:
    """Readers of each alias read its source instead (graph and bound sites alike); the alias node is erased,
    and replaced by the run-time check of its rate where that is a graph input. ``names`` maps parameter and
    virtual-parameter nodes to their names (for the check's refusal)."""
    def resolve(n):
        while n in aliases:
            n = aliases[n]
        return n

    for site in sites:
        site.inputs = {k: resolve(v) for k, v in site.inputs.items()}
        site.others = [resolve(o) for o in site.others]
    for alias in reversed(list(aliases)):  # a later alias may read an earlier one
        rate = _symbolic_rate(alias)
        if rate is not None:
            uid = next(_ids)
            _CHECKS[uid] = (alias.target, (names.get(resolve(alias), resolve(alias).name),))
            with gm.graph.inserting_before(alias):
                gm.graph.call_function(torch.ops.fxdp.inactive_dropout.default, (rate, uid))
        alias.replace_all_uses_with(resolve(alias))
        gm.graph.erase_node(alias)


@torch.library.custom_op("fxdp::inactive_dropout", mutates_args=())
def inactive_dropout(p: float, check: int) -> None:
    """Run time: the eager refusal if the dropout erased at compile time (rate ``p`` now) is active."""
    func, names = _CHECKS[check]
    _, exc = dropout_on_parameter(func, (None, p, True), {}, names)
    if exc is not None:
        raise exc


@inactive_dropout.register_fake
def _inactive_dropout_fake(p, check):
    return None


torch.library._register_effectful_op(torch.ops.fxdp.inactive_dropout.default,
                                     torch._library.effects.EffectType.ORDERED)
