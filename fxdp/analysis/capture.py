"""Capture: run the model on a few samples and record every parameter use.

The analysis runs the forward several times on selected samples of the
example batch (original order, rolled, one sample replaced by another, one
sample fewer). Each run records, per call that uses trainable parameters, the
bound rule and a copy of the tensor that locates the samples. Dropout is
disabled, the RNGs (torch's, numpy's, Python's) forked and seeded alike for
every run, and the module buffers (BatchNorm statistics...) restored, so the
runs are comparable and leave no trace.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional for torch
    np = None

from fxdp.core.identity import trainable_ids
from fxdp.core.inputs import input_batch_dims
from fxdp.analysis.checkpointing import transparent_checkpoints
from fxdp.analysis.drawn_dropout import sdpa_arguments
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.analysis.mixing_monitor import MixingMonitor
from fxdp.analysis.numpy_draws import argument_seeded_numpy
from fxdp.analysis.runner import PassResult
from fxdp.analysis.samples import distinct_samples, perturbed_inputs
from fxdp.analysis.side_effects import analysis_forward
from fxdp.analysis.state import Analysis
from fxdp.analysis.taint import BatchTaint
from fxdp.core.errors import BatchLayoutError, PrivacyError, UncoveredParameterError
from fxdp.analysis.batch_free_writes import refuse_written_sites
from fxdp.rules.virtual import batch_free_candidate, make_virtuals, root_names, virtual_binding

DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
            torch.dropout, torch.Tensor.dropout if hasattr(torch.Tensor, "dropout") else F.dropout,
            torch.nn.functional.dropout}


def _full_like_draw(value):
    def draw(args, kwargs):
        kw = {k: v for k, v in kwargs.items() if k in ("dtype", "device", "layout")}
        if args and isinstance(args[0], torch.Tensor):
            return torch.full_like(args[0], value, **kw)
        size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        size = kwargs.get("size", size)
        return torch.full(tuple(size), value, **kw)
    return draw


def _fill_(value_of):
    def fill(args, kwargs):
        return args[0].fill_(value_of(args, kwargs))
    return fill


# Value-drawing random ops get deterministic stand-ins in analysis runs, so that a
# draw made per *position* (label dropout for classifier-free guidance, noise) cannot
# look like sample mixing. Index-drawing ops (randperm, randint, multinomial) are kept:
# they can move samples across the batch, which the analysis must see.
RANDOM_VALUES = {
    torch.rand: _full_like_draw(0.5), torch.rand_like: _full_like_draw(0.5),
    torch.randn: _full_like_draw(0.0), torch.randn_like: _full_like_draw(0.0),
    torch.bernoulli: lambda a, k: (a[0] >= 0.5).to(a[0].dtype),
    torch.normal: lambda a, k: (torch.as_tensor(a[0]) if a else torch.as_tensor(k["mean"])).clone(),
    torch.Tensor.uniform_: _fill_(lambda a, k: (a[1] if len(a) > 1 else k.get("from", 0.0)) / 2
                                  + (a[2] if len(a) > 2 else k.get("to", 1.0)) / 2),
    torch.Tensor.normal_: _fill_(lambda a, k: a[1] if len(a) > 1 else k.get("mean", 0.0)),
    torch.Tensor.bernoulli_: _fill_(lambda a, k: 1.0),
}


@dataclass
class Record:
    op: str
    param_names: tuple
    binding: Any
    source: torch.Tensor
    source_shape: tuple
    output_shape: tuple
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample fallback: every tensor input
    virtual: bool = False  # a batch-free call whose result is a virtual parameter
    site: tuple = ()  # virtual only: (op, parameter names, occurrence)
    writes: bool = False  # virtual only: the call wrote a tensor in place (fxdp.analysis.batch_free_writes)


@dataclass
class ProbeRun:
    samples: List[int]
    records: List[Record] = field(default_factory=list)
    outputs: List[torch.Tensor] = field(default_factory=list)
    # with keep_graph: per record, the tensor whose gradient the tap would capture,
    # and the model outputs still attached to the autograd graph
    grad_targets: List[torch.Tensor] = field(default_factory=list)
    live_outputs: List[torch.Tensor] = field(default_factory=list)
    signature: int = 0  # hash of the run's torch call sequence (fxdp.analysis.mixing_monitor)


class ProbeRecorder:
    """Recorder of analysis runs: computes each op as is and records it."""

    def __init__(self, run: ProbeRun, analysis: Analysis, lifts: Optional[Dict[int, int]] = None,
                 keep_graph: bool = False, taint: Optional[BatchTaint] = None):
        self.run = run
        self.analysis = analysis
        self.lifts = lifts or {}
        self.keep_graph = keep_graph
        self.taint = taint
        self.seen: Dict[tuple, int] = {}  # (op, parameter names) -> occurrences of batch-free calls so far

    def observe(self, func, args, kwargs, out):
        if self.taint is not None:
            self.taint.propagate(func, args, kwargs, out)

    def virtual(self, call, interceptor):
        """A batch-free call (no input depends on the samples) becomes a virtual parameter."""
        if self.taint is None or self.taint.any((call.args, call.kwargs)) or not batch_free_candidate(call):
            return None
        binding = virtual_binding(call)
        key = (call.name, binding.param_names)
        self.seen[key] = self.seen.get(key, 0) + 1
        site = key + (self.seen[key],)
        if self.analysis is not None and site in self.analysis.not_virtual:
            return None
        ordinal = len(self.run.records)
        out, made = make_virtuals(call, ordinal)
        if made is None:
            return None
        for u, v in made:
            interceptor.param_names[id(u)] = v.name
            interceptor.virtual_leaves.append(u)
        u, v = made[0]
        binding.options["kind"] = v.kind
        if self.keep_graph:
            self.run.grad_targets.append(u)
        self.run.records.append(Record(call.name, binding.param_names, binding, u.detach().clone(),
                                       tuple(u.shape), tuple(u.shape), virtual=True, site=site))
        return out

    def batch_free_write(self, func):
        """The virtual call just recorded wrote in place: refused after the runs, if the site stays virtual."""
        self.run.records[-1].writes = True

    def substitute(self, func, args, kwargs):
        if func in RANDOM_VALUES:
            return lambda: RANDOM_VALUES[func](args, kwargs)
        if func in DROPOUTS:
            x = args[0] if args else kwargs["input"]
            return lambda: x
        if func is F.scaled_dot_product_attention and sdpa_arguments(args, kwargs)["dropout_p"]:
            kw = dict(sdpa_arguments(args, kwargs), dropout_p=0.0)  # given by keyword or by position
            return lambda: func(**kw)
        return None

    def handle(self, call, binding):
        ordinal = len(self.run.records)
        args, kwargs = call.args, call.kwargs
        if ordinal in self.lifts and binding.layout_source is not None:
            src = binding.layout_source
            lifted = src.expand(self.lifts[ordinal], *src.shape[1:])
            args = tuple(lifted if a is src else a for a in args)
            kwargs = {k: (lifted if v is src else v) for k, v in kwargs.items()}
        target = None
        if self.keep_graph and binding.broadcast:
            role, shape = next(iter(binding.broadcast.items()))
            p = binding.params[role]
            target = p.expand(shape)
            args = tuple(target if a is p else a for a in args)
            kwargs = {k: (target if v is p else v) for k, v in kwargs.items()}
        out = call.func(*args, **kwargs)
        if self.keep_graph:
            self.run.grad_targets.append(target if target is not None else out)
        src = binding.layout_source if binding.layout_source is not None else out
        inputs = ({k: v.detach().clone() for k, v in binding.saved.items()}
                  if "input_layouts" in binding.options else {})
        self.run.records.append(Record(call.name, binding.param_names, binding, src.detach().clone(),
                                       tuple(src.shape), tuple(out.shape), inputs))
        return out

    def refuse(self, exc, func, args, kwargs, out=None):
        self.analysis.problem(exc)
        if func is None:
            return None
        if out is not None:
            return out
        try:
            return func(*args, **kwargs)
        except Exception:  # the refused op cannot even run on the analysis inputs: report the refusal
            raise exc from None


def select_samples(args, kwargs, batch_dim, samples: List[int]):
    """Index the batched tensors of (args, kwargs) (see ``fxdp.core.inputs``)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    _, leaves, dims = input_batch_dims(args, kwargs, batch_dim)
    _, spec = tree_flatten((args, kwargs))
    out = []
    for t, d in zip(leaves, dims):
        if d is not None:
            t = t.index_select(d, torch.tensor(samples, device=t.device, dtype=torch.long))
        out.append(t)
    return tree_unflatten(out, spec)


