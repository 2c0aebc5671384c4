"""Loops that used to end in a raw torch error (issue #13) end in an fxdp error that says why and
what to do, or work with the guarantee intact.

- ``torch.autograd.grad(loss, parameters)`` on a privatized model: refused (fxdp forms the clipped
  sum in backward() only); gradients with respect to inputs keep working, and so does training.
- ``optimizer.max_grad_norm = R`` between steps: supported; the model clips with the new R from the
  next step on, the noise is σ·R, the accountant is unchanged (R does not enter it), neighbours
  differ by at most the new R. Refused mid-step, under adaptive clipping, and without a model.
- ``public_grads="add"`` never accepts a gradient of a parameter the forward used on data: a data
  term in the loss outside the forward (``F.linear(x, model.fc1.weight)``) is refused, even though
  it reached ``p.grad`` where fxdp cannot see it; a parameter no forward used is still added.
"""
import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp import PrivacyError
from tests import models_zoo as Z
from tests.privacy.neighbours import per_example_sq_norms

N = 6


def _data(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def _template():
    torch.manual_seed(0)
    return Z.MLP().double()


# ------------------------------------------------------------------ autograd.grad w.r.t. parameters
def test_autograd_grad_with_respect_to_parameters_is_refused_with_an_fxdp_error():
    model = fxdp.privatize(_template(), max_grad_norm=1.0)
    x, y = _data()
    with pytest.raises(PrivacyError, match=r"torch.autograd.grad\(loss, parameters\) on a privatized model is not "
                                           r"supported.*loss.backward\(\).*p.private_grad"):
        torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert all(getattr(p, "private_grad", None) is None for p in model.parameters())
    with pytest.raises(PrivacyError, match="not supported"):
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y), [xr, model.fc1.weight])
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)  # input gradients: fine, nothing accumulated
    assert g.shape == x.shape and all(getattr(p, "private_grad", None) is None for p in model.parameters())
    F.cross_entropy(model(x), y).backward()  # the model still trains
    assert all(p.private_grad is not None for p in model.parameters())


# ------------------------------------------------------------------ max_grad_norm between steps
def _private(R, x=None, y=None, **kwargs):
    if x is None:
        x, y = _data()
    model = copy.deepcopy(_template())
    engine = fxdp.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)), noise_multiplier=kwargs.pop("sigma", 0.0),
        max_grad_norm=R, **kwargs)
    return engine, model, opt, loader


def _second_step_update(R1, R2, drop=None, style="all-layer", fn="abadi"):
    """Two steps on D (or D without example ``drop``; q = 1), R1 then R2 set on the optimizer between
    them; the second step's update in clipped-sum units."""
    x, y = _data()
    keep = [j for j in range(N) if j != drop]
    engine, model, opt, loader = _private(R1, x[keep], y[keep], style=style, clipping_fn=fn)
    for k, (xb, yb) in enumerate(itertools.chain(loader, loader)):  # q = 1: one batch per epoch
        for group in opt.param_groups:
            group["lr"] = float(k)  # step 1 (R1) runs but leaves D's and D-1's models equal for step 2
        if k == 1:
            opt.max_grad_norm = R2
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if k == 1:
            assert fxdp.get_engine(model).clip_bound.value == R2 and opt.max_grad_norm == R2
            return {n: (before[n] - p.detach()) * opt.expected_batch_size for n, p in model.named_parameters()}


@pytest.mark.parametrize("fn", ["abadi", "automatic"])
@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
def test_max_grad_norm_set_between_steps_bounds_the_next_step_by_the_new_R(style, fn):
    x, y = _data()
    norms = sorted(sum(s.values()) ** 0.5 for s in per_example_sq_norms(
        _template(), (x,), y, lambda out, t: F.cross_entropy(out, t, reduction="sum")))
    R1, R2 = 4 * norms[-1], 0.5 * (norms[2] + norms[3])  # step 1 clips nothing; step 2 clips at the median
    full = _second_step_update(R1, R2, style=style, fn=fn)
    moves = []
    for i in range(N):
        other = _second_step_update(R1, R2, drop=i, style=style, fn=fn)
        moves.append(math.sqrt(sum(float((full[n] - other[n]).square().sum()) for n in full)))
    assert max(moves) <= R2 * (1 + 1e-9) and max(moves) > 0.3 * R2, (moves, R2)


