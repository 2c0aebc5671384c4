"""Non-finite examples: one NaN/inf example must not become a membership test.

An example whose loss or per-sample gradient norm is NaN or inf contributes
zero to the clipped sum (as in jax_privacy), is counted in
``engine.last_stats["num_nonfinite"]``, and a warning says how many; the
other examples' contributions are exactly those of the batch without it, no
parameter becomes non-finite after the optimizer step, and the step is still
charged by the accountant.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from fxdp.training.accounting import attach_accountant

import fxdp
from tests import models_zoo as Z
from tests.privacy.neighbours import FunctionalReuse, drop, private_sum


def _per_sample_ce(out, y):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, y, reduction="none")


def _per_sample_lm(out, ids):
    logits = out.logits[:, :-1]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def _case(name, g):
    if name == "mlp":
        return Z.MLP().double(), torch.randn(5, 6, generator=g, dtype=torch.float64), \
            torch.randint(0, 3, (5,), generator=g), _per_sample_ce
    if name == "functional_reuse":
        return FunctionalReuse().double(), torch.randn(5, 5, generator=g, dtype=torch.float64), \
            torch.randint(0, 3, (5,), generator=g), _per_sample_ce
    if name == "cnn_groupnorm":
        return Z.CNN().double(), torch.randn(4, 3, 7, 7, generator=g, dtype=torch.float64), \
            torch.randint(0, 4, (4,), generator=g), _per_sample_ce
    if name == "embedding_layernorm":
        return Z.SeqModel().double(), torch.randint(1, 20, (5, 6), generator=g), \
            torch.randint(0, 3, (5,), generator=g), _per_sample_ce
    if name == "gpt2_tied":
        ids = torch.randint(0, 40, (4, 8), generator=g)
        return Z.gpt2(), ids, ids, _per_sample_lm
    raise KeyError(name)


POISONS = {
    "nan_input": lambda x, w, i: (_poison_input(x, i, math.nan), w),
    "inf_input": lambda x, w, i: (_poison_input(x, i, math.inf), w),
    "nan_loss": lambda x, w, i: (x, _set(w, i, math.nan)),
    "inf_loss": lambda x, w, i: (x, _set(w, i, math.inf)),
}


def _poison_input(x, i, value):
    x = x.clone()
    x[i].view(-1)[0] = value
    return x


def _set(w, i, value):
    w = w.clone()
    w[i] = value
    return w


def _loss_sum(per_sample):
    """loss_sum(out, (target, weights)) = sum_b w_b * loss_b: a weight of NaN/inf poisons one example."""
    def loss_sum(out, target):
        y, w = target
        return (per_sample(out, y) * w).sum()
    return loss_sum


CASES = [("mlp", "nan_input"), ("mlp", "inf_input"), ("mlp", "nan_loss"), ("functional_reuse", "inf_input"),
         ("functional_reuse", "nan_loss"), ("cnn_groupnorm", "nan_input"), ("embedding_layernorm", "inf_loss"),
         ("embedding_layernorm", "nan_loss"), ("gpt2_tied", "nan_loss"), ("gpt2_tied", "inf_loss")]


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("name,poison", CASES)
def test_nonfinite_example_contributes_zero_is_counted_and_warned(name, poison, style):
    torch.manual_seed(0)
    model, x, y, per_sample = _case(name, torch.Generator().manual_seed(5))
    B, bad = x.shape[0], 1
    w = torch.ones(B, dtype=torch.float64)
    px, pw = POISONS[poison](x, w, bad)
    loss_sum = _loss_sum(per_sample)
    model = fxdp.privatize(model, style=style, max_grad_norm=0.7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = private_sum(model, [((px,), (y, pw))], loss_sum)
    stats = fxdp.get_engine(model).last_stats
    assert stats["num_nonfinite"] == 1 and stats["batch_size"] == B
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert any("1 of" in m and "non-finite" in m for m in messages), messages
    want = private_sum(model, [drop((x,), (y, w), bad)], loss_sum)
    assert fxdp.get_engine(model).last_stats["num_nonfinite"] == 0
    for n in want:
        assert torch.isfinite(got[n]).all(), f"{n}: non-finite private grad"
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=f"{n}: other examples changed")


def test_several_nonfinite_examples_are_all_counted():
    model, x, y, per_sample = _case("mlp", torch.Generator().manual_seed(2))
    model = fxdp.privatize(model, max_grad_norm=1.0)
    x = _poison_input(_poison_input(x, 0, math.nan), 3, -math.inf)
    with pytest.warns(RuntimeWarning, match="2 of 5"):
        got = private_sum(model, [((x,), (y, torch.ones(5, dtype=torch.float64)))], _loss_sum(per_sample))
    assert fxdp.get_engine(model).last_stats["num_nonfinite"] == 2
    assert all(torch.isfinite(v).all() for v in got.values())


def test_float32_gradient_overflow_counts_as_nonfinite():
    """A finite loss whose per-sample gradient norm overflows float32 is dropped, not clipped to NaN."""
    model, x, y, per_sample = _case("mlp", torch.Generator().manual_seed(3))
    model = fxdp.privatize(model.float(), max_grad_norm=1.0)
    w = torch.ones(5)
    w[2] = 3e38
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got = private_sum(model, [((x.float(),), (y, w))], _loss_sum(per_sample))
    assert fxdp.get_engine(model).last_stats["num_nonfinite"] >= 1
    assert all(torch.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize("all_bad", [False, True], ids=["one_bad", "all_bad"])
def test_step_with_nonfinite_examples_keeps_parameters_finite_and_is_charged(all_bad):
    model, x, y, per_sample = _case("mlp", torch.Generator().manual_seed(4))
    model = fxdp.privatize(model, max_grad_norm=0.5)
    accountant = create_accountant("rdp")
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=0.5,
                           expected_batch_size=5, generator=torch.Generator().manual_seed(0))
    attach_accountant(opt, accountant, 0.05)
    before = copy.deepcopy(model.state_dict())
    for step in range(3):
        x_bad = x.clone()
        x_bad[step] = math.nan
        if all_bad:
            x_bad[:] = math.inf
        opt.zero_grad()
        with pytest.warns(RuntimeWarning, match="non-finite"):
            F.cross_entropy(model(x_bad), y).backward()
        opt.step()
    assert sum(n for _, _, n in accountant.history) == 3, "every step must be charged"
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{n} became non-finite"
        assert not torch.equal(p.detach(), before[n]), f"{n} did not move (noise must still be added)"


@pytest.mark.parametrize("name,value", [("mlp", math.nan), ("functional_reuse", math.inf)])
def test_nonfinite_example_in_first_batch_is_dropped_not_a_crash(name, value):
    model, x, y, per_sample = _case(name, torch.Generator().manual_seed(6))
    model = fxdp.privatize(model, max_grad_norm=1.0)
    with pytest.warns(RuntimeWarning, match="1 of 5"):
        got = private_sum(model, [((_poison_input(x, 1, value),), (y, torch.ones(5, dtype=torch.float64)))],
                          _loss_sum(per_sample))
    assert all(torch.isfinite(v).all() for v in got.values())
