"""Lifting: per-sample gradients for uses whose input has no batch dimension.

A use whose layout source has no batch dimension -- position ids of shape
(1, T), a parameter combined only with other batch-independent tensors --
only meets the batch later, through broadcasting, after which autograd has
already summed over samples. For an embedding with a leading dimension of 1
the analysis *lifts* the index to (B, ...): the lookup is done per sample and
broadcasting becomes a no-op. A verification run checks that lifting leaves
every model output unchanged; any other batch-free use is refused -- saying so when the result changes
with the samples (a slice of a parameter picked by an index computed from them: mixture-of-experts
routing), since the advice differs.
"""
from __future__ import annotations

import torch

from fxdp.core.errors import UncoveredParameterError
from fxdp.core.layout import BatchLayout, LayoutKind
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis
from fxdp.analysis.batch_layout import close
from fxdp.analysis.capture import probe_run


def plan_lifts(analysis: Analysis) -> PassResult:
    modified = False
    for entry in analysis.entries:
        if entry.virtual or entry.layout is None or entry.layout.kind is not LayoutKind.NONE:
            continue
        if entry.binding.liftable and len(entry.source_shape) >= 1 and entry.source_shape[0] == 1:
            entry.lift = True
            modified = True
        elif _selected_by_samples(analysis, entry.ordinal):
            entry.reason = "parameter slice selected by the samples"
            analysis.problem(UncoveredParameterError(
                f"fxdp: {entry.op} takes a slice of {', '.join(entry.param_names)} (shape {entry.source_shape}) with "
                "an index computed from the samples -- a mixture-of-experts layer picking an expert's slice of a "
                "stacked weight by routing, for instance. That slice then serves the rows of several samples at "
                "once and has no batch dimension, so fxdp cannot form per-sample gradients of it. Freeze the "
                "parameter (MoE: freeze the experts and train the router, attention and norms, or LoRA adapters on "
                "the attention), or use a dense MLP."))
        else:
            entry.reason = "no batch dimension"
            analysis.problem(UncoveredParameterError(
                f"fxdp: {entry.op} uses {', '.join(entry.param_names)} on a tensor of shape "
                f"{entry.source_shape} that does not depend on the samples; its result is broadcast over the "
                "batch later, after which per-sample gradients no longer exist. Give that input a batch "
                "dimension (expand it to the batch before the op) or freeze the parameter."))
    return PassResult(analysis, modified)


INDEXING = ("Tensor.__getitem__", "torch.index_select", "Tensor.index_select", "torch.select", "Tensor.select",
            "torch.take", "Tensor.take", "torch.gather", "Tensor.gather")


def _selected_by_samples(analysis: Analysis, ordinal: int) -> bool:
    """Whether a batch-less result is a slice of a parameter picked by an index tensor that depends on the
    samples: an indexing call with an integer tensor index that the capture did not make a virtual parameter
    (it would have, had the index been batch-free), or whose result changes when the samples are reordered
    or one is replaced (the analysis runs of :mod:`fxdp.analysis.capture`)."""
    base = analysis.runs["base"].records[ordinal]
    index = [t for t in base.binding.saved.values() if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    if base.op in INDEXING and index:
        return True
    for name in ("roll", "replace"):
        run = analysis.runs.get(name)
        if run is None:
            continue
        other = run.records[ordinal] if ordinal < len(run.records) else None
        if other is None or other.op != base.op or other.param_names != base.param_names \
                or not close(base.source, other.source):
            return True
    return False


def verify_lifts(analysis: Analysis) -> PassResult:
    lifted = [e for e in analysis.entries if e.lift]
    if not lifted:
        return PassResult(analysis, False)
    base = analysis.runs["base"]
    n = len(base.samples)
    run = probe_run(analysis, base.samples, lifts={e.ordinal: n for e in lifted})
    analysis.runs["lifted"] = run
    same = len(run.outputs) == len(base.outputs) and all(close(a, b) for a, b in zip(base.outputs, run.outputs))
    if not same:
        for e in lifted:
            e.lift = False
            e.reason = "lifting changes the output"
        analysis.problem(UncoveredParameterError(
            "fxdp: " + "; ".join(f"{e.op} using {', '.join(e.param_names)}" for e in lifted) +
            ": the index has no batch dimension, and giving it one changes the model's output, so its result "
            "is not simply broadcast over the batch. Per-sample gradients cannot be formed there."))
        return PassResult(analysis, False)
    for e in lifted:
        e.layout = BatchLayout(LayoutKind.BATCH, 0)
    return PassResult(analysis, True)
