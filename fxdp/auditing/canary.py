"""``fxdp.audit``: an empirical privacy audit of fxdp's DP-SGD (white-box gradient canary).

The audit of Nasr et al. 2023 ("Tight auditing of differentially private
machine learning"), in the threat model where the adversary inserts a
gradient and reads every released update. It trains, through fxdp's public
API only -- ``fxdp.privatize`` with your clipping configuration, then
``fxdp.DPOptimizer`` (around ``torch.optim.SGD(lr=1)``) with your noise
multiplier, its own noise and its own accountant -- a canary model whose per-sample gradient is its input:
``out_b = sum_g <E_g[run_b], x_b[g]>`` with G embedding tables ``E_g``. Many
independent runs share one model: run ``r`` owns row ``r`` of every table, and
a sample of run ``r`` only touches that row, so per-sample clipping and the
per-coordinate Gaussian noise make every row an independent DP-SGD run.

Half of the runs contain a canary example whose gradient points along a
direction ``u`` (coordinate 0 of every table) that no other example of the run
touches (a "Dirac canary"); the other examples of each run have gradients in
the remaining coordinates, some above the clipping bound. Every run takes
``steps`` full-batch steps (the canary is in every step: sampling rate 1), and
is scored by its total update along ``u`` in units of R. Without a bug the
scores are N(0, T σ²) and N(T, T σ²): the mechanism is exactly
(sqrt(T)/σ)-GDP, whose epsilon the accountant must not under-state.

The result (:class:`AuditResult`) carries

- ``epsilon_lower_bound``: a Clopper-Pearson lower bound on epsilon (valid
  with probability ``confidence``); it must not exceed the accountant's epsilon,
  or the implementation leaks more than it claims;
- ``epsilon_gdp``: the epsilon of the GDP parameter mu estimated from the two
  score distributions; it must lie within ``gdp_tolerance`` of the theoretical
  epsilon (above: more leakage than claimed; below: the canary is weaker than
  R, so the audit cannot vouch for the implementation).

``passed`` is True when all three hold. What it does not show: the audit
exercises clipping, noise, scaling and accounting on this canary model;
exactness of the per-sample norms on *your* model is what the sensitivity
tests check (see tests/privacy/test_sensitivity.py). Subsampling amplification
is not audited (sampling rate 1). With ``secure_mode=True`` the noise is
OS-seeded and the result is not reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from fxdp.engine.install import get_engine, privatize
from fxdp.auditing.stats import clopper_pearson_epsilon, epsilon_from_mu, gdp_mu_from_scores
from fxdp.core.config import make_config


class CanaryModel(nn.Module):
    """``out_b = sum_g <tables[g].weight[run_b], x_b[g]>``: the per-sample gradient of
    table g is ``x_b[g]``, placed in row ``run_b`` (the run the sample belongs to)."""

    def __init__(self, num_runs: int, dim: int, groups: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(num_runs, dim) for _ in range(groups))
        for t in self.tables:
            nn.init.zeros_(t.weight)

    def forward(self, run: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sum((t(run) * x[:, g]).sum(-1) for g, t in enumerate(self.tables))


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit` (module docstring). Scores are in units of R."""

    passed: bool
    failures: Tuple[str, ...]
    epsilon_accountant: float
    epsilon_theory: float
    epsilon_lower_bound: float
    epsilon_gdp: float
    mu_theory: float
    mu_estimate: float
    delta: float
    confidence: float
    runs: int
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    mean_without: float
    mean_with: float
    std_without: float
    std_with: float
    config: dict = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"fxdp audit {verdict}: sigma={self.noise_multiplier}, R={self.max_grad_norm}, steps={self.steps}, "
            f"{self.runs} runs with and {self.runs} without the canary, delta={self.delta}",
            f"  accountant epsilon            {self.epsilon_accountant:.4f}",
            f"  theoretical epsilon (mu={self.mu_theory:.4f}) {self.epsilon_theory:.4f}",
            f"  Clopper-Pearson lower bound ({self.confidence:.0%}) {self.epsilon_lower_bound:.4f}",
            f"  GDP estimate (mu={self.mu_estimate:.4f})  {self.epsilon_gdp:.4f} "
            f"({self.epsilon_gdp / self.epsilon_theory:.3f} x theory)",
            f"  scores: without {self.mean_without:+.4f} +- {self.std_without:.4f}, "
            f"with {self.mean_with:+.4f} +- {self.std_with:.4f}",
        ]
        lines += [f"  FAILURE: {f}" for f in self.failures]
        return "\n".join(lines)


