"""PrivacyEngine (Opacus conventions): the training loop, exact resumption, no replayed noise, refusals."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.data_loader import DPDataLoader

import fxdp
from fxdp import DPOptimizer
from tests.training.stack_helpers import (assert_close_dicts, make_loader, make_model, median_R, params_of,
                                         reference_clipped_sum)


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _setup(model, sigma=1.0, R=1.0, engine=None, optimizer_cls=torch.optim.SGD, **kwargs):
    engine = engine or fxdp.PrivacyEngine(accountant="rdp")
    loader = make_loader(n=32, batch_size=8)
    opt = optimizer_cls(model.parameters(), lr=0.1)
    out = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                              max_grad_norm=R, **kwargs)
    return (engine,) + tuple(out)


def _epoch(model, opt, loader, record=None):
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if record is not None:
            record.append({n: p.grad.clone() for n, p in model.named_parameters()})


def test_opacus_loop_noise_off_equals_replay_with_the_per_sample_reference():
    model = make_model()
    x0, y0 = next(iter(make_loader(n=32, batch_size=8)))
    R = median_R(model, x0, y0)
    keys = list(model.state_dict())
    engine, model_out, opt, loader = _setup(model, sigma=0.0, R=R)
    assert model_out is model and type(model) is type(make_model()) and list(model.state_dict()) == keys
    assert isinstance(opt, DPOptimizer) and isinstance(loader, DPDataLoader)
    shadow = make_model()  # same initial weights, plain autograd
    expected_b = loader.sample_rate * 32
    for x, y in loader:
        ref = reference_clipped_sum(shadow, x, y, R)
        with torch.no_grad():
            for n, p in shadow.named_parameters():
                p -= 0.1 * ref[n] / expected_b
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert_close_dicts(params_of(model), params_of(shadow))
    assert engine.accountant.history == [(0.0, 0.25, 4)]


def test_checkpoint_reload_continue_equals_the_uninterrupted_run_bit_for_bit():
    def run(seed):
        torch.manual_seed(seed)
        model = DropoutMLP().double()
        return _setup(model, sigma=1.0, R=0.7, optimizer_cls=torch.optim.Adam)

    engine, model, opt, loader = run(0)
    grads_a = []
    _epoch(model, opt, loader, grads_a)
    buf = io.BytesIO()
    engine.save_checkpoint(path=buf, module=model, optimizer=opt, checkpoint_dict={"epoch": 1})
    _epoch(model, opt, loader, grads_a)
    _epoch(model, opt, loader, grads_a)
    final_a, eps_a = params_of(model), engine.get_epsilon(1e-5)

    buf.seek(0)
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert {"module_state_dict", "optimizer_state_dict", "privacy_accountant_state_dict", "fxdp_state"} <= set(raw)
    engine, model, opt, loader = run(1)  # another seed: everything must come from the checkpoint
    extra = engine.load_checkpoint(path=buf, module=model, optimizer=opt)
    assert extra == {"epoch": 1}
    grads_b = []
    _epoch(model, opt, loader, grads_b)
    _epoch(model, opt, loader, grads_b)
    for n, p in params_of(model).items():
        assert torch.equal(p, final_a[n]), n
    assert engine.get_epsilon(1e-5) == eps_a
    # the resumed noise continues the stream: equal to the uninterrupted run, never an earlier draw
    resumed, earlier = grads_b, grads_a[:len(grads_a) - len(grads_b)]
    for got, want in zip(resumed, grads_a[len(earlier):]):
        assert all(torch.equal(got[n], want[n]) for n in got)
    for got in resumed:
        for old in earlier:
            assert not torch.equal(got["fc1.weight"], old["fc1.weight"])


def test_secure_mode_checkpoint_has_no_generator_state_and_resumes_with_fresh_noise():
    engine = fxdp.PrivacyEngine(accountant="rdp", secure_mode=True)
    engine, model, opt, loader = _setup(make_model(), engine=engine)
    _epoch(model, opt, loader)
    buf = io.BytesIO()
    engine.save_checkpoint(path=buf, module=model, optimizer=opt)
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert raw["fxdp_state"]["sampler_generator_state"] is None
    assert raw["optimizer_state_dict"]["fxdp"]["noise"] == {"kind": "secure"}
    updates = []
    for _ in range(2):
        e2 = fxdp.PrivacyEngine(accountant="rdp", secure_mode=True)
        e2, m2, o2, l2 = _setup(make_model(), engine=e2)
        buf.seek(0)
        e2.load_checkpoint(path=buf, module=m2, optimizer=o2)
        x, y = next(iter(l2))
        F.cross_entropy(m2(x), y).backward()
        o2.step()
        updates.append(m2.fc1.weight.grad.clone())
    assert not torch.equal(updates[0], updates[1]), "two resumes of a secure checkpoint must not share noise"
    plain = fxdp.PrivacyEngine(accountant="rdp")
    plain, m3, o3, _ = _setup(make_model(), engine=plain)
    buf.seek(0)
    with pytest.raises(ValueError, match="secure mode"):
        plain.load_checkpoint(path=buf, module=m3, optimizer=o3)


def test_secure_mode_refuses_a_noise_generator():
    with pytest.raises(ValueError, match="secure"):
        _setup(make_model(), engine=fxdp.PrivacyEngine(secure_mode=True), noise_generator=torch.Generator())


def test_ghost_grad_sample_mode_returns_the_criterion_as_fourth_element():
    crit = nn.CrossEntropyLoss()
    out = _setup(make_model(), grad_sample_mode="ghost", criterion=crit)
    assert len(out) == 5 and out[4] is not None
    # fxdp's per-sample form of it (fxdp.training.criterion): the same value for an unweighted loss
    assert isinstance(out[3], fxdp.training.criterion.PerSampleCriterion) and out[3].reduction == "mean"
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(out[3](x, y), crit(x, y))


@pytest.mark.parametrize("kwargs, match", [
    (dict(clipping="per_layer"), "clipping"),
    (dict(grad_sample_mode="ghost_fsdp"), "grad_sample_mode"),
    (dict(style="rowwise"), "ClippingStyle"),
    (dict(batch_first=False, batch_dim=0), "batch_first"),
    (dict(public_grads="drop"), "public_grads"),
])
def test_make_private_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _setup(make_model(), **kwargs)


def test_make_private_refuses_unknown_keywords_and_foreign_parameters():
    with pytest.raises(TypeError):
        _setup(make_model(), clip_per_sample=True)
    model = make_model()
    engine = fxdp.PrivacyEngine()
    with pytest.raises(ValueError, match="not the module's parameters"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1),
                            data_loader=make_loader(), noise_multiplier=1.0, max_grad_norm=1.0)


def test_already_privatized_model_with_another_configuration_is_refused():
    model = fxdp.privatize(make_model(), max_grad_norm=2.0)
    with pytest.raises(ValueError, match="already privatized"):
        _setup(model, R=1.0)
    _setup(model, R=2.0)  # the same configuration is accepted


def test_checkpoint_refuses_unsafe_loading_and_reserved_keys():
    engine, model, opt, loader = _setup(make_model())
    buf = io.BytesIO()
    with pytest.raises(ValueError, match="reserved"):
        engine.save_checkpoint(path=buf, module=model, checkpoint_dict={"fxdp_state": 1})
    engine.save_checkpoint(path=buf, module=model, optimizer=opt)
    buf.seek(0)
    with pytest.raises(ValueError, match="weights_only"):
        engine.load_checkpoint(path=buf, module=model, optimizer=opt, torch_load_kwargs={"weights_only": False})


def test_digits_example_trains_at_the_stated_epsilon_and_reports_both_accuracies():
    pytest.importorskip("sklearn")
    from examples.dp_digits import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = main(["--epochs", "1", "--epsilon", "2"])
    finally:
        torch.set_num_threads(threads)
    assert out["epsilon"] <= 2.0 and 0.0 <= out["acc_dp"] <= 1.0 and out["acc_plain"] > 0.5
