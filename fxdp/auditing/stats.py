"""Statistics of a membership (canary) audit: pure functions, no torch.

Two ways to turn the scores of runs *with* and *without* a canary into a
statement about epsilon:

- :func:`clopper_pearson_epsilon` -- a *lower bound* on the epsilon that the
  mechanism can have, valid with the stated confidence. It is the quantity an
  auditor may hold against the accountant: if the lower bound exceeds the
  accountant's epsilon, the implementation is not (epsilon, delta)-DP.
  For any threshold test, (epsilon, delta)-DP forces
  ``FPR + e^eps * FNR >= 1 - delta`` and ``FNR + e^eps * FPR >= 1 - delta``;
  replacing the empirical rates by their Clopper-Pearson *upper* bounds
  (confidence ``1 - alpha/2`` each, union bound) gives
  ``eps >= log((1 - delta - FPR_ub) / FNR_ub)`` with confidence ``1 - alpha``.
  The threshold is chosen on a separate half of the runs, so that selecting it
  does not bias the bound.
- :func:`gdp_mu_from_scores` and :func:`epsilon_from_mu` -- a *point estimate*:
  the scores of a Gaussian mechanism are two normal distributions with equal
  spread whose distance in standard deviations is the Gaussian-DP parameter mu;
  mu-GDP implies (epsilon, delta)-DP with
  ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)``
  (Dong, Roth & Su 2019, Corollary 2.13), which is tight for the Gaussian
  mechanism. Composing T Gaussian steps of noise multiplier sigma without
  subsampling is exactly (sqrt(T)/sigma)-GDP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from scipy import special


def delta_from_mu(mu: float, eps: float) -> float:
    """The smallest delta such that mu-GDP implies (eps, delta)-DP."""
    if mu <= 0:
        return 0.0
    a = float(special.ndtr(-eps / mu + mu / 2))
    b = math.exp(eps + float(special.log_ndtr(-eps / mu - mu / 2)))
    return max(float(a - b), 0.0)


def epsilon_from_mu(mu: float, delta: float) -> float:
    """The smallest eps >= 0 such that mu-GDP implies (eps, delta)-DP.

    Edge cases: ``mu <= 0`` (no information) gives 0; a delta at or above
    ``delta(0)`` gives 0; ``mu = inf`` gives inf.
    """
    if not 0 < delta < 1:
        raise ValueError(f"fxdp.audit: delta must be in (0, 1), got {delta!r}.")
    if mu <= 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    if delta_from_mu(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while delta_from_mu(mu, hi) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    lo = 0.0  # delta_from_mu decreases in eps: bisect on [lo, hi]
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if delta_from_mu(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gdp_mu_from_scores(scores_out: Sequence[float], scores_in: Sequence[float]) -> float:
    """Estimate mu: distance of the two score means in pooled standard deviations.

    ``scores_out`` are the scores of runs without the canary, ``scores_in``
    with it. A non-positive difference (canary invisible) gives 0.
    """
    x0 = np.asarray(scores_out, dtype=np.float64)
    x1 = np.asarray(scores_in, dtype=np.float64)
    if x0.size < 2 or x1.size < 2:
        raise ValueError("fxdp.audit: need at least two runs with and two without the canary.")
    pooled = math.sqrt(((x0.size - 1) * x0.var(ddof=1) + (x1.size - 1) * x1.var(ddof=1))
                       / (x0.size + x1.size - 2))
    diff = float(x1.mean() - x0.mean())
    if diff <= 0:
        return 0.0
    if pooled == 0:
        return math.inf
    return diff / pooled


def binomial_upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound on p from k successes in n trials."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return float(special.betaincinv(k + 1, n - k, 1 - alpha))


def _binomial_upper_vec(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    k = np.asarray(k)
    out = np.ones(k.shape, dtype=np.float64)
    ok = k < n
    out[ok] = special.betaincinv(k[ok] + 1, n - k[ok], 1 - alpha)
    return out


def _eps_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """Largest eps the (fpr, fnr) pair forces, from both DP inequalities."""
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        num = 1.0 - delta - a
        if num <= 0:
            continue
        best = max(best, math.inf if b <= 0 else math.log(num / b))
    return best


@dataclass(frozen=True)
class ThresholdBound:
    """A Clopper-Pearson epsilon lower bound and the threshold test behind it."""

    epsilon: float
    threshold: float
    fpr_upper: float
    fnr_upper: float


def _rates(out: np.ndarray, inn: np.ndarray, tau: float) -> Tuple[int, int]:
    """False positives (out > tau) and false negatives (in <= tau)."""
    return int((out > tau).sum()), int((inn <= tau).sum())


def clopper_pearson_epsilon(scores_out: Sequence[float], scores_in: Sequence[float], delta: float,
                            confidence: float = 0.95, seed: int = 0) -> ThresholdBound:
    """Lower bound on epsilon, valid with probability >= ``confidence``.

    The runs of each class are split at random into halves: the threshold is
    picked on the first half (the one whose Clopper-Pearson bound is largest
    there), and the bound is computed on the second half, so the choice of
    threshold does not inflate it. The test is "score > threshold means the
    canary was in". Returns epsilon 0 when no threshold gives evidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"fxdp.audit: confidence must be in (0, 1), got {confidence!r}.")
    alpha = (1 - confidence) / 2
    rng = np.random.default_rng(seed)
    out = rng.permutation(np.asarray(scores_out, dtype=np.float64))
    inn = rng.permutation(np.asarray(scores_in, dtype=np.float64))
    if out.size < 4 or inn.size < 4:
        raise ValueError("fxdp.audit: need at least four runs with and four without the canary.")
    sel_out, ev_out = out[: out.size // 2], out[out.size // 2:]
    sel_in, ev_in = inn[: inn.size // 2], inn[inn.size // 2:]

    candidates = np.unique(np.concatenate([sel_out, sel_in]))
    if candidates.size > 4000:
        candidates = np.quantile(candidates, np.linspace(0, 1, 4001))
    fp = sel_out.size - np.searchsorted(np.sort(sel_out), candidates, side="right")
    fn = np.searchsorted(np.sort(sel_in), candidates, side="right")
    fpr = _binomial_upper_vec(fp, sel_out.size, alpha)
    fnr = _binomial_upper_vec(fn, sel_in.size, alpha)
    scores = [_eps_from_rates(a, b, delta) for a, b in zip(fpr, fnr)]
    best_tau = float(candidates[int(np.argmax(scores))])
    fp_ev, fn_ev = _rates(ev_out, ev_in, best_tau)
    fpr = binomial_upper(fp_ev, ev_out.size, alpha)
    fnr = binomial_upper(fn_ev, ev_in.size, alpha)
    eps = _eps_from_rates(fpr, fnr, delta)
    return ThresholdBound(eps, best_tau, fpr, fnr)
