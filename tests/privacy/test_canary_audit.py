"""The white-box gradient-canary audit (Nasr et al. 2023) as part of the suite.

``fxdp.audit`` trains many independent runs of a canary model through
``fxdp.privatize`` and ``fxdp.DPOptimizer`` (fxdp's own clipping, noise and
accountant), half of them with a canary, and turns the scores into a
Clopper-Pearson lower bound on epsilon (must never exceed the accountant's
epsilon) and a Gaussian-DP estimate (must be within [0.8, 1.2] x the
theoretical epsilon for the fixed seed). A planted sensitivity-2R bug must
fail the same audit.
"""
import math

import numpy as np
import pytest
import torch

import fxdp
from fxdp.auditing.stats import clopper_pearson_epsilon, delta_from_mu, epsilon_from_mu, gdp_mu_from_scores


def double_private_grads(model, optimizer):
    """Planted bug: the clipped sum counts every example twice (sensitivity 2R)."""
    for p in model.parameters():
        p.private_grad.mul_(2)


CONFIGS = [
    dict(noise_multiplier=2.0, steps=1),
    dict(noise_multiplier=4.0, steps=4, max_grad_norm=0.3),
    dict(noise_multiplier=1.0, steps=1, style="layer-wise", clipping_fn="automatic", max_grad_norm=2.5),
    dict(noise_multiplier=2.0, steps=4, style="param-wise", clipping_fn="global", loss_reduction="sum"),
    dict(noise_multiplier=1.5, steps=2, style="block-wise", groups=3, accountant="rdp", dtype=torch.float64),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_audit_lower_bound_below_accountant_and_gdp_estimate_within_20_percent_of_theory(config):
    result = fxdp.audit(runs=5000, seed=0, **config)
    assert result.epsilon_lower_bound <= result.epsilon_accountant, result.summary()
    assert result.epsilon_lower_bound <= result.epsilon_theory, result.summary()
    assert 0.8 <= result.epsilon_gdp / result.epsilon_theory <= 1.2, result.summary()
    assert result.passed and not result.failures, result.summary()
    # the canary is seen at full strength and the noise is sigma*R per step: scores in units of R
    T, sigma = result.steps, result.noise_multiplier
    assert abs(result.mean_with - result.mean_without - T) < 0.1 * T + 4 * sigma * math.sqrt(2 * T / 5000)
    assert abs(result.std_without / (sigma * math.sqrt(T)) - 1) < 0.05, result.summary()


def test_audit_fails_planted_double_sensitivity_bug_by_both_criteria():
    good = fxdp.audit(2.0, steps=1, runs=20000, seed=1)
    bad = fxdp.audit(2.0, steps=1, runs=20000, seed=1, before_step=double_private_grads)
    assert good.passed, good.summary()
    assert not bad.passed, bad.summary()
    assert bad.epsilon_lower_bound > bad.epsilon_accountant, bad.summary()
    assert bad.epsilon_gdp > 1.2 * bad.epsilon_theory, bad.summary()


def test_audit_fails_planted_bug_in_a_grouped_style():
    bad = fxdp.audit(1.0, steps=2, runs=3000, style="layer-wise", before_step=double_private_grads)
    assert not bad.passed and bad.epsilon_gdp > 1.2 * bad.epsilon_theory, bad.summary()


def test_audit_flags_a_canary_weaker_than_R_as_inconclusive():
    """Halving the clipped sums makes the canary move the update by R/2: not a leak,
    but the audit can no longer vouch for the implementation."""
    def halve(model, optimizer):
        for p in model.parameters():
            p.private_grad.mul_(0.5)

    result = fxdp.audit(1.0, steps=1, runs=3000, before_step=halve)
    assert not result.passed and result.epsilon_lower_bound <= result.epsilon_accountant
    assert any("cannot vouch" in f for f in result.failures), result.summary()


def test_audit_is_reproducible_for_a_fixed_seed():
    a = fxdp.audit(2.0, runs=500, seed=7)
    b = fxdp.audit(2.0, runs=500, seed=7)
    assert (a.epsilon_gdp, a.epsilon_lower_bound, a.mean_with) == (b.epsilon_gdp, b.epsilon_lower_bound, b.mean_with)


def test_audit_is_a_function_of_the_package_even_after_its_module_is_imported():
    import importlib

    module = importlib.import_module("fxdp.auditing.canary")
    assert fxdp.audit is module.audit
    assert isinstance(fxdp.audit(3.0, runs=200), fxdp.AuditResult)


@pytest.mark.parametrize("kwargs", [dict(noise_multiplier=0.0), dict(noise_multiplier=1.0, runs=4),
                                    dict(noise_multiplier=1.0, steps=0), dict(noise_multiplier=1.0, dim=1),
                                    dict(noise_multiplier=1.0, max_grad_norm=-1.0)])
def test_audit_refuses_configurations_it_cannot_audit(kwargs):
    with pytest.raises(ValueError):
        fxdp.audit(**kwargs)


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 4), (0.8, 3)])
def test_gdp_epsilon_of_unsubsampled_gaussian_matches_opacus_prv(sigma, steps):
    """sqrt(T)/sigma-GDP is exact for T Gaussian steps at q = 1; PRV is a tight upper bound."""
    from opacus.accountants import create_accountant

    acc = create_accountant("prv")
    acc.history = [(sigma, 1.0, steps)]
    prv = acc.get_epsilon(1e-5)
    exact = epsilon_from_mu(math.sqrt(steps) / sigma, 1e-5)
    assert exact <= prv <= 1.01 * exact
    assert abs(delta_from_mu(math.sqrt(steps) / sigma, exact) - 1e-5) < 1e-12


def test_epsilon_from_mu_edge_cases():
    assert epsilon_from_mu(0.0, 1e-5) == 0.0
    assert epsilon_from_mu(math.inf, 1e-5) == math.inf
    assert epsilon_from_mu(1e-3, 0.5) == 0.0
    assert epsilon_from_mu(1.0, 1e-5) < epsilon_from_mu(1.0, 1e-6) < epsilon_from_mu(2.0, 1e-6)
    with pytest.raises(ValueError):
        epsilon_from_mu(1.0, 0.0)


def test_clopper_pearson_bound_stays_below_true_epsilon_across_repetitions():
    """On scores of an exactly mu-GDP mechanism, the 95% lower bound never exceeds
    the true epsilon in 100 seeded repetitions (it may in <5% of them by design;
    the data-split threshold makes it far rarer)."""
    mu, delta = 1.0, 1e-5
    true_eps = epsilon_from_mu(mu, delta)
    rng = np.random.default_rng(0)
    bounds = []
    for rep in range(100):
        out, inn = rng.normal(size=2000), rng.normal(size=2000) + mu
        bounds.append(clopper_pearson_epsilon(out, inn, delta, 0.95, seed=rep).epsilon)
    assert max(bounds) <= true_eps
    assert np.median(bounds) > 0.2 * true_eps  # and it is informative


def test_gdp_mu_estimate_is_scale_free_and_zero_without_signal():
    rng = np.random.default_rng(1)
    out, inn = rng.normal(size=20000), rng.normal(size=20000) + 0.7
    assert abs(gdp_mu_from_scores(out, inn) - 0.7) < 0.05
    assert gdp_mu_from_scores(3 * out, 3 * inn) == pytest.approx(gdp_mu_from_scores(out, inn))
    assert gdp_mu_from_scores(inn, out) == 0.0
