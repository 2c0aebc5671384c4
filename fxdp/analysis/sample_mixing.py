"""Sample independence: each sample's values must depend on that sample only.

The replace run feeds (1, 1, 2) instead of (0, 1, 2): sample 0 is replaced by
a copy of sample 1. If any tapped tensor or model output changes for samples
1 or 2, something mixed samples (BatchNorm statistics, ``x - x.mean(0)``,
attention across the batch), and per-sample clipping would bound nothing.
"""
from __future__ import annotations

from fxdp.core.errors import SampleMixingError
from fxdp.core.layout import LayoutKind
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis
from fxdp.analysis.batch_layout import close

ADVICE = ("Each sample's output must depend on that sample only: use GroupNorm or LayerNorm instead of "
          "BatchNorm (fxdp.fix_batchnorm(model)), and do not reduce over the batch dimension inside the model.")


def _others_unchanged(base, replaced, layout, n) -> bool:
    if layout is None or layout.kind is LayoutKind.NONE:
        return True
    a = layout.to_batch_first(base, n)[1:]
    b = layout.to_batch_first(replaced, n)[1:]
    return close(a, b)


def check_sample_mixing(analysis: Analysis) -> PassResult:
    runs = analysis.runs
    base, rep = runs["base"], runs["replace"]
    n = len(base.samples)
    if n < 2 or len(base.records) != len(rep.records):
        return PassResult(analysis, False)
    for entry, rb, rr in zip(analysis.entries, base.records, rep.records):
        if not _others_unchanged(rb.source, rr.source, entry.layout, n):
            entry.reason = "mixes samples"
            analysis.problem(SampleMixingError(
                f"fxdp: samples are mixed before {entry.op} (parameters {', '.join(entry.param_names)}): "
                f"changing one sample changed the input of other samples. {ADVICE}"))
    for i, (layout, ob, orr) in enumerate(zip(analysis.output_layouts, base.outputs, rep.outputs)):
        if not _others_unchanged(ob, orr, layout, n):
            analysis.problem(SampleMixingError(
                f"fxdp: samples are mixed in model output {i}: changing one sample changed the outputs of "
                f"other samples. {ADVICE}"))
    return PassResult(analysis, False)
