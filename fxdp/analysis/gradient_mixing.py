"""Sample independence of gradients: a sample's loss must reach only its own rows.

The forward checks (``sample_mixing``) see values. A model can keep every
sample's values to itself and still route one sample's gradient into other
samples' rows -- a parameter expanded to the batch and then averaged over it,
``p.expand(B, d).mean(0)``: every row gets the whole batch's gradient, and the
per-sample norms would be computed from the wrong rows. This pass backpropagates
a cotangent that is non-zero on sample 0's outputs only and checks that every
tapped output gradient (and every broadcast parameter's gradient) is zero on
the other samples.
"""
from __future__ import annotations

import torch

from fxdp.core.errors import SampleMixingError
from fxdp.core.layout import LayoutKind
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis
from fxdp.analysis.capture import probe_run
from fxdp.analysis.sample_mixing import ADVICE


def _only_sample_zero(t, layout, n):
    cot = torch.zeros_like(t)
    layout.to_batch_first(cot, n)[0].fill_(1.0)
    return cot


def check_gradient_mixing(analysis: Analysis) -> PassResult:
    base = analysis.runs["base"]
    n = len(base.samples)
    layouts = analysis.output_layouts
    if n < 2 or not any(lo is not None and lo.kind is not LayoutKind.NONE for lo in layouts):
        return PassResult(analysis, False)
    if any(isinstance(p, SampleMixingError) for p in analysis.problems):
        return PassResult(analysis, False)  # already refused on values
    probe_run(analysis, base.samples, keep_graph=True, on_graph=lambda run: _check(analysis, run, n, layouts))
    return PassResult(analysis, False)


def _check(analysis: Analysis, run, n: int, layouts) -> None:
    outputs, cotangents = [], []
    for out, layout in zip(run.live_outputs, layouts):
        if layout is not None and layout.kind is not LayoutKind.NONE and out.requires_grad:
            outputs.append(out)
            cotangents.append(_only_sample_zero(out, layout, n))
    checked = [(e, t) for e, t in zip(analysis.entries, run.grad_targets)
               if e.layout is not None and e.layout.kind is not LayoutKind.NONE and not e.lift and t.requires_grad]
    if not outputs or not checked:
        return
    grads = torch.autograd.grad(outputs, [t for _, t in checked], cotangents, allow_unused=True)
    for (entry, _), g in zip(checked, grads):
        if g is None:
            continue
        gb = entry.layout.to_batch_first(g, n)
        own = float(gb[0].abs().max()) if gb[0].numel() else 0.0
        leak = float(gb[1:].abs().max()) if gb[1:].numel() else 0.0
        if leak > 1e-6 * max(own, 1e-30) and leak > 0:
            entry.reason = "gradients mix samples"
            analysis.problem(SampleMixingError(
                f"fxdp: gradients mix samples at {entry.op} (parameters {', '.join(entry.param_names)}): one "
                f"sample's loss reaches other samples' rows (e.g. a parameter expanded to the batch and then "
                f"reduced over it), so per-sample norms would be wrong. {ADVICE}"))
