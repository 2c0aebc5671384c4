"""A tensor computed from parameters only, tiled to the batch (``u.repeat(B, 1, 1)``, ``u.repeat(B, 1, 1)`` to
B*H rows next to the heads of the queries, ``u.repeat_interleave(B, 0)``, ``u.expand(B, ...).reshape(B*H, ...)``)
is a broadcast: every sample gets the same copy, and its per-sample gradient is the sample's rows of the output
gradient folded onto ``u`` -- equal to the one-sample-at-a-time reference (float64, R at the median norm), eager
and compiled. A tiling whose rows fxdp cannot assign to the samples (the copies meet the samples' rows in
another order, or a batch-dependent tensor is repeated) is refused, and a batch-free tensor flattened into B*m
rows is refused saying what fxdp saw (not "analyse with distinct samples": the samples were distinct)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.analysis import PIPELINE, Analysis, run_pipeline
from fxdp.core.layout import LayoutKind
from tests.compile.helpers import check_compiled_against_reference
from tests.models.helpers import check_against_reference

B, T, D, H, S = 6, 5, 8, 2, 6


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def data(n=B):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, T, D, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class RepeatedToBatch(nn.Module):
    """A projection of a position table, repeated to (B, S, d) and bmm'd with the batch."""

    def __init__(self, how="repeat"):
        super().__init__()
        self.how = how
        self.table, self.proj, self.head = nn.Parameter(torch.randn(S, D)), nn.Linear(D, D), nn.Linear(S, 3)

    def forward(self, x):
        pos = self.proj(self.table).unsqueeze(0)
        pos = pos.repeat(x.size(0), 1, 1) if self.how == "repeat" else torch.tile(pos, (x.size(0), 1, 1))
        return self.head(torch.bmm(x, pos.transpose(1, 2)).mean(1))