def _background(num_runs: int, per_run: int, groups: int, dim: int, R_g: float, gen: torch.Generator, dtype):
    """per_run examples per run with gradients orthogonal to the canary direction,
    norms from 0.25 R_g to 4 R_g per table (so some are clipped, some not)."""
    n = num_runs * per_run
    x = torch.randn(n, groups, dim, generator=gen, dtype=torch.float64)
    x[..., 0] = 0
    scale = R_g * torch.exp(torch.empty(n, groups, 1, dtype=torch.float64).uniform_(
        math.log(0.25), math.log(4.0), generator=gen))
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12) * scale
    run = torch.arange(num_runs).repeat_interleave(per_run)
    return run, x.to(dtype)


def audit(noise_multiplier: float, max_grad_norm: float = 1.0, *, steps: int = 4, runs: int = 5000,
          style="all-layer", clipping_fn="abadi", numerical_stability_constant: Optional[float] = None,
          loss_reduction="mean", groups: int = 2, background: int = 1, dim: int = 4, delta: float = 1e-5,
          confidence: float = 0.95, accountant: str = "prv", gdp_tolerance: Tuple[float, float] = (0.8, 1.2),
          secure_mode: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
          before_step: Optional[Callable] = None) -> AuditResult:
    """Audit DP-SGD as fxdp runs it with this configuration (module docstring).

    Args:
        noise_multiplier: sigma > 0.
        max_grad_norm: R.
        steps: T, optimizer steps per run (fresh noise each; all runs together).
        runs: runs with the canary, and as many without (>= 8).
        style, clipping_fn, numerical_stability_constant, loss_reduction: as in
            ``fxdp.privatize``; the canary model has ``groups`` tables, so grouped
            styles have ``groups`` clip groups of R/sqrt(groups) each.
        background: examples per run besides the canary (their gradients are
            orthogonal to the canary's; 0 for none).
        dim: coordinates per table and run (>= 2 when background > 0).
        delta, confidence: of the epsilon figures and of the Clopper-Pearson bound.
        accountant: "prv", "rdp" or "gdp" (opacus accountants, via DPOptimizer).
        gdp_tolerance: (low, high) bounds of epsilon_gdp / epsilon_theory.
        secure_mode: DPOptimizer's secure mode (OS-seeded noise: not reproducible).
        seed: seeds the data, the noise generator and the statistics' split.
        dtype: parameter dtype of the canary model.
        before_step: ``fn(model, optimizer)`` called after each backward and before
            ``optimizer.step()``; for testing the audit itself (planting a bug).

    Returns:
        :class:`AuditResult`; ``result.passed`` says whether the implementation
        behaved as its accountant claims. Use ``result.summary()`` to print it.

    Raises:
        ValueError: sigma <= 0 (no finite epsilon to audit), too few runs, bad sizes.
    """
    from fxdp.training.accounting import attach_accountant, create_accountant, epsilon_spent
    from fxdp.training.optimizer import DPOptimizer
    from fxdp.training.step_check import DrawnBatchCheck

    sigma = float(noise_multiplier)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"fxdp.audit: noise_multiplier must be > 0 (sigma = 0 has infinite epsilon), got {sigma!r}.")
    if int(runs) != runs or runs < 8:
        raise ValueError(f"fxdp.audit: runs must be an integer >= 8, got {runs!r}.")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"fxdp.audit: steps must be a positive integer, got {steps!r}.")
    if int(groups) != groups or groups < 1 or int(background) != background or background < 0:
        raise ValueError(f"fxdp.audit: groups must be >= 1 and background >= 0, got {groups!r}, {background!r}.")
    if int(dim) != dim or dim < 1 or (background > 0 and dim < 2):
        raise ValueError(f"fxdp.audit: dim must be >= 1 (>= 2 with background examples), got {dim!r}.")
    lo, hi = gdp_tolerance
    config = make_config(style, max_grad_norm, clipping_fn, numerical_stability_constant, loss_reduction)
    R = config.max_grad_norm
    runs, steps, groups, background, dim = int(runs), int(steps), int(groups), int(background), int(dim)

    gen = torch.Generator().manual_seed(seed)
    model = privatize(CanaryModel(2 * runs, dim, groups).to(dtype), config=config)
    plan = get_engine(model).plan
    R_g = config.group_threshold(plan.num_groups)
    # Tables per clip group (all-layer: all of them; the other styles: one each).
    share = math.sqrt(groups / plan.num_groups)
    # Canary: coordinate 0 of every table. At the group threshold for "global" clipping
    # (larger would be dropped), at 4x it otherwise, so that clipping is exercised.
    canary_norm = (R_g * (1 - 1e-6) if config.clipping_fn.value == "global" else 4 * R_g) / share
    bg_run, bg_x = _background(2 * runs, background, groups, dim, R_g / share, gen, dtype)
    can_run = torch.arange(runs, 2 * runs)
    can_x = torch.zeros(runs, groups, dim, dtype=dtype)
    can_x[..., 0] = canary_norm
    run_ids = torch.cat([bg_run, can_run])
    x = torch.cat([bg_x, can_x])

    expected_batch_size = float(background) + 1.0
    lr = 1.0
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=R,
                      expected_batch_size=expected_batch_size, loss_reduction=config.loss_reduction.value,
                      generator=None if secure_mode else torch.Generator().manual_seed(seed + 1),
                      secure_mode=secure_mode)
    attach_accountant(opt, create_accountant(accountant), 1.0)
    # Every row is drawn (q = 1 per run): drawn = clipped is checked at each step.
    opt.batch_check = DrawnBatchCheck("the canary audit's batch of all runs")
    for _ in range(steps):
        opt.zero_grad()
        opt.batch_check.drew(len(x))
        out = model(run_ids, x)
        loss = out.mean() if config.loss_reduction.value == "mean" else out.sum()
        loss.backward()
        if before_step is not None:
            before_step(model, opt)
        opt.step()
    eps_accountant = epsilon_spent(opt.step_hooks[0].accountant, delta)

    # Update along u = (e_0 of every table)/sqrt(G), undoing the optimizer's scaling, in units of R.
    with torch.no_grad():
        move = -sum(t.weight[:, 0].double() for t in model.tables) / math.sqrt(groups)
    scale = (expected_batch_size if config.loss_reduction.value == "mean" else 1.0) / (lr * R)
    scores = (move * scale).numpy()
    out_scores, in_scores = scores[:runs], scores[runs:]

    mu_theory = math.sqrt(steps) / sigma
    eps_theory = epsilon_from_mu(mu_theory, delta)
    mu_hat = gdp_mu_from_scores(out_scores, in_scores)
    eps_gdp = epsilon_from_mu(mu_hat, delta)
    bound = clopper_pearson_epsilon(out_scores, in_scores, delta, confidence, seed=seed)

    failures = []
    if bound.epsilon > eps_accountant:
        failures.append(f"the {confidence:.0%} lower bound on epsilon ({bound.epsilon:.4f}) exceeds the "
                        f"accountant's epsilon ({eps_accountant:.4f}): the implementation leaks more than it claims")
    if eps_gdp > hi * eps_theory:
        failures.append(f"the GDP estimate of epsilon ({eps_gdp:.4f}, mu={mu_hat:.4f}) is above {hi} x the "
                        f"theoretical {eps_theory:.4f} (mu={mu_theory:.4f}): more leakage than sigma and R allow")
    if eps_gdp < lo * eps_theory:
        failures.append(f"the GDP estimate of epsilon ({eps_gdp:.4f}, mu={mu_hat:.4f}) is below {lo} x the "
                        f"theoretical {eps_theory:.4f}: the canary moved the update less than R (or the noise is "
                        "larger than sigma*R), so this audit cannot vouch for the implementation")
    return AuditResult(
        passed=not failures, failures=tuple(failures), epsilon_accountant=eps_accountant, epsilon_theory=eps_theory,
        epsilon_lower_bound=bound.epsilon, epsilon_gdp=eps_gdp, mu_theory=mu_theory, mu_estimate=mu_hat,
        delta=delta, confidence=confidence, runs=runs, steps=steps, noise_multiplier=sigma, max_grad_norm=R,
        mean_without=float(out_scores.mean()), mean_with=float(in_scores.mean()),
        std_without=float(out_scores.std(ddof=1)), std_with=float(in_scores.std(ddof=1)),
        config=dict(config.as_kwargs(), groups=groups, background=background, dim=dim, accountant=accountant,
                    secure_mode=secure_mode, seed=seed, dtype=str(dtype)))

