"""The engine's side of compiled forward passes (backend "fxdp").

Under ``torch.compile(model, backend="fxdp")`` the model's hooks run outside
dynamo: :meth:`~fxdp.engine.engine.Engine.before_forward` opens a forward
pass as in eager mode (batch size, the analysis of this input structure) but
pushes no interceptor -- the taps are in the graph (:mod:`fxdp.compile.graph_ops`).
At run time each compiled region announces its call sites
(:meth:`CompiledForwards.enter_region`), and in backward every capture
arrives through :meth:`CompiledForwards.receive`, which builds the
same :class:`~fxdp.engine.tap.LayerUse` records as the eager taps: from there
on both paths share one finalize. When the forward ends, a pass whose
parameter uses did not all come through compiled regions is refused.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

import torch

from fxdp.core.errors import BatchLayoutError, PrivacyError
from fxdp.compile.graph_ops import COMPILED_CLASSES, OUTPUT_SLOT, CompiledSite, register_engine
from fxdp.engine.recorder import single_sample_layout
from fxdp.engine.compiled_hook import install_compiled_forwards
from fxdp.engine.tap import ForwardContext, LayerUse

# Compiled forward passes kept for their backward; older ones are dropped (their backward then fails loudly).
MAX_COMPILED_FORWARDS = 64
_context_ids = itertools.count(1)


def _frames_past_recompile_limit(model) -> list:
    """The forward functions of ``model``'s modules whose dynamo cache is full: dynamo runs them uncompiled."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        limit = torch._dynamo.config.recompile_limit
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return []
    out, seen = [], set()
    for m in model.modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        if len(_debug_get_cache_entry_list(code)) >= limit:
            out.append(f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})")
    return out


def _requires_grad(output) -> bool:
    from torch.utils._pytree import tree_flatten
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(output)[0])


class CompiledForwards:
    """The compiled forward passes of one engine (see module docstring); made by the engine through
    :func:`fxdp.engine.compiled_hook.new_compiled_forwards`. ``uid`` is the id under which the
    graph ops find it at run time."""

    def __init__(self, engine):
        self._engine_ref = weakref.ref(engine)
        self._contexts: "OrderedDict[int, ForwardContext]" = OrderedDict()
        self.uid = register_engine(engine)

    @property
    def engine(self):
        return self._engine_ref()

    def open(self, ctx: ForwardContext, table, leaves, dims):
        ctx.compiled, ctx.table, ctx.cid = True, table, next(_context_ids)
        ctx.batch_inputs = [(t, d) for t, d in zip(leaves, dims) if isinstance(t, torch.Tensor) and d is not None]
        ctx.params = dict(self.engine.model.named_parameters())
        self._contexts[ctx.cid] = ctx
        while len(self._contexts) > MAX_COMPILED_FORWARDS:
            self._contexts.popitem(last=False)

    def close(self, ctx: ForwardContext, output):
        ctx.batch_inputs = []
        expected = len(ctx.table.keys) if ctx.table is not None else None
        if ctx.next_ordinal == 0 and expected != 0 and _requires_grad(output):
            self._contexts.pop(ctx.cid, None)
            given_up = _frames_past_recompile_limit(self.engine.model)
            if given_up:
                raise PrivacyError(
                    f"fxdp: the privatized model ran under torch.compile, but dynamo hit its recompile limit "
                    f"(torch._dynamo.config.recompile_limit) on {', '.join(given_up[:3])} and ran it without "
                    "compiling it, so no graph of backend \"fxdp\" tapped this forward pass and its gradients "
                    "would not be clipped. (A forward wrapper shared by many models, such as HuggingFace's, "
                    "reaches the limit first.) Raise the limit, mark the varying dimension dynamic "
                    "(torch._dynamo.mark_dynamic), or train this model without torch.compile.")
            if type(self.engine.model) not in COMPILED_CLASSES:
                raise PrivacyError(
                    "fxdp: the privatized model ran under torch.compile, but no compiled region reported its "
                    "parameter uses: it was compiled with a backend other than \"fxdp\", so its gradients would "
                    "not be clipped. Use torch.compile(model, backend=\"fxdp\").")
            raise PrivacyError(
                "fxdp: the privatized model ran under torch.compile, but this forward pass ran no graph compiled "
                "by backend \"fxdp\": it was compiled again with a backend other than \"fxdp\", or dynamo ran "
                "the model's code without compiling it. Its gradients would not be clipped. Use "
                "torch.compile(model, backend=\"fxdp\"), or train this model without torch.compile.")
        if expected is not None and ctx.next_ordinal != expected:
            self._contexts.pop(ctx.cid, None)
            raise PrivacyError(
                f"fxdp: the analysis found {expected} parameter uses in this forward pass, but compiled regions "
                f"tapped {ctx.next_ordinal}; the others ran outside any compiled graph (code dynamo does not "
                "trace: a torch._dynamo.disable'd / torch.compiler.disable'd function or module, an op dynamo "
                "cannot trace, a frame dynamo gave up on), where fxdp cannot see them under torch.compile. "
                "Let dynamo trace the code that uses parameters, or train this model with eager fxdp.privatize.")
        if not _requires_grad(output):
            self._contexts.pop(ctx.cid, None)

    def release(self, ctx: ForwardContext) -> None:
        """The forward pass was finalized (or dropped): its captures are no longer awaited."""
        self._contexts.pop(ctx.cid, None)
        ctx.by_ordinal = {}

    def enter_region(self, plan, params) -> torch.Tensor:
        """Run time, start of a compiled region whose parameters this engine's open forward pass holds
        (see :func:`fxdp.compile.graph_ops.owner_of`): its token ``(engine id, forward id)``.

        The graph may have been compiled for another instance (dynamo reuses graphs across instances of a
        class): its call sites are checked against *this* forward's analysis once per layout table."""
        ctx = self.engine.current_forward
        if ctx.next_ordinal != plan.first_ordinal:
            raise BatchLayoutError(
                f"fxdp: a compiled region starts at parameter use {plan.first_ordinal}, but this forward pass has "
                f"made {ctx.next_ordinal}: the forward takes another path than when it was compiled "
                "(data-dependent control flow between graph breaks).")
        table = ctx.table
        if table is not None and table not in plan.verified:
            for site in plan.sites:
                if not table.matches(site.ordinal, site.rule, site.param_names) or \
                        bool(table.lifts[site.ordinal]) != site.lift:
                    raise PrivacyError(
                        f"fxdp: compiled call site {site.ordinal} ({site.rule} rule using "
                        f"{', '.join(site.param_names)}) does not match the analysis of this model's forward pass: "
                        "dynamo reused a graph compiled for a model that differs from this one. Compile this "
                        "model separately (torch._dynamo.reset()) and please report the model.")
            plan.verified.add(table)
        ctx.next_ordinal += len(plan.sites)
        return torch.tensor([self.uid, ctx.cid], dtype=torch.int64)

    def receive(self, cid: int, site: CompiledSite, slot: int, grad: torch.Tensor, saved: list):
        """Backward: one capture of a compiled call site; feeds the same path as the eager taps."""
        ctx = self._contexts.get(cid)
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
            use.layout = self._layout_of(ctx, use)
            grad_output = grad
        else:
            use.extra_grads[site.broadcast_roles[slot]] = grad
            grad_output = use.grad_output
        self.engine.receive(use, grad_output, use.extra_grads)

    def _layout_of(self, ctx: ForwardContext, use: LayerUse):
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



install_compiled_forwards(CompiledForwards)
