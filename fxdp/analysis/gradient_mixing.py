"""Sample independence of gradients: a sample's loss must reach only its own rows.

The forward checks (``sample_mixing``) see values. A model can keep every
sample's values to itself and still route one sample's gradient into other
samples' rows -- a parameter expanded to the batch and then averaged over it,
``p.expand(B, d).mean(0)``: every row gets the whole batch's gradient, and the
per-sample norms would be computed from the wrong rows. This pass backpropagates
a cotangent that is non-zero on one sample's outputs only and checks that every
tapped output gradient (and every broadcast parameter's gradient) is zero on
the other samples -- for samples 0, 1 and the last of the run, so that a reordering
of a broadcast copy that keeps sample 0 in place (``p.expand(B, ...)[perm]``, whose
values do not show it) is seen too.
"""
from __future__ import annotations

import torch

from fxdp.core.errors import SampleMixingError
from fxdp.core.layout import LayoutKind
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis
from fxdp.analysis.capture import probe_run
from fxdp.analysis.sample_mixing import ADVICE


def _only_sample(t, layout, n, s):
    cot = torch.zeros_like(t)
    layout.to_batch_first(cot, n)[s].fill_(1.0)
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
    live = [(out, layout) for out, layout in zip(run.live_outputs, layouts)
            if layout is not None and layout.kind is not LayoutKind.NONE and out.requires_grad]
    checked = [(e, t) for e, t in zip(analysis.entries, run.grad_targets)
               if e.layout is not None and e.layout.kind is not LayoutKind.NONE and not e.lift and t.requires_grad]
    if not live or not checked:
        return
    probed = sorted({0, 1, n - 1})
    refused = set()
    for k, s in enumerate(probed):
        grads = torch.autograd.grad([o for o, _ in live], [t for _, t in checked],
                                    [_only_sample(o, lo, n, s) for o, lo in live], allow_unused=True,
                                    retain_graph=k < len(probed) - 1)
        for (entry, _), g in zip(checked, grads):
            if g is None or id(entry) in refused:
                continue
            gb = entry.layout.to_batch_first(g, n)
            own = float(gb[s].abs().max()) if gb[s].numel() else 0.0
            others = torch.cat([gb[:s], gb[s + 1:]])
            leak = float(others.abs().max()) if others.numel() else 0.0
            if leak > 1e-6 * max(own, 1e-30) and leak > 0:
                refused.add(id(entry))
                entry.reason = "gradients mix samples"
                analysis.problem(SampleMixingError(
                    f"fxdp: gradients mix samples at {entry.op} (parameters {', '.join(entry.param_names)}): "
                    f"sample {s}'s loss reaches other samples' rows (e.g. a parameter expanded to the batch and "
                    f"then reduced over it, or its copies reordered), so per-sample norms would be wrong. {ADVICE}"))
