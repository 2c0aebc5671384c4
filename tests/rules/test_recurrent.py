"""Recurrent layers (fxdp.rules.recurrent): nn.LSTM / nn.GRU / nn.RNN decomposed into covered ops, a weight
shared across time as one parameter used T times. Against the fused kernels (forward) and the
one-sample-at-a-time reference (float64, R at the median norm)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.rules.factors import LowRankGrad, clipped_sum, inner, merge_factors, sq_norm
from tests.models.helpers import STYLES, check_against_reference

CASES = [(nn.LSTM, {}), (nn.LSTM, {"proj_size": 2}), (nn.GRU, {}), (nn.RNN, {}),
         (nn.RNN, {"nonlinearity": "relu", "bias": False})]


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_decomposition_reproduces_the_fused_kernel(cls, kw, batch_first):
    torch.manual_seed(0)
    m = cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, **kw).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    want = m(x)
    fxdp.privatize(m, batch_dim=0 if batch_first else 1)
    got = m(x)
    for a, b in zip(torch.utils._pytree.tree_flatten(want)[0], torch.utils._pytree.tree_flatten(got)[0]):
        torch.testing.assert_close(a, b)


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional recurrent layer -> per-sequence head."""

    def __init__(self, cls, batch_first=True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(10, 3)
        self.rnn = cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, **kw)
        self.head = nn.Linear(2 * kw.get("proj_size", 4), 3)

    def forward(self, ids, h0=None):
        e = self.emb(ids)
        out = self.rnn(e if self.batch_first else e.transpose(0, 1), h0)[0]
        return self.head(out.mean(1 if self.batch_first else 0))


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def data(B=6, T=5):
    torch.manual_seed(1)
    return torch.randint(0, 10, (B, T)), torch.randint(0, 3, (B,))


@pytest.mark.parametrize("cls,kw", CASES)
def test_multilayer_bidirectional_recurrent_layers_equal_reference(cls, kw):
    torch.manual_seed(0)
    ids, y = data()
    check_against_reference(Tagger(cls, **kw).double(), (ids,), {}, y, sum_ce, loss_reduction="sum",
                            style="layer-wise")


@pytest.mark.parametrize("style", STYLES)
def test_lstm_seq_first_every_style_equals_reference(style):
    torch.manual_seed(0)
    ids, y = data()
    check_against_reference(Tagger(nn.LSTM, batch_first=False).double(), (ids,), {}, y, sum_ce, style=style,
                            loss_reduction="sum")


def test_gru_with_a_user_initial_state_equals_reference():
    torch.manual_seed(0)
    ids, y = data()
    h0 = torch.randn(4, 6, 4, dtype=torch.float64)          # (layers * dirs, B, H): batch on dim 1
    samples = [((ids[i:i + 1], h0[:, i:i + 1]), {}, y[i:i + 1]) for i in range(6)]
    check_against_reference(Tagger(nn.GRU).double(), (ids, h0), {}, y, sum_ce, loss_reduction="sum",
                            samples=samples, batch_dim={0: 0, 1: 1})


def test_packed_sequences_are_refused_with_advice():
    m = fxdp.privatize(nn.LSTM(3, 4, batch_first=True))
    x = torch.randn(4, 5, 3)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 4, 2, 1]), batch_first=True)
    with pytest.raises(fxdp.BatchLayoutError, match="(?s)PackedSequence.*ragged.*pad"):
        m(packed)
    with pytest.raises(fxdp.PrivacyError, match="(?i)packed"):
        m(nn.utils.rnn.pack_padded_sequence(x[:1, :1], torch.tensor([1]), batch_first=True))  # no analysis


def test_merged_factor_of_many_uses_has_the_norm_inner_product_and_sum_of_the_parts():
    torch.manual_seed(0)
    parts = [LowRankGrad(torch.randn(3, 1, 2, 5, dtype=torch.float64), torch.randn(3, 1, 2, 4, dtype=torch.float64),
                         torch.Size((5, 4))) for _ in range(4)]
    merged, = merge_factors(parts)
    want = sum(p.materialize() for p in parts)
    torch.testing.assert_close(merged.materialize(), want)
    torch.testing.assert_close(sq_norm(merged), want.flatten(1).square().sum(1))
    coef = torch.rand(3, dtype=torch.float64)
    torch.testing.assert_close(clipped_sum(merged, coef), torch.tensordot(coef, want, dims=1))
    assert all(p.decision == "merged" for p in parts)
    assert len(merge_factors(parts[:2])) == 2          # a tied pair keeps its pairwise cross term
    torch.testing.assert_close(inner(merged, parts[0]), (want * parts[0].materialize()).flatten(1).sum(1))