class RepeatedToHeads(nn.Module):
    """DeBERTa-v2's disentangled attention, reduced: a batch-free (H, S, dh) key projection tiled to the B*H rows
    of the queries. ``how``: ``repeat`` / ``expand`` (B-major queries) or ``interleave`` (head-major queries,
    the copies repeated with repeat_interleave)."""

    def __init__(self, how="repeat"):
        super().__init__()
        self.how = how
        self.table, self.proj, self.q = nn.Parameter(torch.randn(S, D)), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(S, 3)

    def forward(self, x):
        n, t, d = x.shape
        q = self.q(x).view(n, t, H, d // H)
        pk = self.proj(self.table).view(S, H, d // H).transpose(0, 1)                   # (H, S, dh), batch-free
        if self.how == "interleave":
            q = q.permute(2, 0, 1, 3).reshape(H * n, t, d // H)                          # head-major rows
            pk = pk.repeat_interleave(n, 0)
        else:
            q = q.transpose(1, 2).reshape(n * H, t, d // H)                              # sample-major rows
            pk = pk.repeat(q.size(0) // H, 1, 1) if self.how == "repeat" else \
                pk.unsqueeze(0).expand(n, -1, -1, -1).reshape(n * H, S, d // H)
        s = torch.bmm(q, pk.transpose(1, 2))
        s = s.view(H, n, t, S).transpose(0, 1) if self.how == "interleave" else s.view(n, H, t, S)
        return self.head(s.mean((1, 2)))


CASES = [(RepeatedToBatch, "repeat"), (RepeatedToBatch, "tile"), (RepeatedToHeads, "repeat"),
         (RepeatedToHeads, "expand"), (RepeatedToHeads, "interleave")]


@pytest.mark.parametrize("model,how", CASES)
@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_batch_free_tensor_tiled_to_the_batch_equals_reference(model, how, style):
    torch.manual_seed(0)
    x, y = data()
    check_against_reference(model(how).double(), (x,), {}, y, sum_ce, style=style, loss_reduction="sum")


@pytest.mark.parametrize("model,how", [(RepeatedToBatch, "repeat"), (RepeatedToHeads, "repeat"),
                                       (RepeatedToHeads, "interleave")])
def test_batch_free_tensor_tiled_to_the_batch_equals_reference_compiled(model, how):
    torch.manual_seed(0)
    x, y = data()
    check_compiled_against_reference(model(how).double(), (x,), {}, y, sum_ce)


def test_tiles_get_the_layout_in_which_every_sample_holds_one_copy():
    torch.manual_seed(0)
    x, _ = data(4)
    kinds = {}
    for how in ("repeat", "interleave"):
        a = run_pipeline(Analysis(RepeatedToHeads(how).double(), (x,), {}, 4, 0, strict=True), PIPELINE)
        tile, = [e for e in a.entries if e.op in ("Tensor.repeat", "Tensor.repeat_interleave")]
        kinds[how] = tile.layout.kind
    assert kinds == {"repeat": LayoutKind.ROWS_MAJOR, "interleave": LayoutKind.ROWS_MINOR}


class CopiesInAnotherOrder(nn.Module):
    """Copies of a batch-free tensor repeated B-major (``repeat``) but met by head-major query rows.
    ``rows=H``: the (H, S, dh) projection -- sample b's rows get copies h*B+b mod H, so the samples' outputs
    depend on their position in the batch (refused by the value analysis). ``rows=1``: one (1, S, dh) copy
    repeated B*H times -- every grouping of the rows gives each sample the same values, fxdp groups them B-major,
    which is not the queries' grouping: refused by the gradient check."""

    def __init__(self, rows=H):
        super().__init__()
        self.rows = rows
        self.table, self.proj, self.q = nn.Parameter(torch.randn(S, D)), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(S, 3)

    def forward(self, x):
        n, t, d = x.shape
        q = self.q(x).view(n, t, H, d // H).permute(2, 0, 1, 3).reshape(H * n, t, d // H)
        pk = self.proj(self.table).view(S, H, d // H).transpose(0, 1)[:self.rows]
        pk = pk.repeat(n * H // self.rows, 1, 1)
        s = torch.bmm(q, pk.transpose(1, 2)).view(H, n, t, S).transpose(0, 1)
        return self.head(s.mean((1, 2)))


@pytest.mark.parametrize("rows,error,match", [
    (H, fxdp.BatchLayoutError, "could not locate the samples"),
    (1, fxdp.SampleMixingError, "gradients mix samples at Tensor.repeat")])
def test_copies_met_by_the_samples_rows_in_another_order_are_refused(rows, error, match):
    x, y = data()
    m = fxdp.privatize(CopiesInAnotherOrder(rows).double(), max_grad_norm=1.0)
    with pytest.raises(error, match=match):
        sum_ce(m(x), y).backward()


class RepeatsTheBatch(nn.Module):
    """``x.repeat(2, 1)`` of the batch read as (B, 2, d): row b holds samples 2b mod B and 2b+1 mod B."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x.mean(1))
        return self.head(h.repeat(2, 1).view(h.shape[0], 2, D).mean(1))


def test_repeat_of_the_batch_that_moves_samples_into_other_rows_is_refused():
    x, y = data()
    m = fxdp.privatize(RepeatsTheBatch().double(), max_grad_norm=1.0)
    with pytest.raises((fxdp.SampleMixingError, fxdp.BatchLayoutError), match="mixes samples|could not locate"):
        sum_ce(m(x), y).backward()


class FlattenedBatchFree(nn.Module):
    """Token types looked up as (B*T,) zeros: batch-free, B*T rows, nothing tells which rows are whose."""

    def __init__(self):
        super().__init__()
        self.types, self.head = nn.Embedding(2, D), nn.Linear(D, 3)

    def forward(self, x):
        n, t, _ = x.shape
        tt = self.types(torch.zeros(n * t, dtype=torch.long, device=x.device)).view(n, t, D)
        return self.head((x + tt).mean(1))


def test_batch_free_rows_flattened_with_the_batch_are_refused_saying_what_fxdp_saw():
    x, y = data()
    m = fxdp.privatize(FlattenedBatchFree().double(), max_grad_norm=1.0)
    with pytest.raises(fxdp.BatchLayoutError, match="does not change when the samples are reordered") as info:
        sum_ce(m(x), y).backward()
    assert "distinct samples" not in str(info.value)


class ReorderedCopies(nn.Module):
    """Copies of a batch-free tensor broadcast to the batch, then reordered with sample 0 kept in place: every
    copy is the same, so only gradients show that sample b's rows now serve sample perm[b]."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.table, self.proj, self.head = nn.Parameter(torch.randn(S, D)), nn.Linear(D, D), nn.Linear(S, 3)

    def forward(self, x):
        n = x.size(0)
        perm = torch.tensor([0] + list(range(n - 1, 0, -1)))
        pos = self.proj(self.table).unsqueeze(0)
        pos = (pos.expand(n, -1, -1) if self.how == "expand" else pos.repeat(n, 1, 1))[perm]
        return self.head(torch.bmm(x, pos.transpose(1, 2)).tanh().mean(1))


@pytest.mark.parametrize("how", ["expand", "repeat"])
def test_broadcast_copies_reordered_with_sample_zero_in_place_are_refused(how):
    x, y = data()
    m = fxdp.privatize(ReorderedCopies(how).double(), max_grad_norm=1.0)
    with pytest.raises(fxdp.SampleMixingError, match="gradients mix samples at Tensor"):
        sum_ce(m(x), y).backward()


class CopiesSwappedInTheMiddle(nn.Module):
    """Copies of a batch-free tensor broadcast to the batch and reordered by ``perm``, which keeps samples 0, 1
    and n-1 in place: ``swap`` exchanges samples 2 and 3, ``shuffle`` permutes 2..n-2 at random (fixed seed).
    ``identity`` makes the same calls and leaves every copy in place. A batch of 3 samples (the ordinary
    analysis) is not reordered; the whole batch's unseen call sequence is re-validated on every sample."""

    def __init__(self, how, order):
        super().__init__()
        self.how, self.order = how, order
        self.table, self.proj, self.head = nn.Parameter(torch.randn(S, D)), nn.Linear(D, D), nn.Linear(S, 3)

    def forward(self, x):
        n = x.size(0)
        perm = torch.arange(n)
        if n >= 5:
            middle = torch.arange(2, n - 1)
            if self.order == "swap":
                middle = torch.tensor([3, 2] + list(range(4, n - 1)))
            elif self.order == "shuffle":
                middle = middle[torch.randperm(n - 3, generator=torch.Generator().manual_seed(n))]
            perm[2:n - 1] = middle
        pos = self.proj(self.table).unsqueeze(0)
        pos = (pos.expand(n, -1, -1) if self.how == "expand" else pos.repeat(n, 1, 1))[perm]
        return self.head(torch.bmm(x, pos.transpose(1, 2)).tanh().mean(1))


@pytest.mark.parametrize("how,order,n", [("expand", "swap", 8), ("repeat", "swap", 8),
                                         ("expand", "shuffle", 32), ("repeat", "shuffle", 32)])
def test_broadcast_copies_reordered_with_samples_0_1_and_last_in_place_are_refused(how, order, n):
    """Every pair of samples is probed, not only the ones a permutation moves (sample 2's gradient of the copies
    clipped with sample 3's other gradients: 1.43 R neighbour sensitivity)."""
    x, y = data(n)
    m = fxdp.privatize(CopiesSwappedInTheMiddle(how, order).double(), max_grad_norm=1.0)
    with pytest.raises(fxdp.SampleMixingError, match="gradients mix samples at Tensor"):
        sum_ce(m(x), y).backward()


@pytest.mark.parametrize("how", ["expand", "repeat"])
def test_broadcast_copies_left_in_place_on_a_revalidated_batch_stay_exact(how):
    x, y = data(8)
    check_against_reference(CopiesSwappedInTheMiddle(how, "identity").double(), (x,), {}, y, sum_ce,
                            loss_reduction="sum")


class ReorderedCopiesToProbabilities(ReorderedCopies):
    """``ReorderedCopies`` returning softmax probabilities: an all-ones cotangent on a sample's outputs has zero
    gradient through the softmax, so only generic cotangent values show where the sample's gradient goes."""

    def forward(self, x):
        return super().forward(x).softmax(-1)


def test_reordered_copies_behind_a_softmax_output_are_refused():
    x, y = data()
    m = fxdp.privatize(ReorderedCopiesToProbabilities("expand").double(), max_grad_norm=1.0)
    with pytest.raises(fxdp.SampleMixingError, match="gradients mix samples at Tensor"):
        (-m(x).gather(1, y[:, None]).log()).sum().backward()
