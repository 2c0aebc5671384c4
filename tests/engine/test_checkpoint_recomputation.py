"""The recomputation a checkpoint runs in backward is held to its forward (both flavours).

Invariants: a recomputation whose mixing-relevant calls differ from the forward's (a per-batch centering
switched on between forward and backward, the same reduction over another dim, an index tensor with
other contents) is refused with a ``SampleMixingError`` before any gradient is released; a parameter use only the recomputation makes
(a reentrant region whose forward used no parameter) is refused and leaves ``p.grad`` unset; a reentrant
region with parameter uses and no input requiring grad (torch skips its backward) is refused at the
forward; any checkpoint nested in a reentrant region (parameters or not) is refused at the re-run. When
state does not change, the same models keep neighbour sensitivity <= R with noise off and match the
one-sample-at-a-time reference, also with parameter uses a rule decomposes (attention, GRU) in reentrant
and nested regions.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fxdp
from tests.models_zoo import ce_sum
from tests.reference import CHECKPOINT_FLAVOURS as FLAVOURS, check_against_reference, uncheckpointed


def private_grads(model):
    return {n: p.private_grad.detach().clone() for n, p in model.named_parameters()}


class Centering(nn.Module):
    """``mix`` (state read in the region) switches on a per-batch centering, or a reduction over ``dim``."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.reentrant, self.mix, self.dim = reentrant, False, 1

    def body(self, h):
        h = torch.tanh(self.a(h))
        if self.mix:
            h = h - 5 * h.mean(0, keepdim=True)
        h = h * torch.sigmoid(h.mean(self.dim, keepdim=True))
        return self.b(h)

    def forward(self, x):
        return self.head(checkpoint(self.body, x * 1.0, use_reentrant=self.reentrant))


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * 2, torch.randint(0, 2, (n,), generator=g)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("change", ["centering-switched-on", "reduction-dim-changed"])
def test_a_recomputation_whose_mixing_relevant_calls_differ_from_the_forward_is_refused(flavour, change):
    torch.manual_seed(0)
    model = fxdp.privatize(Centering(FLAVOURS[flavour]).double(), max_grad_norm=0.2, loss_reduction="sum")
    x, y = _data()
    loss = ce_sum(model(x.clone().requires_grad_()), y)
    if change == "centering-switched-on":
        model.mix = True
    else:
        model.dim = 0  # the same op, now across the batch
    with pytest.raises(fxdp.SampleMixingError, match="recomputation of a torch.utils.checkpoint region differs "
                                                       "from its forward.*state changed between forward and backward"):
        loss.backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_an_unchanged_recomputation_keeps_neighbour_sensitivity(flavour):
    torch.manual_seed(0)
    template, R = Centering(FLAVOURS[flavour]).double(), 0.2
    x, y = _data()
    grads = []
    for n in (8, 7):
        model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=R, loss_reduction="sum")
        ce_sum(model(x[:n].clone().requires_grad_()), y[:n]).backward()
        grads.append(private_grads(model))
    dist = math.sqrt(sum(float((grads[0][k] - grads[1][k]).square().sum()) for k in grads[0]))
    assert 0 < dist <= R * (1 + 1e-9)


FLAG = {"on": False}


