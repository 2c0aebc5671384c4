"""DPOptimizer: noise, scaling, once-per-logical-step draws, and loud refusals."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp import DPOptimizer, PrivacyError
from tests.training.stack_helpers import (assert_close_dicts, make_data, make_model, median_R, params_of,
                                         reference_clipped_sum)


def _private_model(R, style="all-layer", loss_reduction="mean", seed=0):
    model = make_model(seed)
    return fxdp.privatize(model, style=style, max_grad_norm=R, loss_reduction=loss_reduction)


def _loss(model, x, y, reduction="mean"):
    return F.cross_entropy(model(x), y, reduction=reduction)


def _sgd_step_setup(sigma):
    """8 examples, a model privatized at R = 1 and its DPOptimizer over SGD (σ = ``sigma``, E = 8)."""
    model = _private_model(1.0)
    return (*make_data(8), model, DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sigma, 1.0, 8.0))


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_noise_off_step_equals_sgd_on_reference_clipped_sum_scaled_by_expected_batch_size(loss_reduction, style):
    x, y = make_data(8)
    R = median_R(make_model(), x, y)
    model = _private_model(R, style, loss_reduction)
    groups = [list(g) for g in fxdp.get_engine(model).plan.groups]
    want_sum = reference_clipped_sum(model, x, y, R, groups)
    before = params_of(model)
    lr, expected_b = 0.5, 10.0  # expected batch size deliberately differs from the realised 8
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=R,
                      expected_batch_size=expected_b, loss_reduction=loss_reduction)
    _loss(model, x, y, loss_reduction).backward()
    opt.step()
    scale = expected_b if loss_reduction == "mean" else 1.0
    want = {n: before[n] - lr * want_sum[n] / scale for n in before}
    assert_close_dicts(params_of(model), want)
    assert not any(hasattr(p, "private_grad") for p in model.parameters()), "private grads must be cleared"


def test_noise_std_on_zero_gradient_is_sigma_R_over_expected_batch_size():
    p = nn.Parameter(torch.zeros(200_000))
    sigma, R, B = 1.3, 0.7, 16.0
    opt = DPOptimizer(torch.optim.SGD([p], lr=0.0), sigma, R, B, generator=torch.Generator().manual_seed(0))
    p.private_grad = torch.zeros_like(p)
    opt.step()
    want = sigma * R / B
    n = p.numel()
    # sample std of n Gaussians: relative sd 1/sqrt(2n) ~ 0.16%; allow 6 sd
    assert abs(float(p.grad.std()) / want - 1) < 6 / math.sqrt(2 * n)
    assert abs(float(p.grad.mean())) < 6 * want / math.sqrt(n)


def test_secure_mode_noise_has_the_same_std():
    p = nn.Parameter(torch.zeros(200_000))
    opt = DPOptimizer(torch.optim.SGD([p], lr=0.0), 2.0, 1.0, 4.0, secure_mode=True)
    p.private_grad = torch.zeros_like(p)
    opt.step()
    assert abs(float(p.grad.std()) / 0.5 - 1) < 6 / math.sqrt(2 * p.numel())


def test_noise_is_drawn_once_per_logical_step_in_float32_from_the_generator():
    x, y = make_data(12)
    R, sigma, B = 0.8, 1.1, 12.0
    model = _private_model(R)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sigma, R, B,
                      generator=torch.Generator().manual_seed(123))
    for part in range(3):  # three backward calls accumulate into one logical batch
        _loss(model, x[4 * part:4 * part + 4], y[4 * part:4 * part + 4]).backward()
    private = {n: p.private_grad.clone() for n, p in model.named_parameters()}
    opt.step()
    replay = torch.Generator().manual_seed(123)
    for n, p in model.named_parameters():
        noise = torch.normal(0.0, sigma * R, size=tuple(p.shape), generator=replay, dtype=torch.float32)
        torch.testing.assert_close(p.grad, (private[n] + noise.double()) / B, rtol=0, atol=1e-12)


def test_noise_for_low_precision_parameters_is_a_float32_draw_cast_afterwards():
    p = nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    opt = DPOptimizer(torch.optim.SGD([p], lr=0.0), 1.0, 1.0, 2.0, generator=torch.Generator().manual_seed(5))
    p.private_grad = torch.zeros_like(p)
    opt.step()
    draw = torch.normal(0.0, 1.0, size=(1000,), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert p.grad.dtype == torch.bfloat16
    assert torch.equal(p.grad, (draw / 2.0).to(torch.bfloat16))


def test_empty_batch_step_releases_noise_only():
    R, sigma, B = 1.0, 1.0, 5.0
    model = _private_model(R, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sigma, R, B, loss_reduction="sum",
                      generator=torch.Generator().manual_seed(9))
    x, y = make_data(0)
    _loss(model, x, y, "sum").backward()
    opt.step()
    replay = torch.Generator().manual_seed(9)
    for p in model.parameters():
        noise = torch.normal(0.0, sigma * R, size=tuple(p.shape), generator=replay, dtype=torch.float32)
        torch.testing.assert_close(p.grad, noise.double(), rtol=0, atol=0)


def test_closure_is_run_once_and_noise_survives_it():
    x, y = make_data(8)
    R = median_R(make_model(), x, y)
    model = _private_model(R)
    want_sum = reference_clipped_sum(model, x, y, R)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), 1.0, R, 8.0,
                      generator=torch.Generator().manual_seed(1))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    replay = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        noise = torch.normal(0.0, R, size=tuple(p.shape), generator=replay, dtype=torch.float32).double()
        torch.testing.assert_close(p.grad, (want_sum[n] + noise) / 8.0, rtol=1e-9, atol=1e-12)


def test_public_gradient_of_a_regularizer_is_refused_and_weight_decay_gives_the_same_update():
    x, y = make_data(8)
    R, lam = 0.5, 0.3
    for policy in ("refuse", "add"):
        model = _private_model(R)
        want_sum = reference_clipped_sum(model, x, y, R)
        w = model.fc1.weight
        before = params_of(model)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), 0.0, R, 8.0, public_grads=policy)
        (_loss(model, x, y) + lam * w.square().sum()).backward()  # the regularizer is outside the forward
        if policy == "refuse":
            with pytest.raises(PrivacyError, match="public_grads='add'"):
                opt.step()
            continue
        # fc1.weight is used on data by the forward: its p.grad cannot be told from a data term
        with pytest.raises(PrivacyError, match="used these parameters on data.*weight_decay="):
            opt.step()
        model = _private_model(R)  # the same update through the inner optimizer's weight decay
        decay = [{"params": [model.fc1.weight], "weight_decay": 2 * lam},
                 {"params": [p for n, p in model.named_parameters() if n != "fc1.weight"]}]
        opt = DPOptimizer(torch.optim.SGD(decay, lr=1.0), 0.0, R, 8.0)
        _loss(model, x, y).backward()
        opt.step()
        want = {n: before[n] - want_sum[n] / 8.0 for n in before}
        want["fc1.weight"] = want["fc1.weight"] - 2 * lam * before["fc1.weight"]
        assert_close_dicts(params_of(model), want)


def test_zero_grad_without_set_to_none_is_not_a_public_gradient():
    x, y, model, opt = _sgd_step_setup(sigma=0.0)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        _loss(model, x, y).backward()
        opt.step()
    assert opt.steps_taken == 2


def test_stale_gradient_without_zero_grad_is_refused():
    x, y, model, opt = _sgd_step_setup(sigma=0.0)
    _loss(model, x, y).backward()
    opt.step()
    _loss(model, x, y).backward()
    with pytest.raises(PrivacyError, match="zero_grad"):
        opt.step()


def test_second_step_without_backward_is_refused():
    x, y, model, opt = _sgd_step_setup(sigma=1.0)
    _loss(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(PrivacyError, match="without any private gradient"):
        opt.step()


def test_parameter_without_private_grad_while_others_have_one_is_refused():
    x, y = make_data(8)
    model = _private_model(1.0)
    stray = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = DPOptimizer(torch.optim.SGD(list(model.parameters()) + [stray], lr=0.1), 1.0, 1.0, 8.0)
    _loss(model, x, y).backward()
    with pytest.raises(PrivacyError, match="no private gradient"):
        opt.step()


def test_more_than_one_poisson_batch_per_step_is_refused():
    x, y, model, opt = _sgd_step_setup(sigma=1.0)
    for _ in range(2):
        opt.notify_batch(ends_logical_batch=True)
        _loss(model, x, y).backward()
    with pytest.raises(PrivacyError, match="2 Poisson batches"):
        opt.step()


def test_lr_scheduler_drives_the_inner_optimizer_without_warnings(recwarn):
    x, y = make_data(8)
    model = _private_model(1.0)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = DPOptimizer(inner, 0.0, 1.0, 8.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.25)
    assert not [w for w in recwarn.list if "lr_scheduler" in str(w.message)]


def test_state_dict_carries_the_noise_stream_and_refuses_a_plain_one():
    p = nn.Parameter(torch.zeros(50))
    opt = DPOptimizer(torch.optim.Adam([p], lr=0.1), 1.0, 1.0, 4.0)
    p.private_grad = torch.zeros_like(p)
    opt.step()
    sd = opt.state_dict()
    p.private_grad = torch.zeros_like(p)
    opt.zero_grad()
    p.private_grad = torch.zeros_like(p)
    opt.step()
    next_grad = p.grad.clone()
    q = nn.Parameter(torch.zeros(50))
    other = DPOptimizer(torch.optim.Adam([q], lr=0.1), 1.0, 1.0, 4.0)
    other.load_state_dict(sd)
    q.private_grad = torch.zeros_like(q)
    other.step()
    assert torch.equal(q.grad, next_grad) and other.steps_taken == 2
    with pytest.raises(PrivacyError, match="no DP state"):
        DPOptimizer(torch.optim.Adam([q], lr=0.1), 1.0, 1.0, 4.0).load_state_dict(torch.optim.Adam([q]).state_dict())
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPOptimizer(torch.optim.Adam([q], lr=0.1), 1.0, 2.0, 4.0).load_state_dict(sd)


def test_max_grad_norm_cannot_be_changed_without_a_privatized_model():
    """Changing R between steps is supported when the optimizer knows the model whose bound changes
    with it (tests/privacy/test_optimizer_api.py); a bare optimizer refuses."""
    opt = DPOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), 1.0, 1.0, 4.0)
    with pytest.raises(PrivacyError, match="knows no privatized model"):
        opt.max_grad_norm = 2.0
    assert opt.max_grad_norm == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(expected_batch_size=None), "expected_batch_size"),
    (dict(expected_batch_size=0), "expected_batch_size"),
    (dict(loss_reduction="avg"), "loss_reduction"),
    (dict(public_grads="ignore"), "public_grads"),
    (dict(generator=torch.Generator(), secure_mode=True), "secure"),
])
def test_bad_arguments_are_refused(kwargs, match):
    base = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DPOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), **base)


def test_wrapping_twice_lbfgs_and_non_optimizers_are_refused():
    p = nn.Parameter(torch.zeros(2))
    opt = DPOptimizer(torch.optim.SGD([p], lr=0.1), 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="already a DPOptimizer"):
        DPOptimizer(opt, 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="LBFGS"):
        DPOptimizer(torch.optim.LBFGS([p]), 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        DPOptimizer([p], 1.0, 1.0, 4.0)


def test_noise_calibrated_to_another_bound_or_reduction_than_the_models_is_refused():
    x, y = make_data(8)
    model = fxdp.privatize(make_model())  # clips at the default R = 1, loss_reduction="mean"
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 0.1, 8.0)
    _loss(model, x, y).backward()
    with pytest.raises(PrivacyError, match="max_grad_norm=1.0 but this optimizer"):
        opt.step()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 8.0, loss_reduction="sum")
    with pytest.raises(PrivacyError, match="loss_reduction"):
        opt.step()
