"""The engine's side of compiled forward passes (backend "fxdp").

Under ``torch.compile(model, backend="fxdp")`` the model's hooks run outside
dynamo: :meth:`~fxdp.runtime.engine.Engine.before_forward` opens a forward
pass as in eager mode (batch size, the analysis of this input structure) but
pushes no interceptor -- the taps are in the graph (:mod:`fxdp.runtime.compiled`).
At run time each compiled region announces its call sites
(:meth:`CompiledForwards.enter_compiled_region`), and in backward every capture
arrives through :meth:`CompiledForwards.receive_compiled`, which builds the
same :class:`~fxdp.runtime.tap.LayerUse` records as the eager taps: from there
on both paths share one finalize. When the forward ends, a pass whose
parameter uses did not all come through compiled regions is refused.
"""
from __future__ import annotations

import itertools

import torch

from ..errors import BatchLayoutError, PrivacyError
from .compiled import OUTPUT_SLOT, CompiledSite
from .recorder import single_sample_layout
from .tap import ForwardContext, LayerUse

# Compiled forward passes kept for their backward; older ones are dropped (their backward then fails loudly).
MAX_COMPILED_FORWARDS = 64
_context_ids = itertools.count(1)


def in_compiled_module() -> bool:
    """True while ``torch.compile(model)`` runs: dynamo then traces the forward itself, and fxdp's
    taps come from the graph (backend "fxdp") instead of the eager interceptor."""
    try:
        from torch._dynamo.eval_frame import _is_in_optimized_module
    except ImportError:  # pragma: no cover - older torch
        return False
    return _is_in_optimized_module()


def _requires_grad(output) -> bool:
    from torch.utils._pytree import tree_flatten
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(output)[0])


class CompiledForwards:
    """Mixin of :class:`~fxdp.runtime.engine.Engine` (see module docstring)."""

    def _open_compiled(self, ctx: ForwardContext, table, leaves, dims):
        ctx.compiled, ctx.table, ctx.cid = True, table, next(_context_ids)
        ctx.batch_inputs = [(t, d) for t, d in zip(leaves, dims) if isinstance(t, torch.Tensor) and d is not None]
        ctx.params = dict(self.model.named_parameters())
        self._compiled[ctx.cid] = ctx
        while len(self._compiled) > MAX_COMPILED_FORWARDS:
            self._compiled.popitem(last=False)

    def _close_compiled(self, ctx: ForwardContext, output):
        ctx.batch_inputs = []
        expected = len(ctx.table.keys) if ctx.table is not None else None
        if ctx.next_ordinal == 0 and expected != 0 and _requires_grad(output):
            self._compiled.pop(ctx.cid, None)
            raise PrivacyError(
                "fxdp: the privatized model ran under torch.compile, but no compiled region reported its parameter "
                "uses: it was compiled with a backend other than \"fxdp\", so its gradients would not be clipped. "
                "Use torch.compile(model, backend=\"fxdp\").")
        if expected is not None and ctx.next_ordinal != expected:
            self._compiled.pop(ctx.cid, None)
            raise PrivacyError(
                f"fxdp: the analysis found {expected} parameter uses in this forward pass, but compiled regions "
                f"tapped {ctx.next_ordinal}; the others ran outside a compiled graph (eager code between graph "
                "breaks) where fxdp cannot see them. Move parameter uses out of the code dynamo cannot trace.")
        if not _requires_grad(output):
            self._compiled.pop(ctx.cid, None)

    def enter_compiled_region(self, first_ordinal: int, num_sites: int) -> torch.Tensor:
        """Run time, start of a compiled region: its token (see :mod:`fxdp.runtime.compiled`)."""
        ctx = self._context
        if ctx is None or not ctx.compiled:
            raise PrivacyError(
                "fxdp: a compiled region that uses the privatized model's parameters ran outside a forward pass "
                "of the model in grad mode (fxdp did not see the pass start). Call the compiled model itself: "
                "torch.compile(model, backend=\"fxdp\")(inputs).")
        if ctx.next_ordinal != first_ordinal:
            raise BatchLayoutError(
                f"fxdp: a compiled region starts at parameter use {first_ordinal}, but this forward pass has made "
                f"{ctx.next_ordinal}: the forward takes another path than when it was compiled (data-dependent "
                "control flow between graph breaks).")
        ctx.next_ordinal += num_sites
        return torch.tensor(ctx.cid, dtype=torch.int64)

    def receive_compiled(self, cid: int, site: CompiledSite, slot: int, grad: torch.Tensor, saved: list):
        """Backward: one capture of a compiled call site; feeds the same path as the eager taps."""
        ctx = self._compiled.get(cid)
        if ctx is None:
            raise PrivacyError(
                f"fxdp: gradient of a compiled forward pass fxdp no longer holds (more than {MAX_COMPILED_FORWARDS} "
                "forward passes without their backward, or a backward through a released model).")
        use = ctx.by_ordinal.get(site.ordinal)
        if use is None:
            use = LayerUse(site.ordinal, site.op, site.binding(ctx.params, {}), None, ctx)
            ctx.by_ordinal[site.ordinal] = use
            ctx.uses.append(use)
        if slot == OUTPUT_SLOT:
            use.saved = dict(zip(site.saved_names, saved))
            use.binding.saved = use.saved
            use.binding.layout_source = use.saved.get(site.source) if site.source else None
            use.layout = self._compiled_layout(ctx, use)
            grad_output = grad
        else:
            use.extra_grads[site.broadcast_roles[slot]] = grad
            grad_output = use.grad_output
        self.receive(use, grad_output, use.extra_grads)

    def _compiled_layout(self, ctx: ForwardContext, use: LayerUse):
        binding = use.binding
        if ctx.table is None:
            if ctx.batch_size > 1:
                raise BatchLayoutError("fxdp: no batch analysis for this compiled forward pass; this is a bug.")
            return single_sample_layout(binding)
        layout = ctx.table.layout_of(use.ordinal, binding.rule.name, binding.param_names)
        if layout is None:
            raise BatchLayoutError(
                f"fxdp: compiled call site {use.ordinal} ({use.op} using {', '.join(binding.param_names)}) does not "
                "match the analysis of this forward pass; recompile the model (torch._dynamo.reset()).")
        if "input_layouts" in binding.options:
            binding.options["input_layouts"] = ctx.table.inputs_of(use.ordinal)
        return layout

