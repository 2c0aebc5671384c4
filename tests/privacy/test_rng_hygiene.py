"""RNG and resume hygiene of DP training (PrivacyEngine + DPOptimizer).

- Noise is fresh at every step, and after a save/resume it continues the
  saved stream: it never repeats an earlier draw (two releases with the same
  noise, subtracted, reveal the difference of their clipped sums exactly).
- Checkpoints load with ``torch.load(weights_only=True)`` and carry the noise
  generator and the Poisson sampler's state (the resumed run draws the same
  batches and noise as the uninterrupted one).
- A second ``optimizer.step()`` without a new backward raises.
- The accountant's sample rate is the actual sampler's; a non-Poisson sampler
  is accounted as such (never as Poisson) or refused.

The noise of each step is recovered exactly from the SGD update:
``noise = -(theta' - theta) * expected_batch_size / lr - private_grad``.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

import fxdp
from tests import models_zoo as Z

N, BATCH, LR, SIGMA, R = 40, 8, 0.5, 1.0, 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _start(data_loader=None, **kwargs):
    """A training program's start: seed, model, PrivacyEngine.make_private."""
    torch.manual_seed(0)
    model = Z.MLP().double()
    engine = fxdp.PrivacyEngine(accountant="rdp")
    loader = data_loader if data_loader is not None else DataLoader(_data(), batch_size=BATCH)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                             data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=R, **kwargs)
    return model, opt, loader, engine


def _train(model, opt, loader, steps):
    """Run ``steps`` steps; return [(noise drawn at that step, sorted batch labels+features key)]."""
    out = []
    while len(out) < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            private = _flat(p.private_grad for p in model.parameters())
            before = _flat(model.parameters())
            opt.step()
            noise = -(_flat(model.parameters()) - before) * opt.expected_batch_size / LR - private
            out.append((noise, x[:, 0].sort().values.clone()))
            if len(out) == steps:
                break
    return out


def _max_abs_corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b).abs() / (a.norm() * b.norm()))


def test_noise_is_fresh_at_every_step_with_the_stated_std():
    model, opt, loader, _ = _start()
    noises = [n for n, _ in _train(model, opt, loader, 12)]
    for i in range(len(noises)):
        for j in range(i):
            assert _max_abs_corr(noises[i], noises[j]) < 0.5, f"steps {j} and {i} drew correlated noise"
    std = float(torch.stack(noises).std())
    assert abs(std / (SIGMA * R) - 1) < 0.1


def test_noise_generator_is_seeded_from_the_global_rng_never_a_fixed_constant():
    """A constant seed would give every user and every run the same noise, which
    cancels when two releases are subtracted; torch's seed makes runs reproducible."""
    def first_noise(seed):
        model, opt, loader, _ = _start()
        torch.manual_seed(seed)  # the global RNG seeds the noise generator at its first draw
        return _train(model, opt, loader, 1)[0][0]

    a, b, again = first_noise(1), first_noise(2), first_noise(1)
    assert _max_abs_corr(a, b) < 0.5
    torch.testing.assert_close(a, again, rtol=0, atol=1e-12)


def test_checkpoint_loads_with_weights_only_and_resumed_run_never_replays_earlier_noise(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, opt, loader, engine = _start()
    first = _train(model, opt, loader, 3)
    engine.save_checkpoint(path=path, module=model, optimizer=opt)
    rest = _train(model, opt, loader, 3)

    state = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    assert "module_state_dict" in state

    # A resumed program seeds torch exactly as at its start, then loads the checkpoint.
    model2, opt2, loader2, engine2 = _start()
    engine2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    resumed = _train(model2, opt2, loader2, 3)
    for k, ((noise, batch), (want_noise, want_batch)) in enumerate(zip(resumed, rest)):
        assert torch.equal(batch, want_batch), f"step {k}: the sampler's state was not restored"
        torch.testing.assert_close(noise, want_noise, rtol=0, atol=1e-12, msg=f"resumed step {k}")
        for j, (old, _) in enumerate(first):
            assert _max_abs_corr(noise, old) < 0.5, f"resumed step {k} replays the noise of step {j}"
    assert engine2.accountant.history == [(SIGMA, BATCH / N, 6)]

    # Control: the same program WITHOUT the checkpoint's noise state replays step 0's noise,
    # so the check above is able to see a replay.
    model3, opt3, loader3, _ = _start()
    model3.load_state_dict(state["module_state_dict"])
    replay = _train(model3, opt3, loader3, 1)
    assert _max_abs_corr(replay[0][0], first[0][0]) > 0.999


def test_second_step_without_a_new_backward_raises():
    model, opt, loader, _ = _start()
    x, y = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(fxdp.PrivacyError, match="without"):
        opt.step()
    opt.zero_grad()
    with pytest.raises(fxdp.PrivacyError, match="without"):
        opt.step()


@pytest.mark.parametrize("make_loader,rate", [
    (lambda: DataLoader(_data(), batch_size=BATCH), BATCH / N),
    (lambda: DPDataLoader(_data(), sample_rate=0.1, generator=torch.Generator().manual_seed(0)), 0.1),
], ids=["batch_size", "dp_data_loader"])
def test_accountant_sample_rate_and_expected_batch_size_come_from_the_sampler(make_loader, rate):
    model, opt, loader, engine = _start(make_loader())
    assert math.isclose(opt.expected_batch_size, rate * N)
    _train(model, opt, loader, 4)
    assert engine.accountant.history == [(SIGMA, rate, 4)]
    ref = create_accountant("rdp")
    ref.history = [(SIGMA, rate, 4)]
    assert math.isclose(engine.get_epsilon(1e-5), ref.get_epsilon(1e-5), rel_tol=1e-12)


def test_shuffled_fixed_size_batches_are_never_accounted_as_poisson():
    """poisson_sampling=False: each epoch is charged as one full-batch Gaussian (q = 1),
    never as q = batch/N, so the reported epsilon is an upper bound."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, opt, loader, engine = _start(DataLoader(_data(), batch_size=BATCH, shuffle=True),
                                            poisson_sampling=False)
    _train(model, opt, loader, 7)  # 1.4 epochs
    assert all(q == 1.0 for _, q, _ in engine.accountant.history), engine.accountant.history
    assert sum(n for _, _, n in engine.accountant.history) == 2
    poisson = create_accountant("rdp")
    poisson.history = [(SIGMA, BATCH / N, 7)]
    assert engine.get_epsilon(1e-5) > poisson.get_epsilon(1e-5)


@pytest.mark.parametrize("sampler", [
    lambda ds: RandomSampler(ds, replacement=True, num_samples=N),
    lambda ds: WeightedRandomSampler(torch.ones(N), num_samples=N),
], ids=["with_replacement", "weighted"])
def test_samplers_that_may_repeat_an_example_are_refused(sampler):
    ds = _data()
    with pytest.raises(fxdp.PrivacyError):
        _start(DataLoader(ds, batch_size=BATCH, sampler=sampler(ds)), poisson_sampling=False)
