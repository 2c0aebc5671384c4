"""The accountant charges the sampling the loader really does: a shuffled epoch of fixed-size batches moves
at most 2R under replace-one (charged as such), Poisson sampling draws only the examples of a subset or
subset sampler, and samplers or data sets it cannot account for are refused (:mod:`tests.privacy.loops`)."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler, TensorDataset

import fxdp
from fxdp import PrivacyError
from tests.privacy.loops import STYLES, ce, loop_data, median_R, mlp_template

def _epoch_releases(x, y, R, shuffle_seed, style="all-layer"):
    """One epoch of fixed-size batches of 2 (shuffled with a fixed permutation seed, or sequential),
    noise off, lr = 0: every step's released clipped sum, concatenated."""
    model = copy.deepcopy(mlp_template())
    gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    data = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=shuffle_seed is not None, generator=gen)
    with pytest.warns(UserWarning, match="replace-one"):
        model, opt, loader = fxdp.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=data,
            noise_multiplier=0.0, max_grad_norm=R, poisson_sampling=False, style=style)
    out = []
    for xb, yb in loader:
        opt.zero_grad()
        ce(model, xb, yb).backward()
        opt.step()
        out.extend((p.grad.detach() * opt.expected_batch_size).reshape(-1) for p in model.parameters())
    return torch.cat(out)


@pytest.mark.parametrize("style", STYLES)
def test_shuffled_epoch_moves_at_most_2R_under_replace_one(style):
    """Replace-one (the stated adjacency): one step of the epoch changes, by at most 2R; the accountant
    charges sigma / 2 for it. Removing an example instead shifts every later batch (measured 3.65 R)."""
    x, y = loop_data(8)
    R = median_R(mlp_template(), x, y)
    full = _epoch_releases(x, y, R, shuffle_seed=5, style=style)
    g = torch.Generator().manual_seed(11)
    moves = []
    for j in range(8):
        x2, y2 = x.clone(), y.clone()
        x2[j] = 3 * torch.randn(6, generator=g, dtype=torch.float64)
        y2[j] = (y[j] + 1) % 3
        moves.append(float((full - _epoch_releases(x2, y2, R, shuffle_seed=5, style=style)).norm()))
    assert max(moves) <= 2 * R * (1 + 1e-9) and max(moves) > R
    seq = _epoch_releases(x, y, R, shuffle_seed=None, style=style)
    removed = _epoch_releases(x[1:], y[1:], R, shuffle_seed=None, style=style)
    assert float((seq[:removed.numel()] - removed).norm()) > 2 * R  # why add/remove is not what is charged

    engine = fxdp.PrivacyEngine(accountant="rdp")
    model = mlp_template()
    with pytest.warns(UserWarning, match="replace-one"):
        model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                 data_loader=DataLoader(TensorDataset(x, y), batch_size=2),
                                                 noise_multiplier=1.5, max_grad_norm=R, poisson_sampling=False)
    for xb, yb in loader:
        opt.zero_grad()
        ce(model, xb, yb).backward()
        opt.step()
    assert engine.accountant.history == [(0.75, 1.0, 1)]


def _indexed(n=20):
    x, y = loop_data(n)
    return TensorDataset(x, y, torch.arange(n))


def _drawn(loader, epochs=3):
    seen = set()
    for _ in range(epochs):
        for _, _, idx in loader:
            seen.update(int(i) for i in idx)
    return seen


def test_poisson_loader_samples_only_the_subset_random_sampler_indices_and_charges_that_set():
    data = _indexed()
    train = list(range(0, 20, 2))
    model = mlp_template()
    engine = fxdp.PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=5, sampler=SubsetRandomSampler(train)),
        noise_multiplier=1.0, max_grad_norm=1.0)
    seen = _drawn(loader)
    assert seen and seen <= set(train)
    assert engine.sampling.sample_rate == pytest.approx(0.5) and opt.expected_batch_size == pytest.approx(5.0)


def test_poisson_loader_over_a_subset_samples_only_the_subset():
    data = _indexed()
    subset = Subset(data, list(range(5, 15)))
    model = mlp_template()
    engine = fxdp.PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=DataLoader(subset, batch_size=5),
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    seen = _drawn(loader)
    assert seen and seen <= set(range(5, 15)) and opt.expected_batch_size == pytest.approx(5.0)


def test_a_sampler_whose_visited_examples_are_unknown_is_refused_for_poisson_sampling():
    data = _indexed()
    weighted = torch.utils.data.WeightedRandomSampler(torch.ones(20), 20)
    model = mlp_template()
    with pytest.raises(PrivacyError, match="WeightedRandomSampler"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          data_loader=DataLoader(data, batch_size=5, sampler=weighted),
                                          noise_multiplier=1.0, max_grad_norm=1.0)



def test_a_subset_listing_an_example_twice_is_refused():
    from torch.utils.data import DataLoader, Subset, TensorDataset

    X, Y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    train = Subset(TensorDataset(X, Y), [0, 0] + list(range(1, 10)))
    model = torch.nn.Linear(4, 2)
    with pytest.raises(fxdp.PrivacyError, match="more than once"):
        fxdp.PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(train, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0)
