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

A backward pass that accumulates into no trainable parameter (``torch.autograd.grad`` with
respect to inputs, ``backward(inputs=[x])``: PGD / FGSM adversarial examples) contributes
nothing; ``backward(inputs=[some parameters])`` clips each sample's gradient with respect to those
(virtual parameters count as their sources; the others get zeros). Double backward (``create_graph=True``,
input-gradient penalties) is refused: the taps give first-order gradients only, so the penalty's
parameter gradient would be missing. Every
finalized pass records its batch size in ``engine.ledger`` (:mod:`fxdp.engine.step_ledger`),
which the optimizer checks against the examples drawn for the step.
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
from fxdp.analysis.autograd_hooks import refuse_saved_tensor_hooks
from fxdp.analysis.mixing_monitor import MixingMonitor
from fxdp.analysis.plan_groups import GroupPlan
from fxdp.engine import compiled_checks, finalize, fold, forward_checks, units
from fxdp.engine.clip_bound import ClipBound
from fxdp.rules import factors as F
from fxdp.rules.virtual import resolve_virtuals
from fxdp.engine.clipping import clip_groups
from fxdp.engine.writers import WRITERS
from fxdp.engine.compiled_hook import in_compiled_module, new_compiled_forwards
from fxdp.core.identity import get_view, write_targets
from fxdp.core.inputs import input_batch_dims
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.engine.recorder import LayoutTable, RuntimeRecorder, structure_key
from fxdp.engine.step_ledger import BackwardTargets, PassTraining, StepLedger, use_targets
from fxdp.engine.tap import ForwardContext, LayerUse

# (autograd graph task id, engine) whose taps receive gradients in the running backward
# pass: two privatized models in one loss would each clip a sample to R (sqrt(2) R in all).
_BACKWARD_OWNER: list = [None]


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


def _close(contexts) -> None:
    """Forward passes whose backward is refused or dropped: nothing of theirs is finalized later."""
    for ctx in contexts:
        ctx.finalized, ctx.uses = True, []


