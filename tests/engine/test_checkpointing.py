"""Activation checkpointing (``torch.utils.checkpoint``, both flavours) in eager private training.

Invariants: the private gradients equal the one-sample-at-a-time reference (float64, R at the median,
computed on the same model without checkpointing) in every style and clipping function; each real
parameter use is tapped once (a recomputation replays, never adds); the region's activations are not
kept by the forward (the checkpoint's memory saving); a recomputation that differs from its forward,
and a virtual parameter inside a region, are refused with fxdp errors.
"""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fxdp
from tests.models_zoo import ce_sum
from tests.reference import CHECKPOINT_FLAVOURS as FLAVOURS, check_against_reference, clipped_reference, uncheckpointed

STYLES = ["all-layer", "layer-wise", "param-wise", "block-wise"]
FNS = ["abadi", "automatic"]


class Block(nn.Module):
    def __init__(self, d=6, h=8):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.ln(x))))


class Checkpointed(nn.Module):
    """Embedding, then a checkpointed region with an embedding lookup, a layer norm, three linears and a
    parameter (``head``) used both inside the region and after it (cross terms across the boundary)."""

    def __init__(self, reentrant: bool, vocab=11, d=6, classes=3):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, classes)
        self.reentrant, self.checkpointing, self.calls = reentrant, True, 0

    def body(self, h, ids):
        self.calls += 1
        h = self.blocks[0](h + self.pos(ids))
        return h, self.head(h)

    def forward(self, ids):
        h = self.emb(ids)
        if self.checkpointing:
            h, inner = checkpoint(self.body, h, ids, use_reentrant=self.reentrant)
        else:
            h, inner = self.body(h, ids)
        return (self.head(self.blocks[1](h)) + inner).mean(1)


def data(B=5, T=4, vocab=11, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, classes, (B,), generator=g)


def reference(model, ids, y, style, fn):
    """(expected private grads, R at the median) from the model without checkpointing."""
    expected, R, _, _ = clipped_reference(model, (ids,), {}, y, ce_sum, style, fn,
                                          reference_model=uncheckpointed(model))
    return expected, R


def assert_matches(model, expected, rtol=1e-10):
    scale = max(float(e.abs().max()) for e in expected.values())
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}: p.grad written by the private path"
        err = float((p.private_grad - expected[name]).abs().max())
        assert err <= rtol * scale, f"{name}: {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_checkpointed_region_is_exact_against_the_reference(flavour, style, fn):
    torch.manual_seed(1)
    template = Checkpointed(FLAVOURS[flavour]).double()
    ids, y = data()
    expected, R = reference(template, ids, y, style, fn)
    model = fxdp.privatize(copy.deepcopy(template), style=style, clipping_fn=fn, max_grad_norm=R)
    (ce_sum(model(ids), y) / len(ids)).backward()
    unclipped = fxdp.get_engine(model).last_stats["unclipped"]
    assert 0 < int(unclipped.sum()) < len(ids) or style != "all-layer"  # R at the median: some clipped, some not
    assert_matches(model, expected)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_each_use_is_tapped_once_and_the_region_recomputed_once_per_backward(flavour):
    torch.manual_seed(2)
    template = Checkpointed(FLAVOURS[flavour]).double()
    ids, y = data()
    expected, R = reference(template, ids, y, "all-layer", "abadi")
    model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=R)
    (ce_sum(model(ids), y) / len(ids)).backward()  # the first step also runs the analysis
    fxdp.clear_private_grads(model)
    model.calls = 0
    (ce_sum(model(ids), y) / len(ids)).backward()
    assert model.calls == 2, "the forward and exactly one recomputation"
    assert fxdp.get_engine(model).ledger.batch_sizes == [len(ids)]
    assert_matches(model, expected)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_region_activations_are_not_kept_by_the_forward(flavour):
    """Non-reentrant: the taps inside the region keep their operands as checkpointed saved tensors, which
    the checkpoint drops after the forward; reentrant: the no-grad forward reserves its taps without
    operands. Without checkpointing the operands stay alive until backward."""
    seen = []

    class Probe(Checkpointed):
        def body(self, h, ids):
            self.calls += 1
            a = self.blocks[0].ln(h + self.pos(ids))
            seen.append(weakref.ref(a.untyped_storage()))  # alive while any tensor views it
            h = a + self.blocks[0].down(torch.tanh(self.blocks[0].up(a)))
            return h, self.head(h)

    torch.manual_seed(3)
    ids, y = data()
    alive = {}
    for checkpointing in (True, False):
        model = fxdp.privatize(Probe(FLAVOURS[flavour]).double())
        model(ids)  # first forward: the analysis runs it too
        seen.clear()
        model.checkpointing = checkpointing
        out = model(ids)
        gc.collect()
        alive[checkpointing] = seen[-1]() is not None
        ce_sum(out, y).backward()
    assert alive == {True: False, False: True}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_no_grad_forwards_around_a_checkpointed_step_change_nothing(flavour):
    torch.manual_seed(4)
    template = Checkpointed(FLAVOURS[flavour]).double()
    ids, y = data()
    expected, R = reference(template, ids, y, "block-wise", "abadi")
    model = fxdp.privatize(copy.deepcopy(template), style="block-wise", max_grad_norm=R)
    with torch.no_grad():
        model.eval()(ids)
    model.train()
    out = model(ids)
    with torch.no_grad():
        model(data(seed=9)[0])
    (ce_sum(out, y) / len(ids)).backward()
    with torch.no_grad():
        model(ids)
    assert_matches(model, expected)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_recomputation_that_differs_from_its_forward_is_refused(flavour):
    class Branchy(Checkpointed):
        swapped = False

        def body(self, h, ids):
            h = self.blocks[1](h) if self.swapped else self.blocks[0](h)  # state changed before backward
            return h, self.head(h)

    torch.manual_seed(5)
    ids, y = data()
    model = fxdp.privatize(Branchy(FLAVOURS[flavour]).double())
    out = model(ids)
    model.swapped = True
    with pytest.raises(fxdp.PrivacyError, match="recomputation of a .*checkpoint region differs from its forward"):
        ce_sum(out, y).backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())


