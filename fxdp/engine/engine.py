"""The runtime engine of a privatized model.

Per forward pass (in grad mode) it opens a :class:`ForwardContext`, looks up
the batch layout of every call site (analysing the model on this input
structure the first time, see :mod:`fxdp.analysis`), and routes parameter uses
through taps. At the end of the backward pass (an autograd engine callback)
``finalize`` computes, for every sample, the norm of its gradient in every clip
group -- the norm of the *sum* over all uses of a parameter, cross terms
included -- the clip factors, and the clipped sums, which it adds to
``p.private_grad``. ``p.grad`` is never written by this path.

Guarantee: after ``loss.backward()``, for every trainable parameter p,
``p.private_grad += sum_b C_b(group(p)) * grad_p(loss_b)``, where ``loss_b`` is
sample b's term of the loss (the 1/B of a "mean" reduction undone with this
forward's batch size) and the clip factors bound each sample's whole clipped
contribution by R.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Dict, List

import torch

from fxdp.core.config import DPConfig, LossReduction
from fxdp.core.errors import BatchLayoutError, PrivacyError
from fxdp.analysis import PIPELINE, Analysis, run_pipeline
from fxdp.analysis.dumps import dump_hook
from fxdp.analysis.plan_groups import GroupPlan
from fxdp.rules import factors as F
from fxdp.rules.virtual import resolve_virtuals
from fxdp.engine.clipping import clip_groups
from fxdp.engine.compiled_hook import in_compiled_module, new_compiled_forwards
from fxdp.core.inputs import input_batch_dims
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.engine.recorder import LayoutTable, RuntimeRecorder, structure_key
from fxdp.engine.tap import ForwardContext, LayerUse

class _WriterRegistry:
    """Parameter -> engine that last wrote its private_grad, by identity, weakly on both
    sides (tensors cannot be WeakKeyDictionary keys: their ``==`` is elementwise)."""

    def __init__(self):
        self._refs: Dict[int, tuple] = {}

    def __setitem__(self, param, engine_ref):
        key = id(param)
        entry = self._refs.get(key)
        if entry is not None and entry[0]() is param:
            self._refs[key] = (entry[0], engine_ref)
            return
        self._refs[key] = (weakref.ref(param, lambda _, k=key: self._refs.pop(k, None)), engine_ref)

    def get(self, param):
        entry = self._refs.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1]


WRITERS = _WriterRegistry()

# (autograd graph task id, engine) whose taps receive gradients in the running backward
# pass: two privatized models in one loss would each clip a sample to R (sqrt(2) R in all).
_BACKWARD_OWNER: list = [None]


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


class Engine:
    """Owns everything fxdp adds to one privatized model (see module docstring)."""

    def __init__(self, model: torch.nn.Module, config: DPConfig, plan: GroupPlan):
        self.model = model
        self.config = config
        self.plan = plan
        self.tables: Dict[tuple, LayoutTable] = {}
        self.last_stats: dict = {}
        self.grad_scaler = None
        self._reset_transient()

    def _reset_transient(self):
        self._mode = None
        self._context = None
        self._depth = 0
        self._suspended = False
        self._pending: List[ForwardContext] = []
        self._callback_queued = False
        self._task = None
        self._compiled_forwards = None

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_mode", "_context", "_pending"):
            state[k] = None if k != "_pending" else []
        state["_depth"], state["_callback_queued"], state["_suspended"], state["_task"] = 0, False, False, None
        state["_compiled_forwards"] = None  # a copy is a different engine to compiled graphs
        return state

    @property
    def current_forward(self):
        """The forward pass in progress (a :class:`ForwardContext`), or None."""
        return self._context

    @property
    def compiled_forwards(self):
        """The handler of this engine's compiled forward passes (see :mod:`fxdp.engine.compiled_hook`)."""
        if self._compiled_forwards is None:
            self._compiled_forwards = new_compiled_forwards(self)
        return self._compiled_forwards

    # ----------------------------------------------------------------- forward
    @contextlib.contextmanager
    def suspended(self):
        old = self._suspended
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = old

    def trainable(self) -> Dict[int, str]:
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                if name not in self.plan.group_of:
                    raise PrivacyError(
                        f"fxdp: parameter {name!r} became trainable after privatize(); its clip group is "
                        "unknown. Call fxdp.unprivatize(model) and privatize it again.")
                out[id(p)] = name
        return out

    def analyse(self, args, kwargs, batch_size: int, strict: bool = True) -> Analysis:
        analysis = Analysis(self.model, args, kwargs, batch_size, self.config.batch_dim_spec, strict=strict)
        return run_pipeline(analysis, PIPELINE, dump_hook("analysis"))

    @torch._dynamo.disable
    def before_forward(self, args, kwargs):
        if self._suspended or not torch.is_grad_enabled():
            return
        self._depth += 1
        if self._depth > 1:
            return
        try:
            B, leaves, dims = input_batch_dims(args, kwargs, self.config.batch_dim_spec)
            trainable = self.trainable()
            key = structure_key(self.model, args, kwargs, B, self.config.batch_dim_spec)
            table = self.tables.get(key)
            if table is None and B >= 2:
                table = LayoutTable(self.analyse(args, kwargs, B).entries)
                self.tables[key] = table
        except BaseException:
            self._depth -= 1
            raise
        ctx = ForwardContext(B, weakref.ref(self), key)
        self._context = ctx
        if in_compiled_module():
            self.compiled_forwards.open(ctx, table, leaves, dims)
            return
        self._mode = ParameterInterceptor(trainable, RuntimeRecorder(ctx, table))
        self._mode.__enter__()

    @torch._dynamo.disable
    def after_forward(self, args, kwargs, output=None):
        if self._suspended or self._context is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        mode, ctx = self._mode, self._context
        self._mode, self._context = None, None
        if ctx.compiled:
            self.compiled_forwards.close(ctx, output)
            return
        mode.__exit__(None, None, None)
        if ctx.pending_layouts:
            self._resolve_pending(ctx, args, kwargs)

    def _resolve_pending(self, ctx: ForwardContext, args, kwargs):
        """The forward took a path the analysis had not seen: analyse this input, then match again."""
        analysis = self.analyse(args, kwargs, ctx.batch_size)
        table = LayoutTable(analysis.entries)
        for use in ctx.uses:
            layout, lift = table.lookup(use.ordinal, use.op, use.binding.param_names)
            if layout is None or (lift and use.layout is None):
                raise BatchLayoutError(
                    f"fxdp: call site {use.ordinal} ({use.op} using {', '.join(use.binding.param_names)}) "
                    "behaves differently from one forward pass to the next on inputs of the same structure "
                    "(data-dependent control flow). fxdp cannot place its samples; this batch is refused.")
            use.layout = use.layout or layout
            if "input_layouts" in use.binding.options:
                use.binding.options["input_layouts"] = table.inputs_of(use.ordinal)
        self.tables[ctx.key] = table
        ctx.pending_layouts = False

    # ---------------------------------------------------------------- backward
    def receive(self, use: LayerUse, grad_output: torch.Tensor, extra: dict):
        ctx = use.context
        if ctx.finalized:
            # a retained graph traversed again: the first pass formed the private gradients
            if use.received:
                return
            raise PrivacyError(
                f"fxdp: this backward pass reaches {use.op} ({', '.join(use.binding.param_names)}), which the "
                "first backward pass through the same forward did not reach; the private gradients of that forward "
                "are already final. Backpropagate the whole loss once per forward pass.")
        use.received = True
        task = _graph_task()
        if task != self._task:
            # a new backward pass; state left by one that failed midway is dropped
            self._task, self._pending, self._callback_queued = task, [], False
        if _BACKWARD_OWNER[0] is not None and _BACKWARD_OWNER[0][0] == task:
            owner = _BACKWARD_OWNER[0][1]()
            if owner is not None and owner is not self:
                raise PrivacyError(
                    "fxdp: one backward pass reaches two separately privatized models; each would clip a sample to "
                    "R, so together one sample could contribute more than R. Privatize the module that contains "
                    "both (one engine per loss), not each part.")
        _BACKWARD_OWNER[0] = (task, weakref.ref(self))
        use.grad_output = grad_output
        use.extra_grads = extra
        if not any(c is ctx for c in self._pending):
            self._pending.append(ctx)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finalize)

    def finalize(self):
        self._callback_queued = False
        self._task = None
        _BACKWARD_OWNER[0] = None
        pending, self._pending = self._pending, []
        if len(pending) > 1:
            for ctx in pending:
                ctx.finalized = True
                ctx.uses = []
            raise PrivacyError(
                f"fxdp: one backward pass went through {len(pending)} forward passes of the privatized model; "
                "samples of different forward passes cannot be matched. Call backward once per forward pass "
                "(gradient accumulation: forward, backward, forward, backward).")
        with torch.no_grad():
            for ctx in pending:
                self._finalize_context(ctx)

    @property
    def _weakself(self):
        return weakref.ref(self)

    def _loss_scale(self) -> float:
        """The GradScaler's current scale (the one ``scaler.scale(loss)`` used), else 1."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _finalize_context(self, ctx: ForwardContext):
        ctx.finalized = True
        if ctx.compiled:
            self.compiled_forwards.release(ctx)
        B = ctx.batch_size
        uses = [u for u in ctx.uses if u.grad_output is not None]
        ctx.uses = []
        params = dict(self.model.named_parameters())
        trainable = [n for n in self.plan.group_of if n in params and params[n].requires_grad]
        per_param: Dict[str, list] = {}
        labelled = []
        if B > 0:
            for u in uses:
                if u.layout is None:
                    raise BatchLayoutError(f"fxdp: no batch layout for {u.op}; this is a bug in fxdp.")
                changed = [k for k, t in u.saved.items() if t._version != u.versions.get(k, t._version)]
                if changed:
                    raise PrivacyError(
                        f"fxdp: the input of {u.op} ({', '.join(u.binding.param_names)}) was modified in place "
                        "after the op used it; its per-sample norms would be computed from other values than "
                        "the gradient. Avoid in-place operations on tensors a layer has consumed.")
                for role, factor in u.rule.factors(u.binding, u.saved, u.grad_output, u.extra_grads,
                                                   u.layout, B).items():
                    per_param.setdefault(u.binding.roles[role], []).append(factor)
                    labelled.append((f"{u.ordinal}:{role}", factor))
                u.saved, u.grad_output, u.extra_grads = {}, None, {}
            per_param = {n: F.merge_factors(fs) for n, fs in resolve_virtuals(per_param, ctx.virtuals, B).items()}
        ctx.virtuals = []
        loss_scale = self._loss_scale()
        scale = (float(B) if self.config.loss_reduction is LossReduction.MEAN else 1.0) / loss_scale
        group_sq: Dict[int, torch.Tensor] = {}
        for name, factors in per_param.items():
            sq = sum(F.sq_norm(f) for f in factors)
            for i in range(len(factors)):
                for j in range(i + 1, len(factors)):
                    sq = sq + 2 * F.inner(factors[i], factors[j])
            g = self.plan.group_of[name]
            group_sq[g] = group_sq[g] + sq if g in group_sq else sq
        decisions = {key: f.decision for key, f in labelled}
        del labelled
        device = next(iter(params.values())).device if params else None
        result = clip_groups({g: sq * scale * scale for g, sq in group_sq.items()}, self.plan.num_groups,
                             self.config, B, device)
        keep = None if result.num_nonfinite == 0 else result.keep
        for name in trainable:
            p = params[name]
            factors = per_param.pop(name, [])
            if factors:
                coef = result.factors[self.plan.group_of[name]] * scale
                total = sum(F.clipped_sum(f, coef, keep) for f in factors)
                total = total.to(p.dtype)
            else:
                total = torch.zeros_like(p)
            existing = getattr(p, "private_grad", None)
            p.private_grad = total if existing is None else existing + total
            WRITERS[p] = self._weakself
        if result.num_nonfinite:
            warnings.warn(f"fxdp: {result.num_nonfinite} of {B} examples had a non-finite loss or gradient; "
                          "they contribute nothing to this step (the step is still charged).", RuntimeWarning)
        self.last_stats = {
            "batch_size": B, "num_nonfinite": result.num_nonfinite, "decisions": decisions,
            "loss_scale": loss_scale,
            "group_norms": {self.plan.labels[g]: n.detach() for g, n in result.norms.items()},
            "clip_factors": {self.plan.labels[g]: c.detach() for g, c in result.factors.items()},
        }
