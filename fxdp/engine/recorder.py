"""The recorder of training forwards: routes each bound call through a tap, with
the batch layout the analysis found for its call site.

A call site is identified by its ordinal in the forward pass and checked by its
op name and parameter names; a site the analysis has not seen (data-dependent
control flow) is marked pending and resolved after the forward by the engine.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map

from fxdp.core.inputs import input_batch_dims
from fxdp.core.layout import BatchLayout, LayoutKind
from fxdp.engine.checkpointing import (checkpoint_virtual_refusal, current_region, lift_operand,
                                       no_grad_input_refusal, observe_forward_call, region_of, unique_tensors)
from fxdp.engine.tap import ForwardContext, LayerUse, TapFunction, link_virtual
from fxdp.rules.virtual import make_virtuals, virtual_binding


class LayoutTable:
    """Layouts (and lifts) of the call sites of one input structure, by ordinal."""

    def __init__(self, entries, signature=None):
        # call sequences (fxdp.analysis.mixing_monitor) known to behave as analysed
        self.validated_signatures = set() if signature is None else {signature}
        self.keys = [(e.op, e.param_names) for e in entries]
        self.rules = [e.rule for e in entries]
        self.layouts = [e.layout for e in entries]
        self.lifts = [e.lift for e in entries]
        self.input_layouts = [dict(e.input_layouts) for e in entries]
        self.virtual = [e.virtual for e in entries]

    def is_virtual(self, ordinal: int, op: str, param_names: tuple) -> bool:
        """Whether the call site at ``ordinal`` makes a virtual parameter (fxdp.rules.virtual)."""
        return ordinal < len(self.keys) and self.keys[ordinal][0] == op and self.virtual[ordinal] \
            and tuple(self.keys[ordinal][1]) == tuple(param_names)

    def lookup(self, ordinal: int, op: str, param_names: tuple):
        if ordinal < len(self.keys) and self.keys[ordinal] == (op, param_names):
            return self.layouts[ordinal], self.lifts[ordinal]
        return None, False

    def layout_of(self, ordinal: int, rule: str, param_names: tuple):
        """The layout at ``ordinal`` if the same rule binds the same parameters there (compiled
        sites: the op may be spelled differently in a dynamo graph than in eager Python)."""
        if self.matches(ordinal, rule, param_names):
            return self.layouts[ordinal]
        return None

    def matches(self, ordinal: int, rule: str, param_names: tuple) -> bool:
        return ordinal < len(self.keys) and self.keys[ordinal][1] == param_names and self.rules[ordinal] == rule

    def inputs_of(self, ordinal: int) -> dict:
        return self.input_layouts[ordinal] if ordinal < len(self.input_layouts) else {}


def batch_size_of(args, kwargs, batch_dim) -> int:
    return input_batch_dims(args, kwargs, batch_dim)[0]


def structure_key(model, args, kwargs, batch_size: int, batch_dim):
    _, leaves, dims = input_batch_dims(args, kwargs, batch_dim)
    _, spec = tree_flatten((args, kwargs))
    desc = []
    for t, d in zip(leaves, dims):
        if isinstance(t, torch.Tensor):
            desc.append(("T", t.dim(), str(t.dtype), d, str(t.device)))
        else:
            desc.append(("V", repr(t)[:80]))
    return (str(spec), tuple(desc), model.training)


def trivial_layout(t: Optional[torch.Tensor]) -> BatchLayout:
    """Layout for a batch of one sample when no analysis exists: dim 0 if it has
    size 1 (what conv and group norm need), else the whole tensor is the sample."""
    if t is not None and t.dim() > 0 and t.shape[0] == 1:
        return BatchLayout(LayoutKind.BATCH, 0)
    return BatchLayout(LayoutKind.WHOLE, 0)


def single_sample_layout(binding) -> BatchLayout:
    """Layout of a call of a batch of at most one sample (no analysis runs then); also gives
    per-input layouts to rules that take them. Shared by eager taps and compiled sites."""
    if "input_layouts" in binding.options:
        binding.options["input_layouts"] = {k: trivial_layout(v) for k, v in binding.saved.items()}
    return trivial_layout(binding.layout_source)


class RuntimeRecorder:
    """Routes bound calls of a training forward through taps (inside ``torch.utils.checkpoint`` regions:
    taps that the recomputation replays, :mod:`fxdp.engine.checkpointing`)."""

    replays_checkpoints = True

    def __init__(self, context: ForwardContext, table: Optional[LayoutTable], param_names=None):
        self.context = context
        self.table = table
        self.param_names = param_names if param_names is not None else {}
        self._reentrant = None  # the reentrant checkpoint region whose no-grad forward is running

    @contextlib.contextmanager
    def reentrant(self, owner):
        """Parameter uses in the no-grad forward of a reentrant checkpoint: reserved, not tapped."""
        old = self._reentrant
        self._reentrant = region_of(owner, self.param_names, reentrant=True)
        try:
            yield
        finally:
            self._reentrant = old

    def substitute(self, func, args, kwargs):
        return None

    def observe(self, func, args, kwargs, out):
        """Calls inside checkpoint regions: recorded for the replay (:func:`observe_forward_call`)."""
        observe_forward_call(func, args, kwargs, self.param_names, self._reentrant)

    def refuse(self, exc, func, args, kwargs, out=None):
        raise exc

    def virtual(self, call, interceptor):
        """At a call site the analysis found batch-free: a virtual parameter instead of a tap (linked to the
        tensors it is made from, :class:`fxdp.engine.tap.VirtualLink`)."""
        ctx = self.context
        if self.table is None:
            return None
        ordinal = self.next_ordinal()
        if self._reentrant is not None or current_region(self.param_names) is not None:
            if ordinal < len(self.table.virtual) and self.table.virtual[ordinal]:
                raise checkpoint_virtual_refusal(call)
            return None
        if ordinal >= len(self.table.virtual) or not self.table.virtual[ordinal] \
                or not self.table.is_virtual(ordinal, call.name, virtual_binding(call).param_names):
            return None
        out, made = make_virtuals(call, ordinal)
        if made is None:
            return None
        ctx.virtual_sites += 1
        if ctx.compiled:
            ctx.next_ordinal += 1
        # the value gets gradient edges to what it was made from (tap.VirtualLink), and the parameters among
        # those are named in ctx.params: a backward pass trains through it if it accumulates into them
        sources = [t for t in unique_tensors(call) if call.param_name(t)]
        made_names = {v.name for v in ctx.virtuals}
        for t in sources:
            if call.param_name(t) not in made_names:
                ctx.params.setdefault(call.param_name(t), t)
        linked = {}
        for u, v in made:
            w = linked[id(u)] = link_virtual(u, sources)
            interceptor.param_names[id(w)] = v.name
            interceptor.virtual_leaves.append(w)
            ctx.virtual_values.append(w)
            ctx.virtuals.append(v)
        return tree_map(lambda x: linked.get(id(x), x) if isinstance(x, torch.Tensor) else x, out)

    def next_ordinal(self) -> int:
        """The ordinal of the next call site. Under torch.compile (eager code between the compiled
        regions of a forward pass) the regions' counter is shared: ordinals follow program order."""
        ctx = self.context
        return ctx.next_ordinal if ctx.compiled else len(ctx.uses) + ctx.virtual_sites

    def _lookup(self, ordinal: int, op: str, binding):
        if self.context.compiled and self.table.matches(ordinal, binding.rule.name, binding.param_names):
            # eager code of a compiled forward: the op may be dynamo's spelling (a region's graph run eagerly)
            return self.table.layouts[ordinal], self.table.lifts[ordinal]
        return self.table.lookup(ordinal, op, binding.param_names)

    @torch._dynamo.disable
    def handle(self, call, binding):
        ctx = self.context
        ordinal = self.next_ordinal()
        if ctx.compiled:
            ctx.next_ordinal += 1
        B = ctx.batch_size
        layout, lift = self._lookup(ordinal, call.name, binding) if self.table is not None else (None, False)
        if layout is None:
            if B <= 1:
                layout = single_sample_layout(binding)
            else:
                ctx.pending_layouts = True
        elif "input_layouts" in binding.options:
            binding.options["input_layouts"] = self.table.inputs_of(ordinal)
        if self._reentrant is not None and not self._reentrant.inputs_require_grad:
            raise no_grad_input_refusal(binding.param_names)
        if lift:
            lift_operand(call, binding, B)
        use = LayerUse(ordinal, call.name, binding, layout, ctx)
        ctx.uses.append(use)
        if self._reentrant is not None:
            self._reentrant.add(use, lift)  # tapped when backward re-runs the region
            with torch.no_grad():
                out = call.func(*call.args, **call.kwargs)
            binding.layout_source, binding.saved = None, {}
            return out
        region = current_region(self.param_names)
        if region is not None:
            region.add(use, lift)
            use.checkpointed = True
        out = TapFunction.apply(use, call, *unique_tensors(call))
        # The use keeps detached copies only: a reference to a tensor with a grad_fn
        # would close a cycle through the autograd graph that Python cannot collect.
        binding.layout_source, binding.saved = None, {}
        return out
