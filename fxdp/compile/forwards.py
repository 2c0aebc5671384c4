"""The engine's side of compiled forward passes (backend "fxdp").

Under ``torch.compile(model, backend="fxdp")`` the model's hooks run outside
dynamo: :meth:`~fxdp.engine.engine.Engine.before_forward` opens a forward
pass as in eager mode (batch size, the analysis of this input structure) but
pushes no interceptor -- the taps are in the graph (:mod:`fxdp.compile.graph_ops`).
At run time each compiled region announces its call sites
(:meth:`CompiledForwards.enter_region`), and in backward every capture
arrives through :meth:`CompiledForwards.receive`, which builds the
same :class:`~fxdp.engine.tap.LayerUse` records as the eager taps: from there
on both paths share one finalize. Code dynamo runs untraced -- submodules that
run eagerly between the regions, or the whole forward when dynamo gives up on
the root's frame -- is tapped by the eager islands (:mod:`fxdp.compile.islands`),
with ordinals shared with the regions, so norms are combined across compiled and
eager uses. When the forward ends, a pass whose parameter uses did not all come
through compiled regions or eager taps is refused (naming the recompile limit or
the disabled forward when dynamo gave up on the root's frame), and so is a
parameter that reaches the output around every tap (a custom autograd.Function
or a view made before the forward, in eager code).
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

import torch

from fxdp.core.errors import BatchLayoutError, PrivacyError
from fxdp.compile import islands as _islands
from fxdp.compile.graph_ops import COMPILED_CLASSES, OUTPUT_SLOT, CompiledSite, RegionRun, register_engine
from fxdp.compile.islands import EagerIslands
from fxdp.engine.recorder import RuntimeRecorder, single_sample_layout
from fxdp.engine.compiled_hook import install_compiled_forwards
from fxdp.engine.tap import ForwardContext, LayerUse

# Compiled forward passes kept for their backward; older ones are dropped (their backward then fails loudly).
MAX_COMPILED_FORWARDS = 64
_context_ids = itertools.count(1)


def _frames_past_recompile_limit(model) -> list:
    """The forward functions of ``model``'s modules whose dynamo cache is full: dynamo runs them uncompiled."""
    out, seen = [], set()
    for m in model.modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        if _islands.past_recompile_limit(code):
            out.append(_islands.describe(code))
    return out


