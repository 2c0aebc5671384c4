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

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxdp.core.errors import PrivacyError
from fxdp.rules.base import Binding, OpCall
from fxdp.core.errors import PrivacyError
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
    params: Dict[str, Any] = field(default_factory=dict)
    # fxdp.privacy_units: the block this forward ran in, and the unit id of each row
    unit_scope: Any = None
    unit_ids: Any = None


def _rebuild(spec, leaves, replace: Dict[int, Any]):
    new = [replace.get(id(x), x) if isinstance(x, torch.Tensor) else x for x in leaves]
    args, kwargs = tree_unflatten(new, spec)
    return args, kwargs


class TapFunction(torch.autograd.Function):
    """Runs ``call.func`` with detached parameters and captures the output gradient."""

    @staticmethod
    def forward(ctx, use: LayerUse, call: OpCall, *tensors):
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
        ctx.out = out
        ctx.targets = targets
        ctx.broadcast_roles = list(broadcast_targets)
        ctx.broadcast_targets = list(broadcast_targets.values())
        ctx.slots = [next(i for i, x in enumerate(tensors) if x is s) for s in target_slots]
        ctx.n = len(tensors)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_output):
        use = ctx.use
        if ctx.out is None:
            raise PrivacyError(
                f"fxdp: backward reached {use.op} ({', '.join(use.binding.param_names)}) a second time, but its "
                "graph was freed by the first backward pass. Pass retain_graph=True to the first one.")
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        wanted = ctx.targets + ctx.broadcast_targets
        grads = ()
        if wanted and ctx.out.requires_grad:
            grads = torch.autograd.grad(ctx.out, wanted, grad_output, allow_unused=True, retain_graph=keep)
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
            ctx.out = None
        return (None, None, *input_grads)
