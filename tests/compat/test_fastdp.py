"""fastDP compatibility: attach makes the user's plain loop DP on the same optimizer object; detach undoes it."""
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

import fxdp
from fxdp.compat.fastdp import PrivacyEngine
from tests.reference import per_sample_gradients, reference_private_grads, split_batch
from tests.training.stack_helpers import (all_layer_groups, assert_close_dicts, ce_loss, make_data, make_model, median_R,
                                         params_of)

pytestmark = pytest.mark.filterwarnings("ignore:fxdp. privacy is accounted as Poisson sampling")


def _engine(model, **kwargs):
    base = dict(batch_size=8, sample_size=64, epochs=1, noise_multiplier=0.0, max_grad_norm=1.0)
    base.update(kwargs)
    return PrivacyEngine(model, **base)


@pytest.mark.parametrize("clipping_fn", ["Abadi", "automatic"])
def test_plain_loop_after_attach_equals_sgd_on_reference_clipped_mean(clipping_fn):
    x, y = make_data(8)
    model = make_model()
    R = median_R(model, x, y)
    before = params_of(model)
    fn = clipping_fn.lower()  # automatic clipping keeps the user's R: C = R / (norm + 0.01)
    per_sample = per_sample_gradients(make_model(), split_batch((x,), {}, y), ce_loss)
    want_sum, _ = reference_private_grads(per_sample, all_layer_groups(model), R, fn)
    engine = _engine(model, max_grad_norm=R, clipping_fn=clipping_fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.attach(optimizer)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert engine.max_grad_norm == R
    assert_close_dicts(params_of(model), {n: before[n] - 0.5 * want_sum[n] / 8 for n in before})
    assert engine.steps == 1 and len(engine.get_privacy_spent()) == 2


def test_gradient_accumulation_over_micro_batches_equals_one_step_on_the_logical_batch():
    x, y = make_data(12)
    results = []
    for parts in (1, 3):
        model = make_model()
        engine = _engine(model, batch_size=12, max_grad_norm=0.5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine.attach(optimizer)
        for i in range(parts):
            sl = slice(i * 12 // parts, (i + 1) * 12 // parts)
            F.cross_entropy(model(x[sl]), y[sl]).backward()
        optimizer.step()
        optimizer.zero_grad()
        results.append(params_of(model))
    assert_close_dicts(results[1], results[0])


def test_detach_restores_the_optimizer_and_the_model():
    model = make_model()
    engine = _engine(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(optimizer)
    assert fxdp.is_privatized(model) and optimizer.privacy_engine is engine
    engine.detach()
    assert not fxdp.is_privatized(model)
    assert "step" not in optimizer.__dict__ and not hasattr(optimizer, "privacy_engine")
    x, y = make_data(4)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # a plain step again
    assert all(p.grad is not None for p in model.parameters())


def test_lr_scheduler_created_after_attach_keeps_the_dp_step():
    x, y = make_data(8)
    model = make_model()
    engine = _engine(model, noise_multiplier=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine.attach(optimizer)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sched.step()
    assert engine.steps == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    assert engine.accountant.history == [(1.0, 8 / 64, 2)]


def test_target_epsilon_gives_opacus_sigma_and_privacy_spent_uses_fastdp_keys():
    model = make_model()
    engine = _engine(model, noise_multiplier=None, target_epsilon=2.0, target_delta=1e-5, epochs=2)
    want = opacus_sigma(target_epsilon=2.0, target_delta=1e-5, sample_rate=8 / 64, steps=16, accountant="rdp")
    assert engine.noise_multiplier == pytest.approx(want)
    spent = engine.get_privacy_spent(steps=16)
    assert set(spent) == {"eps_rdp", "alpha_rdp"} and spent["eps_rdp"] <= 2.0
    assert engine.get_privacy_spent() == {"eps_rdp": 0.0, "alpha_rdp": None}
    assert _engine(make_model(), target_delta=None).target_delta == 1 / 128


def test_block_list_clipping_style_and_origin_params_are_accepted():
    model = make_model()
    engine = _engine(model, clipping_style=["fc1", "fc2"], origin_params=["fc1"], clipping_mode="ghost")
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert fxdp.get_engine(model).config.style.value == "block-wise"
    assert fxdp.get_engine(model).plan.num_groups == 2


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(named_layers=[]), TypeError, "named_layers"),
    (dict(num_GPUs=2), ValueError, "DPDistributed"),
    (dict(noise_multiplier=1.0, target_epsilon=2.0), ValueError, "exactly one of noise_multiplier"),
    (dict(epochs=None), ValueError, "exactly one of epochs"),
    (dict(num_steps=10), ValueError, "exactly one of epochs"),
    (dict(clipping_mode="fast"), ValueError, "clipping_mode"),
    (dict(clipping_fn="soft"), ValueError, "ClippingFn"),
    (dict(clipping_style="row-wise"), ValueError, "ClippingStyle"),
    (dict(origin_params=["wte"]), ValueError, "origin_params"),
    (dict(accounting_mode="glw"), ValueError, "prv"),
    (dict(batch_size=100), ValueError, "exceeds"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
])
def test_bad_arguments_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _engine(make_model(), **kwargs)


def test_attach_twice_and_foreign_parameters_are_refused():
    model = make_model()
    engine = _engine(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(optimizer)
    with pytest.raises(ValueError, match="already attached"):
        engine.attach(optimizer)
    with pytest.raises(ValueError, match="not the module's parameters"):
        _engine(make_model()).attach(torch.optim.SGD(make_model().parameters(), lr=0.1))


def test_attach_warns_that_the_accounting_assumes_poisson_sampling():
    model = make_model()
    with pytest.warns(UserWarning, match="Poisson"):
        _engine(model).attach(torch.optim.SGD(model.parameters(), lr=0.1))
