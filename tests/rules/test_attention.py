"""nn.MultiheadAttention / nn.TransformerEncoder under fxdp: the decomposition of
F.multi_head_attention_forward gives exact per-sample clipped gradients (float64,
R near the median norm) for every supported argument combination, in both batch
layouts, and refuses what it does not cover."""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.rules.attention import mha_arguments, mha_forward
from fxdp.rules.base import OpCall
from tests.models.helpers import STYLES, check_against_reference

E, H, B, T = 8, 2, 4, 5


def encoder(batch_first, layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).double()


def seq_samples(x, y, bd, extra=()):
    return [((x.narrow(bd, i, 1),) + tuple(e.narrow(bd, i, 1) for e in extra), {}, y[i:i + 1]) for i in range(B)]


@pytest.mark.parametrize("batch_first,style", list(itertools.product([True, False], STYLES)))
def test_transformer_encoder_private_grads_equal_per_sample_reference(batch_first, style):
    torch.manual_seed(1)
    x = torch.randn(B, T, E, dtype=torch.float64)
    y = torch.randn(B, dtype=torch.float64)
    bd = 0 if batch_first else 1
    if not batch_first:
        x = x.transpose(0, 1).contiguous()

    def loss_fn(out, y):
        return ((out.tanh().sum((1, 2) if batch_first else (0, 2)) - y) ** 2).mean()

    r = check_against_reference(encoder(batch_first), (x,), {}, y, loss_fn, style=style,
                                samples=seq_samples(x, y, bd), batch_dim=bd)
    assert r["engine"].last_stats["batch_size"] == B


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_causal_mask_and_key_padding_are_exact(batch_first):
    """Seq-first: x is (T, B, E) while the key padding mask stays (B, T)."""
    torch.manual_seed(2)
    x = torch.randn(B, T, E, dtype=torch.float64)
    kpm = torch.zeros(B, T, dtype=torch.float64)
    kpm[0, -2:] = float("-inf")
    kpm[2, -1] = float("-inf")
    mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    y = torch.randn(B, dtype=torch.float64)
    bd = 0 if batch_first else 1
    if not batch_first:
        x = x.transpose(0, 1).contiguous()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = encoder(batch_first)

        def forward(self, x, kpm):
            return self.enc(x, mask=mask, src_key_padding_mask=kpm, is_causal=True)

    def loss_fn(out, y):
        return ((out.sum((1, 2) if batch_first else (0, 2)) - y) ** 2).mean()

    samples = [((x.narrow(bd, i, 1), kpm[i:i + 1]), {}, y[i:i + 1]) for i in range(B)]
    check_against_reference(Wrap(), (x, kpm), {}, y, loss_fn, samples=samples, batch_dim=bd)


class MHAModel(nn.Module):
    """One nn.MultiheadAttention (any options) and a linear head; returns one value per sample."""

    def __init__(self, cross=False, need_weights=False, batch_first=True, average=True, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
        self.head = nn.Linear(E, 1)
        self.cross, self.need_weights, self.batch_first, self.average = cross, need_weights, batch_first, average

    def forward(self, x, mem=None, kpm=None):
        kv = mem if self.cross else x
        out, w = self.mha(x, kv, kv, key_padding_mask=kpm, need_weights=self.need_weights,
                          average_attn_weights=self.average)
        bt = (0, 1) if self.batch_first else (1, 0)
        y = self.head(out).squeeze(-1).sum(bt[1])
        if w is not None:
            y = y + w.square().sum(tuple(range(1, w.dim())))
        return y


MHA_CASES = {
    "self": dict(),
    "need_weights": dict(need_weights=True),
    "need_weights_per_head": dict(need_weights=True, average=False),
    "no_bias": dict(bias=False),
    "cross_attention": dict(cross=True),
    "kdim_vdim": dict(cross=True, kdim=6, vdim=6),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True, need_weights=True),
    "seq_first": dict(batch_first=False),
    "seq_first_cross": dict(batch_first=False, cross=True),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_variants_are_exact(case):
    kw = dict(MHA_CASES[case])
    model = MHAModel(**kw).double()
    torch.manual_seed(3)
    x = torch.randn(B, T, E, dtype=torch.float64)
    mem = torch.randn(B, T + 1, kw.get("kdim", E), dtype=torch.float64)
    kpm = torch.zeros(B, (T + 1) if kw.get("cross") else T, dtype=torch.bool)
    kpm[1, -1] = True
    y = torch.randn(B, dtype=torch.float64)
    bd = 0
    if not kw.get("batch_first", True):
        x, mem, bd = x.transpose(0, 1).contiguous(), mem.transpose(0, 1).contiguous(), 1
    samples = [((x.narrow(bd, i, 1), mem.narrow(bd, i, 1), None if kpm is None else kpm[i:i + 1]), {}, y[i:i + 1])
               for i in range(B)]

    def loss_fn(out, y):
        return ((out - y) ** 2).mean()

    check_against_reference(model, (x, mem, kpm), {}, y, loss_fn, samples=samples, batch_dim=bd)


@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_decomposition_matches_multi_head_attention_forward(need_weights, average):
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True).double()
    q = torch.randn(T, B, E, dtype=torch.float64)
    k = torch.randn(T + 2, B, E, dtype=torch.float64)
    mask = torch.randn(T, T + 2, dtype=torch.float64)
    args = (q, k, k, E, H, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v, True, 0.0,
            mha.out_proj.weight, mha.out_proj.bias)
    kwargs = dict(training=True, need_weights=need_weights, attn_mask=mask, average_attn_weights=average)
    want = F.multi_head_attention_forward(*args, **kwargs)
    got = mha_forward(mha_arguments(OpCall(F.multi_head_attention_forward, args, kwargs, {})))
    torch.testing.assert_close(got[0], want[0])
    if need_weights:
        torch.testing.assert_close(got[1], want[1])
    else:
        assert got[1] is None and want[1] is None