def test_a_parameter_transformed_before_the_batch_inside_a_region_is_refused():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.head = nn.Parameter(torch.randn(4, 6)), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(checkpoint(lambda t: torch.tanh(t @ self.w.t()), x, use_reentrant=False))

    model = fxdp.privatize(Transposed().double())
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(fxdp.UncoveredParameterError, match="inside a torch.utils.checkpoint region"):
        ce_sum(model(x), y).backward()


class Nested(nn.Module):
    """A checkpoint inside a checkpointed function (``inner`` / ``outer`` flavours), or ``checkpoint_sequential``."""

    def __init__(self, inner: bool, outer: bool, sequential: bool = False):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh())
        self.inner, self.outer, self.sequential, self.checkpointing = inner, outer, sequential, True

    def body(self, h):
        h = torch.tanh(self.a(h))
        b = lambda t: torch.tanh(self.b(t))  # noqa: E731
        return checkpoint(b, h, use_reentrant=self.inner) if self.checkpointing else b(h)

    def forward(self, x):
        if self.sequential:
            h = torch.utils.checkpoint.checkpoint_sequential(self.seq, 2, x, use_reentrant=self.outer) \
                if self.checkpointing else self.seq(x)
        else:
            h = checkpoint(self.body, x, use_reentrant=self.outer) if self.checkpointing else self.body(x)
        return self.head(h)


def _float_data(B=5):
    g = torch.Generator().manual_seed(6)
    return torch.randn(B, 6, generator=g, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("inner,outer,sequential", [(False, False, False), (True, False, False),
                                                    (False, False, True), (False, True, True)],
                         ids=["nested-non-reentrant", "reentrant-in-non-reentrant", "sequential", "sequential-reentrant"])
def test_nested_checkpoints_and_checkpoint_sequential_are_exact(inner, outer, sequential):
    torch.manual_seed(7)
    template = Nested(inner, outer, sequential).double()
    x, y = _float_data()
    check_against_reference(template, (x,), {}, y, ce_sum, rtol=1e-10, reference_model=uncheckpointed(template))


@pytest.mark.parametrize("inner", [False, True], ids=["non-reentrant-inside", "reentrant-inside"])
def test_a_checkpoint_nested_in_a_reentrant_region_is_refused(inner):
    model = fxdp.privatize(Nested(inner, outer=True).double())
    x, y = _float_data()
    with pytest.raises(fxdp.PrivacyError, match="nested inside a reentrant checkpoint region"):
        ce_sum(model(x), y).backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_bf16_autocast_gives_the_private_gradients_of_the_uncheckpointed_model(flavour):
    """The tap's op runs again in backward (for its input gradients) under the forward's autocast state."""
    torch.manual_seed(8)
    template = Checkpointed(FLAVOURS[flavour])
    ids, y = data()
    grads = {}
    for checkpointing in (False, True):
        model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=0.05)
        model.checkpointing = checkpointing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
        (ce_sum(out.float(), y) / len(ids)).backward()
        grads[checkpointing] = {n: p.private_grad for n, p in model.named_parameters()}
    for n, g in grads[False].items():
        assert torch.allclose(grads[True][n], g, rtol=1e-5, atol=1e-6 * float(g.abs().max())), n


class Elementwise(nn.Module):
    """In-place and broadcast elementwise parameter uses inside the region (``h += b``, ``tanh(h) * g``)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.b, self.g = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.reentrant, self.checkpointing = reentrant, True

    def body(self, x):
        h = self.a(x)
        h += self.b
        return torch.tanh(h) * self.g

    def forward(self, x):
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant) if self.checkpointing else self.body(x))


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_elementwise_and_in_place_parameter_uses_in_a_region_are_exact(flavour):
    torch.manual_seed(9)
    template = Elementwise(FLAVOURS[flavour]).double()
    x, y = _float_data()
    check_against_reference(template, (x,), {}, y, ce_sum, rtol=1e-10, reference_model=uncheckpointed(template))
