"""Adaptive clipping (fxdp.training.adaptive): R converges to the target quantile, the accountant charges the
combined mechanism at the total σ, each step's sensitivity is the learned R_t, grouped styles use R_t/√G,
and combinations that make no sense are refused."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants.analysis import rdp as rdp_analysis

import fxdp
from fxdp import DPOptimizer, PrivacyError
from fxdp.training.adaptive import AdaptiveClipping, combined_noise_multiplier, gradient_noise_multiplier
from tests.privacy.neighbours import InputGradient, drop
from tests.reference import per_sample_gradients, reference_private_grads, split_batch
from tests.training.stack_helpers import ce_loss, make_data, make_loader, make_model, median_R


def known_norm_data(n=200, d=3, seed=0):
    """Rows x_b with norms 2(b+1)/n: with InputGradient, sample b's gradient is x_b, so its norm is known."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, d, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    norms = 2.0 * torch.arange(1, n + 1, dtype=torch.float64) / n
    return directions * norms[:, None], norms


def quantile_run(R0, steps, gamma=0.3, lr=0.2, count_std=0.0, sigma=0.0, seed=0):
    """Full-batch steps on known_norm_data; per step (R_t, true unclipped fraction, released fraction)."""
    x, norms = known_norm_data()
    model = fxdp.privatize(InputGradient(3), max_grad_norm=R0, loss_reduction="sum")
    ada = AdaptiveClipping(model, target_unclipped_quantile=gamma, clipbound_learning_rate=lr,
                           count_noise_multiplier=count_std)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sigma, R0, expected_batch_size=len(x),
                      loss_reduction="sum", generator=torch.Generator().manual_seed(seed), adaptive_clipping=ada)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).sum().backward()
        R = opt.max_grad_norm
        true = float((norms <= R).double().mean())
        assert int(fxdp.get_engine(model).last_stats["unclipped"].sum()) == int((norms <= R).sum())
        opt.step()
        assert opt.last_release["max_grad_norm"] == R
        trace.append((R, true, opt.last_release["unclipped_fraction"]))
    return trace, norms


@pytest.mark.parametrize("R0", [5.0, 0.05])
def test_R_converges_to_the_target_quantile_with_a_noise_free_count(R0):
    trace, norms = quantile_run(R0, steps=250)
    R, true, released = trace[-1]
    # 60 of the 200 norms (0.01 .. 0.60) lie at or below the 0.3-quantile: R ends in [0.60, 0.61)
    assert 0.6 - 1e-9 <= R < 0.61 and true == pytest.approx(0.3)
    assert released == pytest.approx(true, abs=1e-12), "a noise-free count releases the true fraction"
    assert abs(trace[0][0] - R) > 0.5 * min(R0, R), "R did move"


def test_R_stays_in_a_band_around_the_quantile_with_count_noise_of_the_stated_std():
    count_std = 4.0
    trace, _ = quantile_run(1.5, steps=400, count_std=count_std, seed=3)
    tail = trace[100:]
    assert all(0.2 <= true <= 0.4 for _, true, _ in tail), [t for _, t, _ in tail]
    Rs = [R for R, _, _ in tail]
    assert 0.5 < min(Rs) and max(Rs) < 0.75
    # released - true = N(0, σ_b²)/m: centred (no bias) and of std σ_b
    err = torch.tensor([(rel - true) * 200 for _, true, rel in trace])
    assert abs(float(err.mean())) < 3 * count_std / math.sqrt(len(err))
    assert float(err.std()) == pytest.approx(count_std, rel=0.12)


def test_gradient_noise_split_and_its_inverse():
    sigma, sb = 1.5, 1.0
    sg = gradient_noise_multiplier(sigma, sb)
    assert sg == pytest.approx((1 / sigma ** 2 - 1 / (2 * sb) ** 2) ** -0.5) and sg > sigma
    assert combined_noise_multiplier(sg, sb) == pytest.approx(sigma, rel=1e-12)
    assert gradient_noise_multiplier(0.0, 0.0) == 0.0 and gradient_noise_multiplier(0.0, 3.0) == 0.0
    with pytest.raises(ValueError, match="2 \\* count_noise_multiplier"):
        gradient_noise_multiplier(2.0, 1.0)
    with pytest.raises(ValueError, match="without noise"):
        gradient_noise_multiplier(1.0, 0.0)


