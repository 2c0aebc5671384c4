"""Folding (fxdp.engine.fold): a use's factors are computed when its gradients arrive in backward. The result
is the one finalize would compute (exact against the reference, for instantiated, ghost and tied uses); what a
ghost factor still reads is checked again at finalize; a backward retried after it failed midway is refused."""
import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.core.errors import PrivacyError
from tests.reference import check_against_reference



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Mixed(nn.Module):
    """``wide`` is a ghost use (4mn > 7T(m+n)), ``narrow`` an instantiated one used twice (dense gradients of
    its two uses summed while backward runs), ``head`` tied with ``emb``."""

    def __init__(self, V=11, d=8, wide=48):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.narrow = nn.Linear(d, d)
        self.wide = nn.Linear(d, wide, bias=False)
        self.back = nn.Linear(wide, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.narrow(h))
        h = torch.tanh(self.narrow(h)) + h
        h = self.back(torch.tanh(self.wide(h))) + h
        return self.head(h)


def _sample_loss(out, target):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum")


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_folded_factors_give_the_reference_clipped_sums(style):
    torch.manual_seed(0)
    ids, target = torch.randint(0, 11, (6, 3)), torch.randint(0, 11, (6, 3))
    worst, _, clipped = check_against_reference(Mixed(), (ids,), {}, target, _sample_loss, style=style,
                                                loss_reduction="sum")
    assert worst < 1e-9 and 0 < clipped < 1


def test_folding_records_the_decision_of_every_use():
    torch.manual_seed(0)
    model = fxdp.privatize(Mixed(), loss_reduction="sum")
    ids = torch.randint(0, 11, (4, 3))
    model(ids).sum().backward()
    decisions = fxdp.get_engine(model).last_stats["decisions"]
    assert "ghost" in decisions.values() and "instantiate" in decisions.values()


class Producer(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.first = nn.Linear(d, d, bias=False)
        self.wide = nn.Linear(d, 64, bias=False)   # T = 2: ghost norm, its factor keeps reading the input
        self.out = nn.Linear(64, 1, bias=False)

    def forward(self, x):
        h = self.first(x)
        self.a = h * 1.0
        self.h = h
        self.o = self.wide(self.a)
        return self.out(torch.tanh(self.o)).sum((1, 2))


def test_an_input_modified_in_place_after_its_ghost_use_was_folded_is_refused():
    torch.manual_seed(0)
    model = fxdp.privatize(Producer(), loss_reduction="sum")
    out = model(torch.randn(5, 2, 16))
    a = model.a

    def mix(g):  # runs after the tap of ``wide`` (already folded): rewrites its saved input
        with torch.no_grad():
            a.add_(a.mean(0, keepdim=True))

    model.h.register_hook(mix)
    with pytest.raises(PrivacyError, match="modified in place"):
        out.sum().backward()


def test_a_backward_retried_after_it_failed_midway_is_refused():
    torch.manual_seed(0)
    model = fxdp.privatize(Producer(), loss_reduction="sum")
    out = model(torch.randn(5, 2, 16))
    calls = []

    def fail_once(g):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a user hook failed")

    model.h.register_hook(fail_once)
    loss = out.sum()
    with pytest.raises(RuntimeError, match="a user hook failed"):
        loss.backward(retain_graph=True)
    with pytest.raises(PrivacyError, match="stopped midway"):
        loss.backward()
    fxdp.clear_private_grads(model)
    model(torch.randn(5, 2, 16)).sum().backward()  # a new forward trains again
    assert all(p.private_grad is not None for p in model.parameters())


def test_an_output_gradient_a_ghost_factor_keeps_changed_in_place_after_the_fold_is_refused():
    """A hook after the forward keeps the output gradient of ``wide`` (a ghost use, whose factor reads it); a
    later one rewrites it in place, after ``wide`` was folded (a review: 1.09 R)."""
    torch.manual_seed(0)
    model = fxdp.privatize(Producer(), loss_reduction="sum")
    out = model(torch.randn(5, 2, 16))
    kept = []

    def change(g):
        with torch.no_grad():
            kept[0].add_(kept[0][:1].clone())

    model.o.register_hook(kept.append)
    model.h.register_hook(change)
    with pytest.raises(PrivacyError, match="modified in place"):
        out.sum().backward()
