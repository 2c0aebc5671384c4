"""Sample independence of gradients: a sample's loss must reach only its own rows.

The forward checks (``sample_mixing``) see values. A model can keep every
sample's values to itself and still route one sample's gradient into other
samples' rows -- a parameter expanded to the batch and then averaged over it,
``p.expand(B, d).mean(0)``, or its copies reordered, ``p.expand(B, d)[perm]``
(every copy is the same, so values cannot show it): the per-sample norms would
be computed from the wrong rows.

Guarantee: every ordered pair of distinct samples (s, r) is tested. Each backward
puts a cotangent on the outputs of a set S of samples only and checks that every
tapped output gradient (and every broadcast parameter's gradient) is zero, to
1e-6 of the rows of S, on the rows the layouts assign to the samples outside S.
The sets are an antichain (:func:`probe_sets`): sample s is in the sets numbered
by the s-th k-subset of m, so for s != r some set holds s and not r, and a
gradient from s to r shows in r's rows, whatever the permutation or grouping.
The cotangent values are generic (drawn in [1, 2) from a fixed seed), so
gradients from several samples of S cannot cancel in one row except on a set of
measure zero. Legitimate zeros are exact (the rows outside S get zero
cotangents), so no tolerance for rounding is needed. Cost: m backwards with
C(m, m // 2) >= n -- 2 for 2 samples, 3 for 3 (the ordinary analysis), 5 for 8,
8 for 64, 11 for 256 (a re-validation on the whole batch).
"""
from __future__ import annotations

from itertools import combinations, islice
from math import comb
from typing import List

import torch

from fxdp.core.errors import SampleMixingError
from fxdp.core.layout import LayoutKind
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis
from fxdp.analysis.capture import probe_run
from fxdp.analysis.sample_mixing import ADVICE

COTANGENT_SEED = 20261


def probe_sets(n: int) -> List[List[int]]:
    """Sets of samples such that for every s != r in range(n) one set holds s and not r (a separating
    antichain: sample s gets the s-th (m // 2)-subset of range(m), m the least with C(m, m // 2) >= n)."""
    m = 1
    while comb(m, m // 2) < n:
        m += 1
    subsets = list(islice(combinations(range(m), m // 2), n))
    sets = [[s for s, a in enumerate(subsets) if j in a] for j in range(m)]
    return [S for S in sets if 0 < len(S) < n]


def _cotangent(t, layout, n, inside: torch.Tensor, seed: int):
    gen = torch.Generator(device=t.device).manual_seed(seed)
    cot = torch.rand(t.shape, generator=gen, dtype=t.dtype, device=t.device).add_(1.0)
    layout.to_batch_first(cot, n)[~inside.to(t.device)] = 0
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
    sets = probe_sets(n)
    refused = set()
    for k, S in enumerate(sets):
        inside = torch.zeros(n, dtype=torch.bool)
        inside[S] = True
        grads = torch.autograd.grad([o for o, _ in live], [t for _, t in checked],
                                    [_cotangent(o, lo, n, inside, COTANGENT_SEED + len(live) * k + i)
                                     for i, (o, lo) in enumerate(live)], allow_unused=True,
                                    retain_graph=k < len(sets) - 1)
        for (entry, _), g in zip(checked, grads):
            if g is None or id(entry) in refused:
                continue
            rows = entry.layout.to_batch_first(g, n).abs().reshape(n, -1)
            if rows.shape[1] == 0:
                continue
            per_sample, held = rows.amax(1), inside.to(rows.device)
            own = float(per_sample[held].max())
            outside = per_sample.masked_fill(held, 0)
            leak = float(outside.max())
            if leak > 1e-6 * max(own, 1e-30) and leak > 0:
                refused.add(id(entry))
                entry.reason = "gradients mix samples"
                r = int(outside.argmax())
                source = (f"sample {S[0]}'s loss" if len(S) == 1 else "the loss of one of samples "
                          + ", ".join(str(s) for s in S[:6]) + (", ..." if len(S) > 6 else "") + " (probed together)")
                analysis.problem(SampleMixingError(
                    f"fxdp: gradients mix samples at {entry.op} (parameters {', '.join(entry.param_names)}): "
                    f"{source} reaches the rows fxdp assigns to sample {r} (e.g. a parameter "
                    f"expanded to the batch and then reduced over it, or its copies reordered), so per-sample "
                    f"norms would be wrong. {ADVICE}"))
