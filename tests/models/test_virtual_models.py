"""Real models whose parameters are transformed before they meet the batch (virtual parameters,
fxdp.rules.virtual), built from config with random weights, against the one-sample-at-a-time reference
(float64, R at the median norm): CLIP (logit_scale.exp()), Swin (relative position bias table gathered with
a fixed index), a nanoGPT-style model (wpe(arange(T)), lm_head tied with x @ wte.weight.t()), Llama with
PEFT IA3 and DoRA, and under torch.compile(backend="fxdp")."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.models.helpers import check_against_reference
from tests.models_zoo import ClipScore, peft_llama, swin

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

B = 4


def test_clip_logit_scale_equals_reference():
    torch.manual_seed(0)
    model = ClipScore().double()
    ids, px = torch.randint(1, 40, (B, 6)), torch.randn(B, 3, 8, 8, dtype=torch.float64)
    r = check_against_reference(model, (ids, px), {}, torch.randn(B, dtype=torch.float64),
                                lambda o, y: ((o - y) ** 2).sum(), loss_reduction="sum", style="layer-wise")
    assert "clip.logit_scale" in r["engine"].plan.group_of


def test_swin_relative_position_bias_table_equals_reference():
    model = swin()
    x, y = torch.randn(B, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (B,))
    check_against_reference(model, (x,), {}, y, lambda o, t: F.cross_entropy(o.logits, t, reduction="sum"),
                            loss_reduction="sum", style="block-wise")


class NanoGPT(nn.Module):
    """nanoGPT's embedding: wpe(arange(T)) with no batch dimension, and a head tied as x @ wte.weight.t()."""

    def __init__(self, vocab=30, d=16, T=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 24, dropout=0.0, batch_first=True)
        self.ln = nn.LayerNorm(d)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        mask = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype), 1)
        return self.ln(self.block(x, src_mask=mask)) @ self.wte.weight.t()


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_nanogpt_positions_and_tied_head_equal_reference(style):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (B, 7))
    check_against_reference(NanoGPT().double(), (ids,), {}, ids,
                            lambda o, y: fxdp.per_sample_loss(o, y, shift=True), style=style)


@pytest.mark.parametrize("kind", ["ia3", "dora"])
def test_llama_with_peft_ia3_or_dora_equals_reference(kind):
    pytest.importorskip("peft")
    model = peft_llama(kind)
    torch.manual_seed(1)
    ids = torch.randint(1, 40, (B, 6))
    check_against_reference(model, (), {"input_ids": ids}, ids,
                            lambda o, y: fxdp.per_sample_loss(o.logits, y, shift=True), style="all-layer")
