"""Lifting: per-sample gradients for uses whose input has no batch dimension.

A use whose layout source has no batch dimension -- position ids of shape
(1, T), a parameter combined only with other batch-independent tensors --
only meets the batch later, through broadcasting, after which autograd has
already summed over samples. For an embedding with a leading dimension of 1
the analysis *lifts* the index to (B, ...): the lookup is done per sample and
broadcasting becomes a no-op. A verification run checks that lifting leaves
every model output unchanged; any other batch-free use is refused.
"""
from __future__ import annotations

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
        else:
            entry.reason = "no batch dimension"
            analysis.problem(UncoveredParameterError(
                f"fxdp: {entry.op} uses {', '.join(entry.param_names)} on a tensor of shape "
                f"{entry.source_shape} that does not depend on the samples; its result is broadcast over the "
                "batch later, after which per-sample gradients no longer exist. Give that input a batch "
                "dimension (expand it to the batch before the op) or freeze the parameter."))
    return PassResult(analysis, modified)


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
