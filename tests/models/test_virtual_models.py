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

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

B = 4


class ClipScore(nn.Module):
    """Per-sample CLIP score of each image with its own caption, scaled by logit_scale.exp()."""

    def __init__(self):
        super().__init__()
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16, projection_dim=8),
            vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=1, num_attention_heads=2, projection_dim=8), projection_dim=8)
        self.clip = transformers.CLIPModel(cfg)

    def forward(self, ids, pixels):
        t = self.clip.get_text_features(input_ids=ids).pooler_output
        i = self.clip.get_image_features(pixel_values=pixels).pooler_output
        t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
        return (t * i).sum(-1) * self.clip.logit_scale.exp()


def test_clip_logit_scale_equals_reference():
    torch.manual_seed(0)
    model = ClipScore().double()
    ids, px = torch.randint(1, 40, (B, 6)), torch.randn(B, 3, 8, 8, dtype=torch.float64)
    r = check_against_reference(model, (ids, px), {}, torch.randn(B, dtype=torch.float64),
                                lambda o, y: ((o - y) ** 2).sum(), loss_reduction="sum", style="layer-wise")
    assert "clip.logit_scale" in r["engine"].plan.group_of


def test_swin_relative_position_bias_table_equals_reference():
    cfg = transformers.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1],
                                  num_heads=[2, 2], window_size=2, mlp_ratio=1.0, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(cfg).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
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


def llama():
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


@pytest.mark.parametrize("kind", ["ia3", "dora"])
def test_llama_with_peft_ia3_or_dora_equals_reference(kind):
    peft = pytest.importorskip("peft")
    if kind == "ia3":
        conf = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        conf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               use_dora=True)
    model = peft.get_peft_model(llama(), conf)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    torch.manual_seed(1)
    ids = torch.randint(1, 40, (B, 6))
    check_against_reference(model, (), {"input_ids": ids}, ids,
                            lambda o, y: fxdp.per_sample_loss(o.logits, y, shift=True), style="all-layer")