def test_accountant_charges_the_total_sigma_equal_to_an_independent_computation_of_the_combined_mechanism():
    """ε from the stds the optimizer actually drew with (gradient noise measured, count noise as stated)."""
    sigma, sb, R, n, B = 1.5, 1.0, 0.7, 64, 16
    x = torch.randn(n, 20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=B)
    engine = fxdp.PrivacyEngine(accountant="rdp")
    model = InputGradient(20000)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=sigma, max_grad_norm=R, loss_reduction="sum", clipping="adaptive",
        target_unclipped_quantile=0.5, count_noise_multiplier=sb, noise_generator=torch.Generator().manual_seed(1))
    steps, measured = 0, []
    for (xb,) in loader:
        opt.zero_grad()
        model(xb).sum().backward()
        private = model.w.private_grad.clone()
        R_t = opt.max_grad_norm
        opt.step()
        measured.append(float((model.w.grad - private).std()) / R_t)  # the gradient noise std / R_t
        steps += 1
    sg = opt.last_release["gradient_noise_multiplier"]
    assert sum(measured) / steps == pytest.approx(sg, rel=0.02) and sg > sigma * 1.4
    # the combined Gaussian: whitened sensitivity sqrt((R/(σ_g R))² + ((1/2)/σ_b)²)
    sigma_eff = 1.0 / math.sqrt(sg ** -2 + (0.5 / sb) ** 2)
    q, delta = loader.sample_rate, 1e-5
    orders = engine.accountant.DEFAULT_ALPHAS
    want, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp_analysis.compute_rdp(
        q=q, noise_multiplier=sigma_eff, steps=steps, orders=orders), delta=delta)
    assert engine.accountant.history == [(sigma, q, steps)]
    assert engine.get_epsilon(delta) == pytest.approx(want, rel=1e-9)
    charged_at_sg, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp_analysis.compute_rdp(
        q=q, noise_multiplier=sg, steps=steps, orders=orders), delta=delta)
    assert charged_at_sg < 0.8 * want, "charging σ_g (Opacus #807) would under-report ε"


def test_neighbour_sensitivity_is_at_most_the_learned_R_t_at_every_step():
    """Noise off: the released update on D and on D minus its largest-norm example differ by R_t (that example
    is clipped to exactly R_t), with the R_t learned so far -- not the initial R."""
    x, y = make_data(24, seed=4)
    model = make_model(3)
    R0 = 0.75 * median_R(model, x, y)
    fxdp.privatize(model, max_grad_norm=R0)
    ada = AdaptiveClipping(model, target_unclipped_quantile=0.5, clipbound_learning_rate=0.6,
                           count_noise_multiplier=0.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), 0.0, R0, expected_batch_size=24,
                      adaptive_clipping=ada)
    Rs = []
    for t in range(6):
        twin_model, twin_opt = copy.deepcopy((model, opt))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        stats = fxdp.get_engine(model).last_stats
        norms = next(iter(stats["group_norms"].values()))
        R_t = opt.max_grad_norm
        assert 0 < int(stats["unclipped"].sum()) < 24, "some samples clipped, some not"
        i = int(norms.argmax())
        opt.step()
        (xd,), yd = drop((x,), y, i)
        twin_opt.zero_grad()
        F.cross_entropy(twin_model(xd), yd).backward()
        twin_opt.step()
        assert twin_opt.last_release["max_grad_norm"] == opt.last_release["max_grad_norm"] == R_t
        delta = math.sqrt(sum(float((p.grad - q.grad).square().sum()) for p, q in
                              zip(model.parameters(), twin_model.parameters()))) * 24
        assert R_t * (1 - 1e-6) <= delta <= R_t * (1 + 1e-9), (t, delta, R_t)
        Rs.append(R_t)
    assert max(Rs) / min(Rs) > 1.2, "R was meant to move during the test"


@pytest.mark.parametrize("style,clipping_fn", [("layer-wise", "abadi"), ("param-wise", "global"),
                                               ("all-layer", "global")])
