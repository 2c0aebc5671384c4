"""What one DPOptimizer step may release: one privatized model's clipped sum over one logical batch.

Each loop below exceeded R with noise off before (neighbour sensitivity, D vs D minus one example):
a BatchMemoryManager pass cut short mid logical batch carried its micro-batches into the next step
(2.4 R); two separately privatized models stepped by one optimizer each clipped an example to R
(√2 R); on the hand-written path (privatize + DPOptimizer, no fxdp loader) five PGD backward passes
cleared with ``model.zero_grad()`` -- which does not clear ``p.private_grad`` -- were released
together (6.0 R).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp import PrivacyError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _released(opt, model):
    return torch.cat([p.grad.reshape(-1) * opt.expected_batch_size for p in model.parameters()])


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
@pytest.mark.parametrize("fn", ["abadi", "automatic"])
def test_a_batch_memory_manager_pass_cut_short_never_reaches_the_next_step(style, fn):
    R = 0.05

    def first_step(x, y):
        model = _mlp()
        model, opt, loader = fxdp.PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), style=style, clipping_fn=fn,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)), noise_multiplier=0.0, max_grad_norm=R)
        released = None
        for budget in (2, None):  # the first pass stops after two micro-batches of its logical batch
            with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as micro:
                for i, (xb, yb) in enumerate(micro):
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()
                    if opt.steps_taken == 1 and released is None:
                        released = _released(opt, model)
                    opt.zero_grad()
                    if budget is not None and i + 1 == budget:
                        break
        assert opt.steps_taken == 1
        return released

    x, y = _data()
    full = first_step(x, y)
    worst = max(float((full - first_step(x[torch.arange(8) != i], y[torch.arange(8) != i])).norm()) / R
                for i in range(8))
    assert 0.5 <= worst <= 1 + 1e-9, worst


def test_two_privatized_models_stepped_by_one_optimizer_are_refused():
    a, b = fxdp.privatize(_mlp(), max_grad_norm=0.05), fxdp.privatize(_mlp(), max_grad_norm=0.05)
    opt = fxdp.DPOptimizer(torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.0), 0.0, 0.05,
                           expected_batch_size=8)
    x, y = _data()
    opt.zero_grad()
    F.cross_entropy(a(x), y).backward()
    F.cross_entropy(b(x), y).backward()
    with pytest.raises(PrivacyError, match=r"2 separately privatized models.*√2·R.*one module that holds them"):
        opt.step()


def test_backward_passes_left_in_the_private_gradients_are_refused_on_the_hand_written_path():
    model = fxdp.privatize(_mlp(), max_grad_norm=0.05)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), 0.0, 0.05, expected_batch_size=8)
    x, y = _data()
    opt.zero_grad()
    xa = x.clone()
    for _ in range(5):  # PGD written with loss.backward() and model.zero_grad()
        xa.requires_grad_(True)
        F.cross_entropy(model(xa), y).backward()
        model.zero_grad()
        xa = (xa + 0.1 * xa.grad.sign()).detach()
    F.cross_entropy(model(xa), y).backward()
    with pytest.raises(PrivacyError, match=r"48 samples.*expected size 8.*model.zero_grad\(\) does not clear"):
        opt.step()


def test_a_poisson_batch_above_its_expected_size_still_steps_on_the_hand_written_path():
    model = fxdp.privatize(_mlp(), max_grad_norm=0.05)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 0.05, expected_batch_size=8)
    x, y = _data(20)  # 20 <= 8 + 8·√8 + 8: a plausible Poisson draw
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.steps_taken == 1
