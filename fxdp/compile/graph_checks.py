"""Sample mixing inside compiled graphs: the eager structural check, run on every graph backend "fxdp" compiles.

Eager training forwards run under :class:`~fxdp.analysis.mixing_monitor.MixingMonitor`, which follows
every tensor derived from the batch through the ops that actually ran, with where its batch dimension is,
and refuses an op that reduces, indexes, reorders, contracts or normalises across it. Under
``torch.compile`` no Python op of the forward runs eagerly, so the monitor cannot watch the forward;
instead :func:`check_graph_mixing` (called by the backend for every region) runs each captured fx graph once, on copies of its
example inputs (RNG forked), under the same monitor -- the same rule table
(:mod:`fxdp.analysis.batch_dims`, :mod:`fxdp.analysis.batch_layers`), the same refusals
(:class:`~fxdp.core.errors.SampleMixingError` naming the op) -- before the graph is rewritten or handed
to the inner compiler.

Every graph dynamo makes is checked: a Python branch on the batch size (``if x.shape[0] > 3``) or on a
module attribute (``if self.mixup``) is a guard, and a forward that takes the other branch is compiled
again into a new graph, which goes through this pass again. Graphs without trainable parameters (a
region before the first parameter use, split off by a graph break) are checked too, for the forward pass
open while they compile.

Where the batch is: the graph inputs that are the forward's own batched inputs (the tensors the engine
located the batch in when it opened the forward) carry their batch dimension; parameters and buffers of
the model carry none. Any other tensor input (an activation computed by eager code between two graph
breaks) is taken to carry the batch in its one dimension of the forward's batch size; with no such
dimension it is not tracked, with several its batch position is unknown (then only the full-reduction
refusal applies to it and what derives from it, as in eager mode). An op in the graph without a
batch-dimension rule that gets a tensor whose position is known is refused, as in eager mode
(:func:`fxdp.analysis.batch_dims.untracked`). A value mixed across the batch without
gradient (under no_grad, or before any parameter), which the eager monitor refuses where it later meets
per-sample values, is refused where it leaves the graph as one of its outputs: beyond a graph break
fxdp cannot follow it.

Limits: the check runs on the example inputs of the compile. A graph reused for another batch size
(dynamic shapes) was checked at the size it was compiled for; index arithmetic on the batch size that
mixes only at other sizes (``h[:4]`` with B = 4 at compile time) is not seen. The eager re-validation of
the call sequence (a forward whose sequence of mixing-relevant calls differs from the analysed one is
analysed again numerically) has no compiled counterpart: under compile each path is a separate graph and
is checked structurally here.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from fxdp.analysis.mixing_monitor import MixingMonitor
from fxdp.compile import graph_ops as C
from fxdp.compile.graph_ops import Capture
from fxdp.core.errors import SampleMixingError
from fxdp.engine.compiled_checks import register_tap_class

register_tap_class(Capture)  # its backward returns no parameter gradient (fxdp.engine.compiled_checks)


def open_context(example_inputs):
    """The compiled forward pass this graph is compiled in, and its engine: that of the model owning the
    graph's parameters, else the only one open (None when there is none, or several and no parameter)."""
    open_ = [(e.current_forward, e) for e in C.live_engines()
             if e.current_forward is not None and e.current_forward.compiled]
    ids = {id(v) for v in example_inputs if isinstance(v, torch.nn.Parameter)}
    owners = [(c, e) for c, e in open_ if any(id(p) in ids for p in e.model.parameters())]
    candidates = owners or open_
    return candidates[0] if len(candidates) == 1 else (None, None)


def _batch_dim(value, ctx, known, model_tensors):
    if id(value) in known:
        return known[id(value)], True
    if id(value) in model_tensors or not (value.is_floating_point() or value.is_complex()):
        return None, False
    dims = [d for d, n in enumerate(value.shape) if n == ctx.batch_size]
    if not dims:
        return None, False
    return (dims[0] if len(dims) == 1 else None), True


def _concrete(v):
    """A copy the graph can run on without leaving a trace: tensors other than parameters cloned, a
    symbolic size replaced by its value in this call."""
    if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
        return v.clone()
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
        return guarding_hint_or_throw(v)
    return v


def check_graph_mixing(gm, example_inputs) -> None:
    """Run a dynamo graph once under the structural mixing monitor; raises ``SampleMixingError``."""
    ctx, engine = open_context(example_inputs)
    if ctx is None or ctx.batch_size < 2:
        return
    known = {id(t): d for t, d in getattr(ctx, "batch_inputs", ())}
    model_tensors = {id(t) for t in engine.model.parameters()} | {id(t) for t in engine.model.buffers()}
    batch, dims = [], []
    inputs = []
    for value in example_inputs:
        copy = _concrete(value)
        inputs.append(copy)
        if isinstance(value, torch.Tensor):
            dim, tracked = _batch_dim(value, ctx, known, model_tensors)
            if tracked:
                batch.append(copy)
                dims.append(dim)
    if not batch:
        return
    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
            MixingMonitor(batch, ctx.batch_size, batch_dims=dims) as monitor:
        outputs = gm(*inputs)
    for t in tree_flatten(outputs)[0]:
        held = getattr(monitor.place(t), "message", None) if isinstance(t, torch.Tensor) else None
        if held is not None and (t.is_floating_point() or t.is_complex()):
            raise SampleMixingError(held + " (A value mixed across the batch without gradient leaves a compiled "
                                           "region here, where fxdp can no longer follow it.)")