def _two_noised_steps(R_after):
    engine, model, opt, loader = _private(1.0, sigma=1.3)
    for k, (xb, yb) in enumerate(itertools.chain(loader, loader)):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if k == 1:
            return engine, opt
        opt.max_grad_norm = R_after


def test_max_grad_norm_change_keeps_the_noise_multiplier_and_the_accountant():
    changed, opt = _two_noised_steps(0.25)
    fixed, _ = _two_noised_steps(1.0)
    assert opt.last_release["max_grad_norm"] == 0.25 and opt.last_release["noise_multiplier"] == 1.3
    assert changed.get_epsilon(1e-5) == pytest.approx(fixed.get_epsilon(1e-5), rel=1e-12)


def test_max_grad_norm_change_is_refused_mid_step_under_adaptive_clipping_and_without_a_model():
    engine, model, opt, loader = _private(1.0)
    xb, yb = next(iter(loader))
    F.cross_entropy(model(xb), yb).backward()
    with pytest.raises(PrivacyError, match="clipped with the old R|R = 1; change it between steps"):
        opt.max_grad_norm = 0.5
    opt.step()
    with pytest.raises(ValueError, match="max_grad_norm must be"):
        opt.max_grad_norm = -1.0
    plain = fxdp.DPOptimizer(torch.optim.SGD(Z.MLP().parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(PrivacyError, match="knows no privatized model"):
        plain.max_grad_norm = 0.5
    adaptive_model = fxdp.privatize(Z.MLP(), max_grad_norm=1.0)
    ac = fxdp.AdaptiveClipping(adaptive_model, target_unclipped_quantile=0.5, count_noise_multiplier=0.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(adaptive_model.parameters(), lr=0.1), noise_multiplier=0.0,
                           max_grad_norm=1.0, expected_batch_size=4, adaptive_clipping=ac)
    with pytest.raises(PrivacyError, match="learned by adaptive clipping"):
        opt.max_grad_norm = 0.5


# ------------------------------------------------------------------ public_grads="add"
def _public_step(term, public_grads="add"):
    torch.manual_seed(0)
    model = fxdp.privatize(Z.MLP(), max_grad_norm=0.1)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.1,
                           expected_batch_size=4, public_grads=public_grads)
    opt.set_param_names(model)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    (F.cross_entropy(model(x), y) + term(model, x)).backward()
    return model, opt


def test_public_grads_add_refuses_a_data_term_computed_outside_the_forward():
    """``F.linear(x, model.fc1.weight)`` in the loss: its gradient reaches fc1.weight.grad unclipped and
    moves with every example (far beyond R); 'add' used to release it."""
    x, y = _data()
    move = (F.linear(x, torch.ones(8, 6, dtype=x.dtype)).sum() - F.linear(x[1:], torch.ones(8, 6, dtype=x.dtype)).sum())
    assert abs(float(move)) > 0.1  # the data term's value, hence its gradient, depends on each example
    model, opt = _public_step(lambda m, x: F.linear(x, m.fc1.weight).square().mean())
    with pytest.raises(PrivacyError, match=r"cannot add p.grad of fc1.weight: the privatized forward used these "
                                           r"parameters on data.*F.linear\(x, model.fc.weight\)"):
        opt.step()
    model, opt = _public_step(lambda m, x: 0.5 * m.fc1.weight.square().sum())  # weight decay: same refusal
    with pytest.raises(PrivacyError, match="weight_decay="):
        opt.step()


class WithPrior(nn.Module):
    """``scale`` is trainable but the forward never uses it: only a data-free term of the loss does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x)


def test_public_grads_add_still_adds_a_parameter_no_forward_used():
    model = fxdp.privatize(WithPrior(), max_grad_norm=0.1)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.1,
                           expected_batch_size=4, public_grads="add")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    (F.cross_entropy(model(x), y) + 0.5 * model.scale.square().sum()).backward()
    assert model.scale.private_grad.count_nonzero() == 0
    s0 = model.scale.detach().clone()
    opt.step()
    torch.testing.assert_close(model.scale.grad, s0)  # d/ds of 0.5·|s|², unclipped
