"""PLD accountant (dp-accounting): reference values, the exact Gaussian composition it must bound,
σ calibration, and the plumbing (PrivacyEngine, checkpoints) that makes accountant="pld" work."""
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant as opacus_accountant
from scipy.optimize import brentq
from scipy.stats import norm

import fxdp
from fxdp.training import accounting as A
from fxdp.training.pld import FINE_DISCRETIZATION, PLDAccountant, epsilon_of_history, pld_noise_multiplier
from tests.training.stack_helpers import make_loader, make_model

SIGMA, Q, STEPS, DELTA = 1.0, 0.01, 10_000, 1e-5


def _eps(mech, history, delta=DELTA):
    acc = A.create_accountant(mech)
    acc.history = list(history)
    return A.epsilon_spent(acc, delta)


def test_reference_values_sigma_1_q_001_1e4_steps():
    """Published figures for σ=1, q=0.01, T=10⁴, δ=1e-5: RDP 6.713, PRV 6.198, PLD 6.188 (GDP 6.007
    under-estimates). PLD is the tightest of the upper bounds, and still above the CLT figure."""
    history = [(SIGMA, Q, STEPS)]
    rdp, prv, pld = (_eps(m, history) for m in ("rdp", "prv", "pld"))
    assert rdp == pytest.approx(6.713, abs=0.01)
    assert prv == pytest.approx(6.198, abs=0.01)
    assert pld == pytest.approx(6.191, abs=0.001)  # fxdp's default grid (1e-3): pessimistic, never below
    fine = epsilon_of_history(history, DELTA, FINE_DISCRETIZATION)  # dp-accounting's default grid
    assert fine == pytest.approx(6.188, abs=0.001) and fine <= pld
    assert pld < prv < rdp


def _exact_gaussian_epsilon(mu, delta):
    """ε of the Gaussian mechanism with μ = sensitivity/σ (Balle & Wang 2018, exact)."""
    def excess(eps):
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta
    return brentq(excess, 0.0, 200.0, xtol=1e-12)


@pytest.mark.parametrize("sigma, steps", [(2.0, 10), (5.0, 100), (0.8, 1)])
def test_full_batch_steps_match_the_exact_gaussian_composition(sigma, steps):
    """q = 1: k Gaussian steps at σ are one Gaussian mechanism with μ = √k/σ, whose ε is known in
    closed form. PLD must never be below it (it is an upper bound) and be within its grid of it."""
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, DELTA)
    got = epsilon_of_history([(sigma, 1.0, steps)], DELTA)
    assert exact <= got <= exact * (1 + 2e-3) + 1e-3


def test_step_merges_history_and_len_counts_steps():
    acc = PLDAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    acc.step(noise_multiplier=1.5, sample_rate=0.1)
    assert acc.history == [(1.0, 0.1, 3), (1.5, 0.1, 1)] and len(acc) == 4 and acc.mechanism() == "pld"


def test_heterogeneous_history_composes_all_entries():
    split = _eps("pld", [(SIGMA, Q, 200), (SIGMA, Q, 200)])
    whole = _eps("pld", [(SIGMA, Q, 400)])
    assert split == pytest.approx(whole, rel=1e-6)
    noisier_tail = _eps("pld", [(SIGMA, Q, 200), (2.0, Q, 200)])
    assert _eps("pld", [(SIGMA, Q, 200)]) < noisier_tail < whole


def test_zero_steps_is_zero_and_a_noiseless_step_is_infinite():
    acc = A.create_accountant("pld")
    assert A.epsilon_spent(acc, DELTA) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert A.epsilon_spent(acc, DELTA) == math.inf
    with pytest.raises(ValueError, match="infinite"):
        acc.get_epsilon(DELTA)


def test_state_dict_round_trip_and_mechanism_mismatch_refused(tmp_path):
    acc = A.create_accountant("pld")
    acc.history = [(1.1, 0.02, 300)]
    torch.save(acc.state_dict(), tmp_path / "acc.pt")
    back = A.create_accountant("pld")
    back.load_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    assert back.history == acc.history and back.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="cannot be loaded"):
        opacus_accountant("prv").load_state_dict(acc.state_dict())


def test_sigma_calibration_reaches_the_target_and_is_below_prv_and_rdp():
    kw = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=256 / 60000, epochs=2)
    sigma = A.get_noise_multiplier(accountant="pld", **kw)
    steps = A.steps_for_epochs(2, 256 / 60000)
    eps = epsilon_of_history([(sigma, 256 / 60000, steps)], 1e-5)
    assert 3.0 - 0.02 <= eps <= 3.0
    assert sigma <= A.get_noise_multiplier(accountant="prv", **kw) <= A.get_noise_multiplier(accountant="rdp", **kw)


def test_sigma_calibration_refuses_an_unreachable_budget():
    with pytest.raises(ValueError, match="too low"):
        pld_noise_multiplier(target_epsilon=1e-7, target_delta=1e-12, sample_rate=1.0, steps=10)


def test_privacy_engine_with_pld_charges_the_samplers_rate_and_calibrates_sigma():
    loader = make_loader(n=64, batch_size=16, sampler_seed=0)
    engine = fxdp.PrivacyEngine(accountant="pld")
    model = make_model()
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert engine.accountant.history == [(opt.noise_multiplier, 0.25, 8)]
    eps = engine.get_epsilon(1e-5)
    assert 3.0 - 0.05 <= eps <= 3.0
    assert eps == epsilon_of_history([(opt.noise_multiplier, 0.25, 8)], 1e-5)
