"""The first region pass of backend "fxdp": activation-checkpointed bodies inlined into the region.

``torch.utils.checkpoint`` (and HF ``gradient_checkpointing_enable``) reaches a dynamo region as a
``tag_activation_checkpoint`` call of a body graph. Parameter uses inside it must be tapped like any
other, so the body's nodes replace the call: gradients stay exact, but the checkpointed activations are
kept instead of recomputed (warned). The eager path replays the recomputation instead
(:mod:`fxdp.engine.checkpointing`).
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from fxdp.analysis.runner import PassResult
from fxdp.core.errors import UncoveredParameterError


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace a higher-order call ``hop(body, *operands)`` by the nodes of ``body``."""
    body = getattr(gm, node.args[0].target)
    env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], node.args[1:]))
    g = gm.graph
    outputs = None
    with g.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = fx.node.map_arg(inner.args[0], lambda a: env[a])
                continue
            if inner.op == "get_attr":
                raise UncoveredParameterError("fxdp backend: a checkpointed body reads a module attribute; "
                                              "fxdp cannot inline it.")
            new = g.node_copy(inner, lambda a: env[a])
            env[inner] = new
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outputs[user.args[1]])
            g.erase_node(user)
        else:
            raise UncoveredParameterError("fxdp backend: a checkpointed region's result is used as a whole; "
                                          "fxdp cannot inline it.")
    getter = node.args[0]
    g.erase_node(node)
    if not getter.users:
        g.erase_node(getter)


def inline_checkpoints(region) -> PassResult:
    """Activation checkpointing (``torch.utils.checkpoint`` / HF ``gradient_checkpointing_enable``) reaches a
    region as a ``tag_activation_checkpoint`` call of a body graph (reentrant ones too). Parameter uses inside
    it must be tapped like any other, so the body is inlined: exact, but its activations are kept, not
    recomputed (warned; the eager path replays the recomputation instead, :mod:`fxdp.engine.checkpointing`)."""
    hops = [n for n in region.gm.graph.nodes if n.op == "call_function"
            and n.target is getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)]
    if not hops:
        return PassResult(region, False)
    params = {id(v) for v in region.example_inputs if isinstance(v, torch.nn.Parameter) and v.requires_grad}
    if not params:
        return PassResult(region, False)
    for node in hops:
        _inline(region.gm, node)
    warnings.warn("fxdp backend: activation checkpointing inside a compiled region is inlined -- gradients are "
                  "exact, but the checkpointed activations are kept instead of recomputed (no memory saving). "
                  "Eager fxdp.privatize (without torch.compile) recomputes them.", UserWarning, stacklevel=2)
    return PassResult(region, True)
