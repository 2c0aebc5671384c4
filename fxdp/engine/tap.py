"""Taps: the only place where the forward pass leaves something for the engine.

Every covered use of a trainable parameter runs through :class:`TapFunction`.
Its forward computes the original op with the parameters *detached*, inside a
small autograd subgraph, so that autograd never computes (nor accumulates) the
plain weight gradient -- the bookkeeping trick. Its backward stores the output
gradient on the :class:`LayerUse` record, returns the gradient of the op's
non-parameter inputs (via the subgraph) and tells the engine that a backward
pass is running, so the engine can finalize once at its end.

A graph kept with ``retain_graph=True`` can be traversed again (``autograd.grad``
for input gradients after ``backward``, a second ``backward``): the tap then
gives its input gradients as usual, and the engine adds nothing to the private
gradients, which the first pass through the forward has formed (see
``Engine.receive``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxdp.core.errors import PrivacyError
from fxdp.rules.base import Binding, OpCall
from fxdp.core.layout import BatchLayout


@dataclass(eq=False)
class LayerUse:
    """One use of trainable parameters at one op call, in one forward pass."""

    ordinal: int
    op: str
    binding: Binding
    layout: Optional[BatchLayout]
    context: "ForwardContext"
    saved: Dict[str, torch.Tensor] = field(default_factory=dict)
    grad_output: Optional[torch.Tensor] = None
    extra_grads: Dict[str, torch.Tensor] = field(default_factory=dict)
    versions: Dict[str, int] = field(default_factory=dict)
    received: bool = False  # its output gradient reached the engine (in the first backward pass through it)
    # inside a non-reentrant checkpoint: the tap keeps its operands as autograd saved tensors (recomputed
    # in backward by the checkpoint), not on this record (fxdp.engine.checkpointing)
    checkpointed: bool = False
    # made by a reentrant checkpoint's recomputation: the backward pass (graph task) it belongs to, the
    # outer one, not the nested backward the checkpoint runs
    backward_task: Optional[int] = None
    # its factors were computed when its gradients arrived, into its context's ``folded`` (fxdp.engine.fold)
    folded: bool = False

    @property
    def rule(self):
        return self.binding.rule


@dataclass(eq=False)
class ForwardContext:
    """The taps of one forward pass over one batch of ``batch_size`` samples."""

    batch_size: int
    engine_ref: Any  # weakref to the Engine: no strong cycle through the autograd graph
    key: Any = None  # the input structure the forward was analysed under
    uses: List[LayerUse] = field(default_factory=list)
    pending_layouts: bool = False
    finalized: bool = False
    # compiled forwards (backend "fxdp"): taps arrive from the graph, by call-site ordinal
    compiled: bool = False
    table: Any = None
    next_ordinal: int = 0
    cid: int = 0
    by_ordinal: Dict[int, LayerUse] = field(default_factory=dict)
    region_runs: List[Any] = field(default_factory=list)  # compiled region runs, by run index (token)
    batch_inputs: List[Any] = field(default_factory=list)  # (input tensor, batch dim), while the forward runs
    virtuals: List[Any] = field(default_factory=list)  # VirtualParam records (fxdp.rules.virtual), in order made
    virtual_sites: int = 0  # call sites that made virtual parameters (they take ordinals like taps)
    # the virtual values themselves, alive until the pass is finalized: their ids name them in the tables that
    # checkpoint regions copy, and a freed id reused by another tensor in a recomputation named it a parameter
    virtual_values: List[Any] = field(default_factory=list)
    params: Dict[str, Any] = field(default_factory=dict)
    # fxdp.privacy_units: the block this forward ran in, and the unit id of each row
    unit_scope: Any = None
    unit_ids: Any = None
    # factors of the uses folded in backward, per parameter, and their norm decisions (fxdp.engine.fold)
    folded: Dict[str, List[Any]] = field(default_factory=dict)
    decisions: Dict[str, str] = field(default_factory=dict)


def _rebuild(spec, leaves, replace: Dict[int, Any]):
    new = [replace.get(id(x), x) if isinstance(x, torch.Tensor) else x for x in leaves]
    args, kwargs = tree_unflatten(new, spec)
    return args, kwargs


class TapFunction(torch.autograd.Function):
    """Runs ``call.func`` with detached parameters and captures the output gradient."""

    @staticmethod
    def forward(ctx, use: LayerUse, call: OpCall, *tensors):
        if use.checkpointed:
            return _checkpointed_forward(ctx, use, call, tensors)
        binding = use.binding
        leaves, spec = tree_flatten((call.args, call.kwargs))
        replace: Dict[int, Any] = {}
        targets, target_slots, broadcast_targets = [], [], {}
        param_ids = {id(p) for p in binding.params.values()}
        with torch.enable_grad():
            for t in tensors:
                if id(t) in replace:
                    continue
                if id(t) in param_ids:
                    role = next(r for r, p in binding.params.items() if p is t)
                    if role in binding.broadcast:
                        d = t.detach().requires_grad_()
                        e = d.expand(binding.broadcast[role])
                        broadcast_targets[role] = e
                        replace[id(t)] = e
                    else:
                        replace[id(t)] = t.detach()
                elif t.requires_grad and (t.is_floating_point() or t.is_complex()):
                    d = t.detach().requires_grad_()
                    replace[id(t)] = d
                    targets.append(d)
                    target_slots.append(t)
                else:
                    replace[id(t)] = t.detach()
            args, kwargs = _rebuild(spec, leaves, replace)
            out = call.func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"fxdp: {use.op} returned {type(out).__name__}; taps expect one tensor.")
        use.saved = {k: v.detach() for k, v in binding.saved.items()}
        use.versions = {k: v._version for k, v in use.saved.items()}
        ctx.use = use
        # the subgraph's output edge, not the output: a tensor held here would outlive its last reader
        # (the logits, which the loss does not save, stayed alive to the end of backward)
        ctx.edge = torch.autograd.graph.get_gradient_edge(out) if out.requires_grad else None
        ctx.freed = False
        ctx.targets = targets
        ctx.broadcast_roles = list(broadcast_targets)
        ctx.broadcast_targets = list(broadcast_targets.values())
        ctx.slots = [next(i for i, x in enumerate(tensors) if x is s) for s in target_slots]
        ctx.n = len(tensors)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_output):
        use = ctx.use
        if use.checkpointed:
            return _checkpointed_backward(ctx, use, grad_output)
        if ctx.freed:
            raise PrivacyError(
                f"fxdp: backward reached {use.op} ({', '.join(use.binding.param_names)}) a second time, but its "
                "graph was freed by the first backward pass. Pass retain_graph=True to the first one.")
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        wanted = ctx.targets + ctx.broadcast_targets
        grads = ()
        if wanted and ctx.edge is not None:
            grads = torch.autograd.grad(ctx.edge, wanted, grad_output, allow_unused=True, retain_graph=keep)
        input_grads = [None] * ctx.n
        for slot, g in zip(ctx.slots, grads[: len(ctx.targets)]):
            input_grads[slot] = g
        extra = {}
        for role, g in zip(ctx.broadcast_roles, grads[len(ctx.targets):]):
            extra[role] = g if g is not None else torch.zeros_like(ctx.broadcast_targets[ctx.broadcast_roles.index(role)])
        engine = use.context.engine_ref()
        if engine is None:
            raise RuntimeError("fxdp: the privatized model was released before backward finished.")
        engine.receive(use, grad_output, extra)
        if not keep:
            ctx.edge, ctx.freed = None, True
        return (None, None, *input_grads)


class VirtualLink(torch.autograd.Function):
    """A virtual parameter's value (made on detached parameters, :mod:`fxdp.rules.virtual`), given gradient
    edges to the tensors it was made from -- trainable parameters or earlier virtual parameters -- through
    which no gradient passes (the taps where it meets the batch give it none, and this node gives its
    sources none: their private gradients come from the taps' factors, resolved at finalize).

    The edges make autograd run those taps whenever a backward pass accumulates into the sources:
    ``loss.backward(inputs=list(model.parameters()))`` or a subset naming the sources. A virtual parameter
    that was a fresh leaf was in no such ``inputs``, so the taps where it met the batch were skipped and its
    uses silently dropped from the sources' private gradients. A pass that reaches none of the sources
    (``torch.autograd.grad(loss, x)``) still does not run this node (:mod:`fxdp.engine.step_ledger`)."""

    @staticmethod
    def forward(ctx, value, *sources):
        ctx.set_materialize_grads(False)
        ctx.n = len(sources)
        return value

    @staticmethod
    def backward(ctx, grad):
        return (None,) * (1 + ctx.n)


def link_virtual(value: torch.Tensor, sources) -> torch.Tensor:
    """``value`` (a virtual parameter) as a tensor with gradient edges to ``sources`` (see :class:`VirtualLink`)."""
    return VirtualLink.apply(value.detach(), *sources)


# ------------------------------------------------------------------ inside a non-reentrant checkpoint
def _checkpointed_forward(ctx, use: LayerUse, call: OpCall, tensors):
    """The op on detached parameters, without a subgraph: its operands (and the rule's saved tensors) are
    autograd saved tensors, which the enclosing checkpoint drops after the forward and recomputes in
    backward -- the activation memory is saved as without fxdp. The recomputation re-runs this forward
    with the same calls (:mod:`fxdp.engine.checkpointing`), so the checkpoint finds the same tensors."""
    binding = use.binding
    leaves, spec = tree_flatten((call.args, call.kwargs))
    param_ids = {id(p) for p in binding.params.values()}
    slot_of = {id(t): i for i, t in enumerate(tensors)}
    params = {i: t for i, t in enumerate(tensors) if id(t) in param_ids}
    stored, index = [], {}
    for t in [t for i, t in enumerate(tensors) if i not in params] + list(binding.saved.values()):
        if id(t) not in index:
            index[id(t)] = len(stored)
            stored.append(t)
    ctx.save_for_backward(*stored)
    ctx.inputs = [(i, index[id(t)]) for i, t in enumerate(tensors) if i not in params]
    ctx.saved_keys = [(k, index[id(v)]) for k, v in binding.saved.items()]
    ctx.params = params
    ctx.roles = {slot_of[id(p)]: r for r, p in binding.params.items() if r in binding.broadcast}
    ctx.leaf_slots = [slot_of.get(id(x)) if isinstance(x, torch.Tensor) else None for x in leaves]
    ctx.leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    ctx.spec, ctx.func, ctx.use, ctx.n = spec, call.func, use, len(tensors)
    ctx.autocast = _autocast_state(tensors)
    with torch.no_grad():
        values = {i: t.detach() for i, t in enumerate(tensors)}
        for i, role in ctx.roles.items():
            values[i] = values[i].expand(binding.broadcast[role])
        out = _run(ctx, values)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fxdp: {use.op} returned {type(out).__name__}; taps expect one tensor.")
    use.saved, use.versions = {}, {}
    return out


def _autocast_state(tensors) -> list:
    """(device type, enabled, dtype) of autocast for the devices of ``tensors``: the op is run again in
    backward, where the forward's autocast is no longer active."""
    devices = sorted({t.device.type for t in tensors} | {"cpu"})
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices
            if torch.amp.is_autocast_available(d)]


def _run(ctx, values: Dict[int, torch.Tensor]):
    leaves = [values[s] if s is not None else x for s, x in zip(ctx.leaf_slots, ctx.leaves)]
    args, kwargs = tree_unflatten(leaves, ctx.spec)
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in getattr(ctx, "autocast", ()):
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        return ctx.func(*args, **kwargs)


def _checkpointed_backward(ctx, use: LayerUse, grad_output):
    """The saved operands (recomputed by the checkpoint) go to the use record; the op is run once more on
    them, in grad mode, for the gradients of its non-parameter inputs."""
    stored = ctx.saved_tensors
    use.saved = {k: stored[j].detach() for k, j in ctx.saved_keys}
    use.versions = {k: v._version for k, v in use.saved.items()}
    binding = use.binding
    values, targets, slots, broadcast = {}, [], [], []
    with torch.enable_grad():
        for i, p in ctx.params.items():
            if i in ctx.roles:
                d = p.detach().requires_grad_()
                broadcast.append((ctx.roles[i], d.expand(binding.broadcast[ctx.roles[i]])))
                values[i] = broadcast[-1][1]
            else:
                values[i] = p.detach()
        for i, j in ctx.inputs:
            t = stored[j]
            if ctx.needs_input_grad[2 + i] and (t.is_floating_point() or t.is_complex()):
                values[i] = t.detach().requires_grad_()
                targets.append(values[i])
                slots.append(i)
            else:
                values[i] = t.detach()
        wanted = targets + [e for _, e in broadcast]
        grads = ()
        if wanted:
            out = _run(ctx, values)
            if out.requires_grad:
                grads = torch.autograd.grad(out, wanted, grad_output, allow_unused=True)
    input_grads = [None] * ctx.n
    for slot, g in zip(slots, grads[: len(targets)]):
        input_grads[slot] = g
    extra = {}
    for k, (role, e) in enumerate(broadcast):
        g = grads[len(targets) + k] if len(grads) > len(targets) + k else None
        extra[role] = g if g is not None else torch.zeros_like(e)
    engine = use.context.engine_ref()
    if engine is None:
        raise RuntimeError("fxdp: the privatized model was released before backward finished.")
    engine.receive(use, grad_output, extra)
    return (None, None, *input_grads)
