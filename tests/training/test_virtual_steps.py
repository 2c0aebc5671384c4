"""Virtual steps: a logical Poisson batch as micro-batches equals one step on it; noise once; empty batches."""
import pytest
import torch
import torch.nn.functional as F
from opacus.data_loader import DPDataLoader
from torch.utils.data import TensorDataset

import fxdp
from fxdp import BatchMemoryManager, PrivacyError
from tests.training.stack_helpers import assert_close_dicts, make_data, make_loader, make_model, params_of


def _engine_run(sigma, micro=None, logical_steps=3, loader=None, R=0.5):
    """Train with the Opacus-style loop; return (final params, optimizer, physical batch sizes, engine)."""
    model = make_model()
    engine = fxdp.PrivacyEngine(accountant="rdp")
    loader = loader if loader is not None else make_loader(n=48, batch_size=12, sampler_seed=3)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                                             data_loader=loader, noise_multiplier=sigma, max_grad_norm=R,
                                             noise_generator=torch.Generator().manual_seed(11))
    sizes = []

    def loop(batches):
        for x, y in batches:
            sizes.append(len(x))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if opt.steps_taken == logical_steps:
                break

    if micro is None:
        loop(loader)
    else:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=micro, optimizer=opt) as mb:
            loop(mb)
    return params_of(model), opt, sizes, engine


def _make_private(n, batch_size, sampler_seed):
    """``make_private`` (σ = 1, R = 1, SGD) of a fresh model over a loader of ``n`` examples."""
    model = make_model()
    return fxdp.PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=make_loader(n=n, batch_size=batch_size, sampler_seed=sampler_seed),
        noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_micro_batched_logical_batch_equals_one_big_step_and_noise_is_drawn_once(sigma):
    want, opt_big, sizes_big, _ = _engine_run(sigma)
    got, opt_small, sizes_small, engine = _engine_run(sigma, micro=4)
    assert max(sizes_small) <= 4 and len(sizes_small) > len(sizes_big)
    assert sum(sizes_small) == sum(sizes_big) and opt_small.steps_taken == opt_big.steps_taken == 3
    assert engine.accountant.history[0][2] == 3, "the accountant counts logical steps, not micro-batches"
    # with sigma > 0 the runs agree only if each logical step drew the noise exactly once
    assert_close_dicts(got, want, rtol=1e-9, atol=1e-12)


def test_empty_poisson_batch_steps_with_noise_only_and_is_charged():
    x, y = make_data(6)
    before = params_of(make_model())

    def loader():
        return DPDataLoader(TensorDataset(x, y), sample_rate=0.05, generator=torch.Generator().manual_seed(0))

    _, _, sizes, engine = _engine_run(0.0, micro=2, logical_steps=4, loader=loader())
    assert sizes == [0, 1, 0, 0] and engine.accountant.history == [(0.0, 0.05, 4)]
    got, opt, sizes, _ = _engine_run(1.0, micro=2, logical_steps=1, loader=loader(), R=0.5)
    assert sizes == [0] and opt.expected_batch_size == pytest.approx(0.3)
    replay = torch.Generator().manual_seed(11)
    for n, p in before.items():  # lr 0.3 * (noise / 0.3): the update is the noise alone
        noise = torch.normal(0.0, 0.5, size=tuple(p.shape), generator=replay, dtype=torch.float32).double()
        torch.testing.assert_close(got[n], p - 0.3 * (noise / (0.05 * 6)), rtol=0, atol=1e-12)


def test_two_poisson_batches_for_one_step_are_refused():
    model, opt, loader = _make_private(n=32, batch_size=8, sampler_seed=1)
    batches = iter(loader)
    for _ in range(2):  # gradient accumulation across Poisson batches
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(PrivacyError, match="2 Poisson batches"):
        opt.step()


def test_skipping_a_batch_is_refused_at_the_next_step():
    model, opt, loader = _make_private(n=32, batch_size=8, sampler_seed=1)
    with pytest.raises(PrivacyError, match="Skipping a batch"):
        for i, (x, y) in enumerate(loader):
            if i == 0:
                continue  # e.g. "skip empty batches": data-dependent, refused
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def test_leaving_the_manager_mid_logical_batch_lets_zero_grad_clear_again():
    model, opt, loader = _make_private(n=48, batch_size=12, sampler_seed=3)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as mb:
        for x, y in mb:
            F.cross_entropy(model(x), y).backward()
            opt.step()  # skipped: not the end of the logical batch
            break
    opt.zero_grad()
    assert not any(hasattr(p, "private_grad") for p in model.parameters())


def test_batch_memory_manager_refuses_bad_arguments():
    loader = make_loader()
    with pytest.raises(ValueError, match="DPOptimizer"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=2,
                           optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1))
    model = make_model()
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 8.0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_physical_batch_size"):
            BatchMemoryManager(data_loader=loader, max_physical_batch_size=bad, optimizer=opt)