class LateParameter(nn.Module):
    """A region whose forward uses no trainable parameter and whose re-run (``FLAG`` flipped) uses ``w``."""

    def __init__(self, reentrant: bool, identity: bool):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.reentrant, self.identity = reentrant, identity

    def body(self, h):
        if FLAG["on"]:
            return F.linear(h, self.w)
        return h if self.identity else torch.tanh(h)

    def forward(self, x):
        return self.head(checkpoint(self.body, self.a(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("flavour,identity", [("reentrant", False), ("reentrant", True), ("non-reentrant", False)],
                         ids=["reentrant", "reentrant-identity-forward", "non-reentrant"])
def test_a_parameter_use_only_the_recomputation_makes_is_refused(flavour, identity):
    torch.manual_seed(0)
    FLAG["on"] = False
    model = fxdp.privatize(LateParameter(FLAVOURS[flavour], identity).double(), max_grad_norm=0.01)
    x, y = _data(6)
    loss = ce_sum(model(x[:, :4]), y) / 6
    FLAG["on"] = True
    try:
        with pytest.raises(fxdp.PrivacyError, match=r"more often than its forward did \(0 uses\).*did not make"):
            loss.backward()
    finally:
        FLAG["on"] = False
    assert model.w.grad is None and getattr(model.w, "private_grad", None) is None


class RawInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.checkpointing = True

    def body(self, x):
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x):
        return self.head(checkpoint(self.body, x, use_reentrant=True) if self.checkpointing else self.body(x))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_reentrant_region_without_an_input_requiring_grad_is_refused_at_the_forward():
    torch.manual_seed(1)
    model = fxdp.privatize(RawInput().double(), max_grad_norm=1.0)
    x, _ = _data(7)
    with pytest.raises(fxdp.UncoveredParameterError,
                       match="none of whose inputs requires grad.*use_reentrant=False.*require grad") as info:
        model(x[:, :4])
    assert set(info.value.param_names) == {"a.bias", "a.weight"}


def test_a_reentrant_region_whose_input_requires_grad_matches_the_reference():
    torch.manual_seed(1)
    template = RawInput().double()
    x, y = _data(7)
    x = x[:, :4].contiguous().requires_grad_()
    check_against_reference(template, (x,), {}, y, ce_sum, reference_model=uncheckpointed(template))


class NestedWithoutParameters(nn.Module):
    """A reentrant region holding a checkpoint that uses no parameter: the nested region's own recomputation
    would run in the re-run's nested backward, where nothing checks it."""

    def __init__(self, inner_reentrant: bool):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.inner_reentrant = inner_reentrant

    def inner(self, h):
        return torch.softmax(h, -1) * 2

    def body(self, h):
        return checkpoint(self.inner, torch.tanh(h), use_reentrant=self.inner_reentrant).sum(-1, keepdim=True) * h

    def forward(self, x):
        return self.head(checkpoint(self.body, self.a(x), use_reentrant=True))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("inner", [False, True], ids=["non-reentrant-inside", "reentrant-inside"])
def test_a_parameter_free_checkpoint_nested_in_a_reentrant_region_is_refused(inner):
    torch.manual_seed(0)
    model = fxdp.privatize(NestedWithoutParameters(inner).double(), max_grad_norm=0.5)
    x, y = _data(6)
    loss = ce_sum(model(x[:, :4]), y) / 6
    with pytest.raises(fxdp.PrivacyError, match="nested inside a reentrant checkpoint region is not supported"):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())


class Permuted(nn.Module):
    """Rows taken in the order of a buffer ``order`` (the identity in the forward) inside the region."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.reentrant = reentrant
        self.register_buffer("order", torch.arange(8))

    def body(self, h):
        return self.b(torch.tanh(self.a(h))[self.order[: h.shape[0]]])

    def forward(self, x):
        return self.head(checkpoint(self.body, x * 1.0, use_reentrant=self.reentrant))


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_recomputation_indexing_with_other_contents_is_refused(flavour):
    torch.manual_seed(0)
    model = fxdp.privatize(Permuted(FLAVOURS[flavour]).double(), max_grad_norm=0.2, loss_reduction="sum")
    x, y = _data()
    loss = ce_sum(model(x.clone().requires_grad_()), y)
    model.order = torch.arange(8).flip(0)  # rows reversed: each output row comes from another sample
    with pytest.raises(fxdp.SampleMixingError, match="recomputation of a torch.utils.checkpoint region differs"):
        loss.backward()


class Decomposed(nn.Module):
    """Ops a rule decomposes into intercepted ops (attention, a GRU) in a region, optionally a reentrant
    region nested in a non-reentrant one: the decomposed calls belong to the region that binds the use."""

    def __init__(self, kind: str, outer: str):
        super().__init__()
        self.kind, self.outer, self.checkpointing = kind, outer, True
        self.inp, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.mod = nn.MultiheadAttention(8, 2, batch_first=True) if kind == "mha" else nn.GRU(8, 8, batch_first=True)

    def core(self, h):
        return self.mod(h, h, h, need_weights=False)[0] if self.kind == "mha" else self.mod(h)[0]

    def body(self, h):
        if self.outer != "nested":
            return self.core(h)
        h = torch.tanh(h)
        return checkpoint(self.core, h, use_reentrant=True) if self.checkpointing else self.core(h)

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointing:
            h = checkpoint(self.body, h, use_reentrant=self.outer == "reentrant")
        else:
            h = self.body(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["mha", "gru"])
@pytest.mark.parametrize("outer", ["reentrant", "non-reentrant", "nested"])
def test_decomposed_parameter_uses_in_a_region_replay_and_match_the_reference(kind, outer):
    torch.manual_seed(0)
    template = Decomposed(kind, outer).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g)
    check_against_reference(template, (x,), {}, y, ce_sum, reference_model=uncheckpointed(template))
