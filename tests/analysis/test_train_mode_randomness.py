"""Forwards that draw randomness or update state in training mode, per sample, train exactly (no false
refusal): dropout drawn inside an attention call that uses a parameter (fxdp.analysis.drawn_dropout)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.analysis.same_draws import check_same_draws


class RelativeBiasAttention(nn.Module):
    """T5-style: a learned relative position bias is the attn_mask of an sdpa call with dropout."""

    def __init__(self, d=8, heads=2, T=5, p=0.3):
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 3)
        self.bias = nn.Embedding(2 * T - 1, heads)
        pos = torch.arange(T)
        self.register_buffer("rel", pos[None, :] - pos[:, None] + T - 1)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias(self.rel).permute(2, 0, 1).unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, d)).sum(1)


def _attention():
    torch.manual_seed(0)
    return RelativeBiasAttention().double().train()


X = torch.randn(6, 5, 8, dtype=torch.float64)
Y = torch.randint(0, 3, (6,))


def ce(out):
    return F.cross_entropy(out, Y, reduction="none")


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_parameter_inside_attention_with_dropout_equals_same_draw_reference(style):
    check_same_draws(_attention(), lambda m: m(X), ce, style=style)


def test_parameter_inside_attention_with_dropout_under_compile_is_refused_naming_the_cause():
    m = torch.compile(fxdp.privatize(_attention()), backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(fxdp.UncoveredParameterError, match=r"dropout_p=0.3 uses trainable parameter\(s\) bias.weight"
                       r".*eager fxdp.privatize"):
        m(X)