def test_grouped_styles_clip_at_R_t_over_sqrt_G_and_count_samples_unclipped_in_every_group(style, clipping_fn):
    x, y = make_data(16, seed=5)
    model = make_model(5)
    R0 = median_R(model, x, y)
    fxdp.privatize(model, style=style, clipping_fn=clipping_fn, max_grad_norm=R0)
    groups = [list(g) for g in fxdp.get_engine(model).plan.groups]
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), 0.0, R0, expected_batch_size=16,
                      adaptive_clipping=AdaptiveClipping(model, target_unclipped_quantile=0.8,
                                                         clipbound_learning_rate=0.7, count_noise_multiplier=0.0))
    for t in range(4):
        clean = fxdp.unprivatize(copy.deepcopy(model))
        per_sample = per_sample_gradients(clean, split_batch((x,), {}, y), ce_loss)
        R_t = opt.max_grad_norm
        want, norms = reference_private_grads(per_sample, groups, R_t, clipping_fn)
        unclipped = sum(all(n <= R_t / math.sqrt(len(groups)) for n in row) for row in norms)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.private_grad, want[name], rtol=1e-9, atol=1e-12)
        opt.step()
        assert opt.last_release["unclipped_fraction"] == pytest.approx(unclipped / 16, abs=1e-12)
    assert opt.max_grad_norm != R0


def test_zero_grad_clears_the_count_with_the_private_gradients():
    x, y = make_data(8)
    model = fxdp.privatize(make_model(), max_grad_norm=1e-3)  # every sample clipped
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 0.0, 1e-3, expected_batch_size=8,
                      adaptive_clipping=AdaptiveClipping(model, count_noise_multiplier=0.0))
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad()
    fxdp.get_engine(model).clip_bound.update(1e6, 0.0, opt.adaptive_clipping)  # now every sample unclipped
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_release["unclipped_fraction"] == 1.0, "only the pass after zero_grad counts"
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fxdp.clear_private_grads(model)
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    opt.step()
    assert opt.last_release["unclipped_fraction"] == pytest.approx((4 - 4 / 2) / 8 + 0.5)


def test_refusals():
    model = fxdp.privatize(make_model(), clipping_fn="automatic")
    with pytest.raises(ValueError, match="automatic clipping"):
        AdaptiveClipping(model)
    with pytest.raises(ValueError, match="privatized"):
        AdaptiveClipping(make_model())
    engine = fxdp.PrivacyEngine()
    common = dict(data_loader=make_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    for kwargs, error, match in [
        (dict(clipping="adaptive", clipping_fn="automatic"), ValueError, "automatic clipping"),
        (dict(clipping="adaptive", count_noise_multiplier=0.4), ValueError, "2 \\* count_noise_multiplier"),
        (dict(target_unclipped_quantile=0.5), ValueError, "only apply to clipping='adaptive'"),
        (dict(clipping="adaptive", target_unclipped_quantile=1.5), ValueError, "target_unclipped_quantile"),
        (dict(clipping="adaptive", count_noise_multiplier=2.0, unclipped_num_std=2.0), ValueError, "not both"),
        (dict(clipping="adaptive", clipbound_lr=0.2), TypeError, "clipbound_lr"),
    ]:
        m = make_model()
        with pytest.raises(error, match=match):
            engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), **common, **kwargs)
    model = fxdp.privatize(make_model())
    AdaptiveClipping(model)
    with pytest.raises(ValueError, match="another adaptive clipping"):
        AdaptiveClipping(model)
    fixed = fxdp.privatize(make_model())
    ada = AdaptiveClipping(fixed, count_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        DPOptimizer(torch.optim.SGD(fixed.parameters(), lr=0.1), 1.0, 1.0, loss_reduction="sum",
                    adaptive_clipping=ada)
    with pytest.raises(ValueError, match="must agree"):
        DPOptimizer(torch.optim.SGD(fixed.parameters(), lr=0.1), 1.0, 2.0, 8, adaptive_clipping=ada)


def test_a_bound_changed_after_the_backward_is_refused_at_the_step():
    x, y = make_data(8)
    model = fxdp.privatize(make_model(), max_grad_norm=0.5)
    ada = AdaptiveClipping(model, count_noise_multiplier=0.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 0.0, 0.5, 8, adaptive_clipping=ada)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    ada.bound.update(0.9, 0.5, ada)
    with pytest.raises(PrivacyError, match="clips with max_grad_norm"):
        opt.step()


def test_explain_and_the_release_show_the_current_R_and_the_noised_fraction():
    x, y = make_data(8)
    model = fxdp.privatize(make_model(), max_grad_norm=0.5)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 0.5, 8,
                      adaptive_clipping=AdaptiveClipping(model, count_noise_multiplier=4.0))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    R, frac = opt.max_grad_norm, opt.last_release["unclipped_fraction"]
    assert R == opt.last_release["next_max_grad_norm"] != 0.5
    text = str(fxdp.explain(model, x))
    assert f"R = {R:.6g} (adaptive" in text and f"last noised unclipped fraction {frac:.4f}" in text
    assert f"max_grad_norm={R}" in repr(opt)