ANALYSIS_SEED = 20260


def seed_run() -> None:
    """Seed every global RNG a forward may draw from (torch's, numpy's, Python's ``random``: HuggingFace's
    SpecAugment time masks come from ``np.random``) the same way at the start of each analysis run."""
    torch.manual_seed(ANALYSIS_SEED)
    random.seed(ANALYSIS_SEED)
    if np is not None:
        np.random.seed(ANALYSIS_SEED)


@contextlib.contextmanager
def quiet_state(model):
    """Fork the RNGs (torch's, numpy's and Python's global ones) and restore the model's buffers afterwards:
    the user's streams then give, after the analysis, exactly what they would have given without it."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = []
    if torch.cuda.is_available():
        devices = list(range(torch.cuda.device_count()))
    py_state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers and b.shape == buffers[n].shape:
                        b.copy_(buffers[n])


def _refuse_virtual_outputs(analysis, interceptor, leaves):
    """A model output computed from parameters alone would be a virtual parameter returned to the user: its
    gradient would stop there, never reaching the parameters. Refused (it was never a per-sample term)."""
    made = {id(u) for u in interceptor.virtual_leaves}
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and id(t) in made and analysis is not None:
            names = ", ".join(root_names(interceptor.param_names[id(t)]))
            analysis.problem(UncoveredParameterError(
                f"fxdp: model output {i} is computed inside the privatized forward from trainable parameter(s) "
                f"{names} alone, by ops no per-sample rule covers on their own; fxdp cannot tell such a term from "
                "a data-dependent one. Compute parameter-only terms (regularizers) outside the model's forward: "
                "their gradients are then public (DPOptimizer(public_grads='add'))."))


def probe_run(analysis: Analysis, samples: List[int], lifts=None, keep_graph: bool = False,
              on_graph=None) -> ProbeRun:
    """Run the forward on ``samples`` of the example batch, recording every parameter use
    (and, with ``keep_graph``, what backward needs to see which samples gradients reach;
    ``on_graph(run)`` then runs before the model's buffers are restored, while the graph is valid)."""
    model = analysis.model
    run = ProbeRun(list(samples))
    args, kwargs = select_samples(analysis.args, analysis.kwargs, analysis.batch_dim, samples)
    trainable = trainable_ids(model)
    taint = BatchTaint()
    _, _, dims = input_batch_dims(analysis.args, analysis.kwargs, analysis.batch_dim)
    leaves = tree_flatten((args, kwargs))[0]
    taint.mark([t for t, d in zip(leaves, dims) if isinstance(t, torch.Tensor) and d is not None])
    recorder = ProbeRecorder(run, analysis, lifts, keep_graph, taint)
    engine = getattr(model, "_fxdp_engine", None)
    with quiet_state(model), (engine.suspended() if engine is not None else contextlib.nullcontext()), \
            transparent_checkpoints():
        seed_run()
        interceptor = ParameterInterceptor(trainable, recorder)
        with torch.enable_grad(), analysis_forward(analysis), argument_seeded_numpy(ANALYSIS_SEED), interceptor, \
                MixingMonitor(structural=False) as calls:
            try:
                out = model._call_impl(*args, **kwargs)  # not model.compile()'s compiled call: an analysis run is eager
            except PrivacyError:
                raise
            except Exception as exc:
                raise BatchLayoutError(
                    f"fxdp: the model's forward failed in fxdp's analysis run on samples {list(samples)} of the "
                    f"batch: {type(exc).__name__}: {exc}. (The analysis splits every input along its batch "
                    "dimension; if the model runs on the whole batch, an input may not be split that way: say "
                    "where its batch is with batch_dim=.)") from exc
        run.signature = calls.signature
        leaves, _ = tree_flatten(out if not hasattr(out, "to_tuple") else out.to_tuple())
        _refuse_virtual_outputs(analysis, interceptor, leaves)
        live = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        run.outputs = [t.detach() for t in live]
        if keep_graph:
            run.live_outputs = live
            if on_graph is not None:
                with torch.enable_grad():
                    on_graph(run)
            run.live_outputs, run.grad_targets = [], []
    return run


def probe_plan(base: List[int]) -> Dict[str, List[int]]:
    """Sample selections of the analysis runs, from the samples ``base`` of the example batch (2 or 3 distinct
    ones; all of them when an unseen call sequence is re-validated on the whole batch)."""
    return {"base": base, "roll": base[1:] + base[:1], "replace": [base[1]] + base[1:], "small": base[:-1]}


def _probe_samples(analysis: Analysis) -> List[int]:
    """2 or 3 pairwise distinct samples; for a re-validation on the whole batch (``probe_size`` > 3), every
    sample (duplicates included: that run checks mixing, the layouts are already known)."""
    if analysis.probe_size > 3:
        return list(range(min(analysis.batch_size, analysis.probe_size)))
    return distinct_samples(analysis.args, analysis.kwargs, analysis.batch_dim, analysis.batch_size)


def _batch_sized_virtuals(analysis: Analysis) -> bool:
    """Batch-free results whose shape scales with the number of samples (``emb(zeros(B, T))``: BERT's default
    token types) are left to the family rules, which place their batch dimension by shape: marks them in
    ``analysis.not_virtual`` and returns True when the runs must be redone."""
    base, small = analysis.runs["base"], analysis.runs["small"]
    small_shapes = {r.site: r.source_shape for r in small.records if r.virtual}
    scaled = [r.site for r in base.records if r.virtual and small_shapes.get(r.site, r.source_shape) != r.source_shape]
    analysis.not_virtual.update(scaled)
    return bool(scaled)


def _rule_name(record: Record) -> str:
    if record.virtual:  # how its per-sample gradients reach the parameters: fxdp.rules.virtual
        return f"virtual ({record.binding.options.get('kind', 'vjp')})"
    return record.binding.rule.name


def _refuse_packed(analysis: Analysis):
    from torch.nn.utils.rnn import PackedSequence

    def packed(x):
        if isinstance(x, PackedSequence):
            return True
        if isinstance(x, (list, tuple)):
            return any(packed(y) for y in x)
        if isinstance(x, dict):
            return any(packed(y) for y in x.values())
        return False

    if packed((analysis.args, analysis.kwargs)):
        raise BatchLayoutError(
            "fxdp: a PackedSequence input holds the samples as ragged slices of one flat tensor, so fxdp cannot tell "
            "which rows belong to which sample. Pass a padded batch instead (torch.nn.utils.rnn.pad_sequence, or "
            "pad_packed_sequence) and mask the padded steps in the loss.")


def capture_runs(analysis: Analysis) -> PassResult:
    """Run the analysis forwards on distinct samples (:mod:`fxdp.analysis.samples`) and record the call
    sites of the base run as entries."""
    from fxdp.analysis.state import Entry

    _refuse_packed(analysis)
    chosen = _probe_samples(analysis)
    if len(chosen) < 2:
        analysis.args, analysis.kwargs = perturbed_inputs(analysis.args, analysis.kwargs, analysis.batch_dim,
                                                          analysis.batch_size)
        analysis.log.append("capture: every sample is the same; floating-point inputs perturbed per sample")
        _refuse_packed(analysis)
        chosen = _probe_samples(analysis)
    for _ in range(4):
        for name, samples in probe_plan(chosen).items():
            analysis.runs[name] = probe_run(analysis, samples)
        if not _batch_sized_virtuals(analysis):
            break
    base = analysis.runs["base"]
    analysis.entries = [Entry(i, r.op, _rule_name(r), r.param_names, r.binding, r.source_shape,
                              r.output_shape, virtual=r.virtual) for i, r in enumerate(base.records)]
    refuse_written_sites(analysis, base.records)
    return PassResult(analysis, True)
