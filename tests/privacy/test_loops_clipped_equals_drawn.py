"""At every step the engine clipped exactly the examples the loader drew for it, once each: several views
with their own backward passes, a validation backward left in the private gradients, tokens flattened into
the batch, the wrong batch dimension, batches of another loader, micro-batches backpropagated twice -- each
refused at step time with the cause (:mod:`tests.privacy.loops`)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp import PrivacyError
from tests import models_zoo as Z
from tests.privacy.loops import (FNS, GAMMA, N, STYLES, ce, loop_data, make_private_loop, max_move, median_R,
                                 mlp_template, one_step)
from tests.privacy.neighbours import clipped_norm, per_example_sq_norms

def _views(k):
    def body(model, opt, x, y):  # k augmented views, each with its own forward and backward, one step
        opt.zero_grad()
        for v in range(k):
            ce(model, x + 0.1 * v, y).backward()
        opt.step()
    return body


def _validation_first(zero_grad_between):
    def body(model, opt, x, y):
        xv, yv = loop_data(3, seed=99)
        ce(model, xv, yv).backward()  # a validation batch's backward, e.g. to inspect gradients
        if zero_grad_between:
            opt.zero_grad()
        ce(model, x, y).backward()
        opt.step()
    return body


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("style", STYLES)
def test_several_views_each_with_its_own_backward_are_refused(style, fn):
    """Four views, four backward passes, one step: measured 4.0 R."""
    template = mlp_template()
    x, y = loop_data()
    with pytest.raises(PrivacyError, match="4 backward passes"):
        one_step(template, x, y, 1.0, style, fn, _views(4))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("style", STYLES)
def test_a_validation_backward_left_in_the_private_gradients_is_refused(style, fn):
    template = mlp_template()
    x, y = loop_data()
    with pytest.raises(PrivacyError, match="validation"):
        one_step(template, x, y, 1.0, style, fn, _validation_first(zero_grad_between=False))
    # cleared with zero_grad before the training backward: a normal step, within R
    R = median_R(template, x, y)
    top, _, model = max_move(template, x, y, R, style, fn, _validation_first(zero_grad_between=True))
    groups = fxdp.get_engine(model).plan.groups
    sq = per_example_sq_norms(template, (x,), y, Z.ce_sum)
    assert top == pytest.approx(max(clipped_norm(s, groups, R, fn, GAMMA[fn]) for s in sq), rel=1e-6)


class TokenMLP(nn.Module):
    """Per-token classifier over (B, T, d) inputs (or (B·T, d) when the loop flattens them)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


def _token_data(n=N, T=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, T), generator=g)


@pytest.mark.parametrize("fn", FNS)
def test_tokens_flattened_into_the_batch_dimension_are_refused(fn):
    """(B, T, d) flattened to (B·T, d) before the model: 4 "samples" clipped per example (measured 4.1 R)."""
    torch.manual_seed(0)
    template = TokenMLP().double()
    x, y = _token_data()

    def body(model, opt, xb, yb):
        opt.zero_grad()
        F.cross_entropy(model(xb.reshape(-1, 6)), yb.reshape(-1)).backward()
        opt.step()

    with pytest.raises(PrivacyError, match="4 rows per example"):
        one_step(template, x, y, 1.0, "all-layer", fn, body)


def test_batch_first_false_on_batch_first_data_is_refused():
    """make_private(batch_first=False) reads dim 1 (T = 4) as the batch of 6 examples (measured 1.4 R)."""
    torch.manual_seed(0)
    template = TokenMLP().double()
    x, y = _token_data()

    def body(model, opt, xb, yb):
        opt.zero_grad()
        F.cross_entropy(model(xb).reshape(-1, 3), yb.reshape(-1)).backward()
        opt.step()

    with pytest.raises(PrivacyError, match="batch_first"):
        one_step(template, x, y, 1.0, "all-layer", "abadi", body, batch_first=False)
    one_step(template, x, y, 1.0, "all-layer", "abadi", body)  # the right setting steps


def test_a_step_on_batches_of_the_original_loader_is_refused():
    """Iterating the loader passed to make_private (not the returned one) was charged as Poisson."""
    template = mlp_template()
    x, y = loop_data()
    model = copy.deepcopy(template)
    original = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)
    model, opt, _ = fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(),
                                                      lr=0.1), data_loader=original, noise_multiplier=1.0,
                                                      max_grad_norm=1.0)
    xb, yb = next(iter(original))
    opt.zero_grad()
    ce(model, xb, yb).backward()
    with pytest.raises(PrivacyError, match="without a batch drawn"):
        opt.step()


def test_batch_memory_manager_checks_each_logical_batch():
    """Micro-batches of 2, each with two backward passes: refused when the logical batch steps."""
    template = mlp_template()
    x, y = loop_data()
    model, opt, loader = make_private_loop(template, x, y, 1.0, "all-layer", "abadi")
    with pytest.raises(PrivacyError, match="2 backward passes"):
        with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as micro:
            for xb, yb in micro:
                opt.zero_grad()
                ce(model, xb, yb).backward()
                ce(model, xb, yb).backward()
                opt.step()
    assert opt.steps_taken == 0


def test_batch_memory_manager_over_a_users_dpoptimizer_checks_its_micro_batches():
    """BatchMemoryManager owns its loader even for a DPOptimizer built by hand."""
    from opacus.data_loader import DPDataLoader

    x, y = loop_data()
    model = fxdp.privatize(mlp_template(), max_grad_norm=1.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 0.0, 1.0, expected_batch_size=N)
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=1.0)
    with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=opt) as micro:
        for xb, yb in micro:
            opt.zero_grad()
            ce(model, xb, yb).backward()
            opt.step()
    assert opt.steps_taken == 1 and opt.batch_check is None
    with pytest.raises(PrivacyError, match="rows per example"):
        with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=6, optimizer=opt) as micro:
            for xb, yb in micro:
                opt.zero_grad()
                ce(model, torch.cat([xb, xb]), torch.cat([yb, yb])).backward()
                opt.step()


# ------------------------------------------------ fastDP attach with its loader
def test_fastdp_attach_with_a_loader_checks_every_step():
    from fxdp.compat.fastdp import PrivacyEngine as FastDPEngine

    x, y = loop_data(12)
    model = mlp_template()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = FastDPEngine(model, batch_size=12, sample_size=12, epochs=1, noise_multiplier=0.0,
                      clipping_fn="abadi", max_grad_norm=1.0)
    loader = dp.attach(opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=12))
    xb, yb = next(iter(loader))
    ce(model, xb, yb).backward()
    opt.step()
    opt.zero_grad()
    xb, yb = next(iter(loader))
    ce(model, xb, yb).backward()
    ce(model, xb, yb).backward()
    with pytest.raises(PrivacyError, match="2 backward passes"):
        opt.step()
    dp.detach()
    with pytest.raises(ValueError, match="sample_size"):
        FastDPEngine(model, batch_size=4, sample_size=10, epochs=1, noise_multiplier=1.0).attach(
            torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(TensorDataset(x, y), batch_size=4))