class Engine:
    """Owns everything fxdp adds to one privatized model (see module docstring)."""

    def __init__(self, model: torch.nn.Module, config: DPConfig, plan: GroupPlan):
        self.model = model
        self.config = config
        self.plan = plan
        self.tables: Dict[tuple, LayoutTable] = {}
        self.last_stats: dict = {}
        self.grad_scaler = None
        # the one source of the current R: these clip factors and the optimizer's noise both read it
        self.clip_bound = ClipBound(config.max_grad_norm)
        self.ledger = StepLedger()
        self.public_buffers: frozenset = frozenset()
        self.unit_scope = None  # the fxdp.privacy_units block in progress
        self._reset_transient()

    def _reset_transient(self):
        self._mode = None
        self._context = None
        self._depth = 0
        self._suspended = False
        self._pending: List[ForwardContext] = []
        self._callback_queued = False
        self._task = None
        self._pass = PassTraining()  # what the running backward pass trains
        self._compiled_forwards = None
        self._targets = BackwardTargets()
        self._watch = None
        self._monitor = None

    def __getstate__(self):
        # a copy is a different engine to compiled graphs and autograd nodes: its transient state starts fresh
        fresh = Engine.__new__(Engine)
        fresh._reset_transient()
        return {**self.__dict__, **fresh.__dict__, "unit_scope": None}

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
            with forward_checks.open_forward():
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
        view = get_view(self.model)  # sharded models: the identities the layers see (fxdp.core.identity)
        if view is not None:
            out.update(view.aliases())
        return out

    def analyse(self, args, kwargs, batch_size: int, strict: bool = True, probe_size: int = 3) -> Analysis:
        analysis = Analysis(self.model, args, kwargs, batch_size, self.config.batch_dim_spec, strict=strict,
                            probe_size=probe_size)
        return run_pipeline(analysis, PIPELINE, dump_hook("analysis"))

    def layout_table(self, analysis: Analysis) -> LayoutTable:
        """The call-site table the recorder and compiled regions read, from one analysis."""
        return LayoutTable(analysis.entries, analysis.runs["base"].signature if "base" in analysis.runs else None)

    @torch._dynamo.disable
    def before_forward(self, args, kwargs):
        if self._suspended or not torch.is_grad_enabled():
            return
        self._depth += 1
        if self._depth > 1:
            return
        try:
            forward_checks.refuse_backward_hooks(self.model)
            refuse_saved_tensor_hooks("around the privatized model's forward")
            B, leaves, dims = input_batch_dims(args, kwargs, self.config.batch_dim_spec)
            trainable = self.trainable()
            self._targets.prepare(self.model, trainable)
            key = structure_key(self.model, args, kwargs, B, self.config.batch_dim_spec)
            unit_ids = self.unit_scope.ids_for(B) if self.unit_scope is not None else None
            table = self.tables.get(key)
            view = get_view(self.model)
            if table is None and getattr(view, "collective_analysis", None) is not None:
                # sharded model: every rank analyses at once, on one rank's examples (the probes all-gather)
                table = view.collective_analysis(self, key, args, kwargs, B)
            elif table is None and B >= 2:
                table = self.layout_table(self.analyse(args, kwargs, B))
            if table is not None:
                self.tables[key] = table
        except BaseException:
            self._depth -= 1
            raise
        ctx = ForwardContext(B, weakref.ref(self), key, unit_scope=self.unit_scope, unit_ids=unit_ids)
        self._context = ctx
        compiled = in_compiled_module()
        self._watch = forward_checks.BufferWatch(self.model, self.public_buffers, fingerprint=not compiled)
        forward_checks.open_forward().__enter__()
        if compiled:
            self.compiled_forwards.open(ctx, table, leaves, dims, trainable)
            return
        self._mode = ParameterInterceptor(trainable, RuntimeRecorder(ctx, table, trainable))
        self._mode.__enter__()
        batched = [(t, d) for t, d in zip(leaves, dims) if d is not None]
        self._monitor = MixingMonitor([t for t, _ in batched], B, batch_dims=[d for _, d in batched])
        self._monitor.__enter__()

    @torch._dynamo.disable
    def after_forward(self, args, kwargs, output=None):
        if self._suspended or self._context is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        mode, ctx, watch = self._mode, self._context, self._watch
        self._mode, self._context, self._watch = None, None, None
        forward_checks.open_forward().__exit__()
        if ctx.compiled:
            self.compiled_forwards.close(ctx, output)
        else:
            monitor, self._monitor = self._monitor, None
            monitor.__exit__(None, None, None)
            mode.__exit__(None, None, None)
        if output is not None:
            watch.check()
            if not ctx.compiled:
                forward_checks.refuse_unseen_uses(output, mode.param_names)
            else:
                try:
                    compiled_checks.check_compiled_output(output, self.trainable(), ctx)
                except PrivacyError:
                    self.compiled_forwards.release(ctx)
                    raise
        if not ctx.compiled and ctx.pending_layouts:
            self._resolve_pending(ctx, args, kwargs)
        if output is not None and not ctx.compiled:
            forward_checks.revalidate_sequence(self, self.tables.get(ctx.key), monitor.signature, args, kwargs,
                                               ctx.batch_size)

    def _resolve_pending(self, ctx: ForwardContext, args, kwargs):
        """The forward took a path the analysis had not seen: analyse this input, then match again."""
        analysis = self.analyse(args, kwargs, ctx.batch_size)
        table = self.layout_table(analysis)
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
            # a retained graph traversed again: an input-gradient pass (torch.autograd.grad(loss, x)) adds
            # nothing and is fine; a pass that would accumulate into the parameters again is refused
            if use.received and not self._targets.accumulates(use_targets(use)):
                return
            raise PrivacyError(
                f"fxdp: a second backward pass through the same privatized forward pass reaches {use.op} "
                f"({', '.join(use.binding.param_names)}) (retain_graph=True); the private gradients of a forward "
                "pass are formed once, by its first backward, and a second one would count its samples twice. "
                "Sum the losses and backpropagate once per forward pass (or run a new forward).")
        if torch.is_grad_enabled():
            raise PrivacyError(
                "fxdp: a backward pass with create_graph=True (double backward, e.g. an input-gradient penalty) "
                "reached the privatized model. fxdp's taps give first-order gradients only: the penalty's gradient "
                "with respect to the parameters would be silently missing. Compute input gradients with "
                "torch.autograd.grad(loss, x) without create_graph (adversarial examples), or train without "
                "the penalty.")
        use.received = True
        # a reentrant checkpoint's nested backward belongs to the outer pass (fxdp.engine.checkpointing)
        task = use.backward_task if use.backward_task is not None else _graph_task()
        self._enter_task(task)
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
        targets = use_targets(use)
        trained = self._targets.trained(targets)
        self._pass.add(targets, trained)
        if trained and fold.ready(use):
            fold.fold(use, ctx)
        if not any(c is ctx for c in self._pending):
            self._pending.append(ctx)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finalize)

    def _enter_task(self, task: int) -> None:
        if task != self._task:
            # a new backward pass; state left by one that failed midway is dropped
            self._task, self._pending, self._callback_queued, self._pass = task, [], False, PassTraining()

    def expect_backward(self, task: int) -> None:
        """Called in backward pass ``task`` before a reentrant checkpoint runs its nested backward: the end
        of *this* pass finalizes (a callback queued in the nested one would run before the outer pass ends)."""
        self._enter_task(task)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finalize)

    def finalize(self):
        self._callback_queued = False
        self._task = None
        _BACKWARD_OWNER[0] = None
        pending, self._pending = self._pending, []
        done, self._pass = self._pass, PassTraining()
        trained = done.trained
        if not trained:
            for ctx in pending:
                self._discard_received(ctx)
            return
        try:
            self.ledger.admit(done.untrained)
        except PrivacyError:
            _close(pending)
            raise
        if len(pending) > 1 and all(c.unit_scope is None for c in pending):
            _close(pending)
            raise PrivacyError(
                f"fxdp: one backward pass went through {len(pending)} forward passes of the privatized model; "
                "samples of different forward passes cannot be matched, and if the passes are views of the same "
                "examples (augmentations, several views in one loss), each example would be clipped once per view "
                "(K views: K·R). Declare them one privacy unit: run the forward passes inside "
                "`with fxdp.privacy_units(model, ids):` (one id per row, the same id for the rows of one example or "
                "user; or views=K, layout='stacked' or 'interleaved') and fxdp clips each unit's summed gradient "
                "once in this backward.")
        with torch.no_grad(), finalize.autocast_off():
            if any(c.unit_scope is not None for c in pending):
                self._finalize_context(*pending, trained=trained)
            else:
                for ctx in pending:
                    self._finalize_context(ctx, trained=trained)

    def _discard_received(self, ctx: ForwardContext) -> None:
        """A backward pass that wanted no parameter gradient (``torch.autograd.grad(loss, x)``): what it
        handed to the taps is dropped, and the forward stays open, so that a later backward through its
        retained graph forms its private gradients once. (A compiled pass's activations come back with each
        backward's captures: dropped too, so the passes its registry keeps open hold no activations.)"""
        for u in ctx.uses:
            u.grad_output, u.extra_grads, u.received = None, {}, False
            if ctx.compiled:
                u.saved = u.binding.saved = {}
        ctx.folded, ctx.decisions = {}, {}

    def _loss_scale(self) -> float:
        """The GradScaler's current scale (the one ``scaler.scale(loss)`` used), else 1."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _finalize_context(self, ctx: ForwardContext, *together: ForwardContext, trained=frozenset()):
        """The pipeline of :mod:`fxdp.engine.finalize` for one forward pass (or for the forward passes of
        one :func:`fxdp.privacy_units` block: clipped per unit, :mod:`fxdp.engine.units`), for the parameters
        named in ``trained`` (the pass accumulates into them; ``backward(inputs=[...])`` may name a subset)."""
        collected = []
        for c in (ctx,) + together:
            c.finalized = True
            if c.compiled:
                self.compiled_forwards.release(c)
            uses = [u for u in c.uses if u.grad_output is not None or u.folded]
            c.uses = []
            collected.append(finalize.collect(uses, c.batch_size, c.folded, c.decisions))
            c.folded, c.decisions = {}, {}
        if ctx.unit_scope is not None or together:
            per_param, decisions, B = units.merge_contexts((ctx,) + together, collected)
        else:
            (per_param, decisions), B = collected[0], ctx.batch_size
        del collected  # the factors are referenced from per_param only: finalize releases each once it is done with it
        params = write_targets(self.model)
        trainable = [n for n in self.plan.group_of if n in params and params[n].requires_grad]
        if together and any(c.virtuals for c in together):
            raise PrivacyError(
                "fxdp: a privacy_units block with several forward passes uses parameters transformed before they meet "
                "the batch (virtual parameters); fxdp does not combine those across forward passes yet. Run the "
                "views in one forward pass (concatenate them along the batch, with privacy_units ids).")
        if B > 0:
            per_param = {n: F.merge_factors(fs) for n, fs in resolve_virtuals(per_param, ctx.virtuals, B).items()
                         if n in trained}
        for c in (ctx,) + together:
            c.virtuals = []
        loss_scale = self._loss_scale()
        scale = (float(B) if self.config.loss_reduction is LossReduction.MEAN else 1.0) / loss_scale
        group_sq = finalize.group_norms(per_param, self.plan.group_of, scale)
        device = next(iter(params.values())).device if params else None
        R = self.clip_bound.value
        result = clip_groups(group_sq, self.plan.num_groups, self.config, B, device, max_grad_norm=R)
        self.clip_bound.record(result.unclipped, R)
        writer = weakref.ref(self)
        finalize.write_private_grads(params, trainable, per_param, result, self.plan.group_of, scale,
                                     on_write=lambda p: WRITERS.record(p, writer),
                                     convert=getattr(get_view(self.model), "convert_private_grad", None))
        if result.num_nonfinite:
            warnings.warn(f"fxdp: {result.num_nonfinite} of {B} examples had a non-finite loss or gradient; "
                          "they contribute nothing to this step (the step is still charged).", RuntimeWarning)
        self.last_stats = finalize.step_stats(B, result, decisions, loss_scale, self.plan.labels)
        self.ledger.record(B)