def _untraced_root_refusal(islands, expected: int, tapped: int) -> PrivacyError:
    """Uses missed although the root's forward ran untraced under the root island (:mod:`fxdp.compile.islands`):
    one hidden from the interceptor."""
    where = "the whole forward ran under fxdp's eager interceptor"
    return PrivacyError(
        f"fxdp: dynamo ran this model's forward without tracing it ({islands.untraced}); {where}, and the "
        f"analysis found {expected} parameter uses in this forward pass but {tapped} were tapped. Raise "
        "torch._dynamo.config.recompile_limit (or compile fewer model classes in one process, or mark the varying "
        "dimension dynamic: torch._dynamo.mark_dynamic), move the parameter use into a submodule, or train this "
        "model with eager fxdp.privatize.")


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

    def open(self, ctx: ForwardContext, table, leaves, dims, trainable) -> None:
        """A compiled forward pass starts; submodules that run eagerly until it ends are intercepted
        (:class:`EagerIslands`)."""
        ctx.compiled, ctx.table, ctx.cid = True, table, next(_context_ids)
        ctx.batch_inputs = [(t, d) for t, d in zip(leaves, dims) if isinstance(t, torch.Tensor) and d is not None]
        ctx.params = dict(self.engine.model.named_parameters())
        self._contexts[ctx.cid] = ctx
        while len(self._contexts) > MAX_COMPILED_FORWARDS:
            self._contexts.popitem(last=False)
        model = self.engine.model
        _islands.open_forward_islands(ctx, EagerIslands(trainable, RuntimeRecorder(ctx, table, trainable), model,
                                                        _islands.untraced_root(model)))

    def close(self, ctx: ForwardContext, output):
        """The forward pass ended: every parameter use the analysis found was tapped (in a compiled region
        or by the eager interceptor). (That no parameter reaches the output around a tap is checked next by
        the engine, :func:`fxdp.engine.compiled_checks.check_compiled_output`.)"""
        islands = _islands.close_islands(ctx.cid)
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
            if islands is not None and islands.untraced is not None:
                raise _untraced_root_refusal(islands, expected, ctx.next_ordinal)
            raise PrivacyError(
                f"fxdp: the analysis found {expected} parameter uses in this forward pass, but compiled regions "
                f"and eager submodules tapped {ctx.next_ordinal}. The others ran in code dynamo does not trace (a "
                "torch._dynamo.disable'd / torch.compiler.disable'd function, an op dynamo cannot trace, a frame "
                "dynamo gave up on) outside any submodule that runs eagerly: fxdp falls back to eager taps for "
                "submodules whose call dynamo does not trace, but a parameter of the root module, or of a module "
                "whose call dynamo traced, used directly in such code is not seen. Move the parameter into a "
                "submodule called from the untraced code (or disable the whole submodule: "
                "torch.compiler.disable on its class), let dynamo trace that code, or train with eager "
                "fxdp.privatize.")
        if ctx.pending_layouts:
            self._contexts.pop(ctx.cid, None)
            raise BatchLayoutError(
                "fxdp: a parameter use outside the compiled regions of this forward pass (eager code between "
                "them) does not match the analysis of the forward: the forward takes another path than the one "
                "analysed (data-dependent control flow). fxdp cannot place its samples; this batch is refused.")
        if not _requires_grad(output):
            self._contexts.pop(ctx.cid, None)
        # parameter paths that skip a tap: walked once, by the engine (fxdp.engine.compiled_checks)

    def release(self, ctx: ForwardContext) -> None:
        """The forward pass was finalized (or dropped): its captures are no longer awaited."""
        self._contexts.pop(ctx.cid, None)
        _islands.drop_islands(ctx.cid)
        ctx.by_ordinal, ctx.region_runs = {}, []

    def enter_region(self, plan, names) -> torch.Tensor:
        """Run time, start of a compiled region whose parameters (named ``names`` in this model) this
        engine's open forward pass holds (see :func:`fxdp.compile.graph_ops.marked_region`): its token
        ``(engine id, forward id, run)``.

        The graph may have been compiled for another instance or another block (dynamo reuses graphs across
        instances of a class): its call sites, at this run's ordinals and with this run's parameter names,
        are checked against *this* forward's analysis once per layout table."""
        ctx = self.engine.current_forward
        rename = tuple((a, b) for a, b in zip(plan.param_names, names) if a != b)
        run = RegionRun(ctx.next_ordinal - plan.first_ordinal, rename)
        table = ctx.table
        if table is not None and run not in plan.verified.get(table, ()):
            for site in plan.sites:
                ordinal, params = site.ordinal + run.offset, tuple(sorted(run.name(n) for n in site.param_names))
                if not table.matches(ordinal, site.rule, params) or bool(table.lifts[ordinal]) != site.lift:
                    seen = (f"{table.keys[ordinal][0]} using {', '.join(table.keys[ordinal][1])}"
                            if ordinal < len(table.keys) else "no parameter use")
                    raise PrivacyError(
                        f"fxdp: compiled call site {ordinal} ({site.rule} rule using {', '.join(params)}) does not "
                        f"match the analysis of this model's forward pass, which has {seen} there: the forward takes "
                        "another path than when the graph was compiled (data-dependent control flow between graph "
                        "breaks), or dynamo reused a graph compiled for a model that differs from this one. Compile "
                        "this model separately (torch._dynamo.reset()) and please report the model.")
            plan.verified.setdefault(table, set()).add(run)
        ctx.next_ordinal += len(plan.sites)
        ctx.region_runs.append(run)
        return torch.tensor([self.uid, ctx.cid, len(ctx.region_runs) - 1], dtype=torch.int64)

    def receive(self, cid: int, run: int, site: CompiledSite, slot: int, grad: torch.Tensor, saved: list):
        """Backward: one capture of a compiled call site; feeds the same path as the eager taps."""
        ctx = self._contexts.get(cid)
        if ctx is None:
            raise PrivacyError(
                f"fxdp: gradient of a compiled forward pass fxdp no longer holds (more than {MAX_COMPILED_FORWARDS} "
                "forward passes without their backward, or a backward through a released model).")
        region_run = ctx.region_runs[run]
        ordinal = site.ordinal + region_run.offset
        use = ctx.by_ordinal.get(ordinal)
        if use is None:
            use = LayerUse(ordinal, site.op, site.binding(ctx.params, {}, region_run), None, ctx)
            ctx.by_ordinal[ordinal] = use
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



install_compiled_forwards(CompiledForwards, (_islands.enter_island, _islands.exit_island,
                                             torch._dynamo.disable(_islands.enter_island_from_traced),
                                             torch._dynamo.disable(_islands.exit_island)))