def test_attention_across_the_batch_is_refused_as_sample_mixing():
    # batch_first=False but fed (B, T, E): attention runs over the batch dimension
    model = MHAModel(batch_first=False).double()
    fxdp.privatize(model)
    x = torch.randn(B, T, E, dtype=torch.float64)
    with pytest.raises(fxdp.SampleMixingError, match="mixed"):
        model(x).sum().backward()


def test_wrong_batch_dim_for_a_seq_first_encoder_is_refused():
    model = encoder(False, layers=1)
    fxdp.privatize(model)  # batch_dim defaults to 0, but the input is (T, B, E)
    x = torch.randn(T, B, E, dtype=torch.float64)
    with pytest.raises(fxdp.PrivacyError):
        model(x).sum().backward()


def test_dropout_in_attention_runs_and_gives_private_grads_for_every_parameter():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.3, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    fxdp.privatize(model, max_grad_norm=0.1)
    x = torch.randn(B, T, E)
    model(x).square().mean().backward()
    norms = fxdp.get_engine(model).last_stats["group_norms"]["all"]
    assert norms.shape == (B,) and torch.isfinite(norms).all()
    for n, p in model.named_parameters():
        assert p.private_grad.shape == p.shape, n
    total = torch.sqrt(sum(p.private_grad.square().sum() for p in model.parameters()))
    assert float(total) <= 0.1 * B * (1 + 1e-5)


def test_frozen_attention_parameters_are_not_intercepted():
    model = MHAModel()
    for p in model.mha.parameters():
        p.requires_grad_(False)
    fxdp.privatize(model)
    x = torch.randn(B, T, E)
    model(x).sum().backward()
    assert all(not hasattr(p, "private_grad") for p in model.mha.parameters())
    assert model.head.weight.private_grad.shape == model.head.weight.shape


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_cross_attention_is_exact(batch_first):
    torch.manual_seed(6)
    layer = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerDecoder(layer, 1).double()
    tgt = torch.randn(B, T, E, dtype=torch.float64)
    memory = torch.randn(B, T + 2, E, dtype=torch.float64)
    y = torch.randn(B, dtype=torch.float64)
    bd = 0 if batch_first else 1
    if not batch_first:
        tgt, memory = tgt.transpose(0, 1).contiguous(), memory.transpose(0, 1).contiguous()

    def loss_fn(out, y):
        return ((out.sum((1, 2) if batch_first else (0, 2)) - y) ** 2).mean()

    samples = [((tgt.narrow(bd, i, 1), memory.narrow(bd, i, 1)), {}, y[i:i + 1]) for i in range(B)]
    check_against_reference(model, (tgt, memory), {}, y, loss_fn, samples=samples, batch_dim=bd,
                            style="layer-wise")
