"""Small example models built from plain torch modules, as factories for the
command line (``python -m fxdp explain examples/models.py:tiny_gpt``).

A factory returns ``(model, example_args)`` or ``(model, example_args,
example_kwargs)``; it takes ``batch_size`` (the CLI's ``--batch``) and
builds its model from config with random weights (no download).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: packed q/k/v Linear, F.scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.out = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """GPT-style language model: token + position embeddings, blocks, final norm,
    and an lm_head tied to the token embedding (as GPT-2) unless ``tie=False``."""

    def __init__(self, vocab: int = 128, d_model: int = 32, n_heads: int = 4, n_layers: int = 2,
                 max_len: int = 64, tie: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.tie = tie
        self.lm_head = None if tie else nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device).unsqueeze(0)          # (1, T): lifted by fxdp
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight) if self.tie else self.lm_head(x)


def tiny_gpt(batch_size: int = 4, seq_len: int = 16, vocab: int = 128, d_model: int = 32, n_heads: int = 4,
             n_layers: int = 2, tie: bool = True, seed: int = 0):
    """A 2-layer GPT on random token ids: ``(model, (idx,))``."""
    torch.manual_seed(seed)
    model = TinyGPT(vocab, d_model, n_heads, n_layers, max_len=max(seq_len, 8), tie=tie)
    idx = torch.randint(0, vocab, (batch_size, seq_len))
    return model, (idx,)


class TinyCNN(nn.Module):
    """Conv / GroupNorm / Linear image classifier."""

    def __init__(self, channels: int = 3, width: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=2), nn.GroupNorm(4, 2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def tiny_cnn(batch_size: int = 4, image_size: int = 16, channels: int = 3, seed: int = 0):
    """A small CNN on random images: ``(model, (images,))``."""
    torch.manual_seed(seed)
    model = TinyCNN(channels)
    return model, (torch.randn(batch_size, channels, image_size, image_size),)


class ResidualBlock(nn.Module):
    """x + tanh(fc(ln(x))): one LayerNorm and one Linear, untied (a unit for ``fully_shard``)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.ln(x)))


class ResidualMLP(nn.Module):
    """Linear in, ``blocks`` :class:`ResidualBlock` s in a ``ModuleList``, Linear head. ``pool_dim``: the
    features are averaged over that dimension before the head (1 for (B, T, d_in) sequences); None: no pooling."""

    def __init__(self, d_in: int = 64, d: int = 1024, blocks: int = 8, classes: int = 10, pool_dim=None):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(ResidualBlock(d) for _ in range(blocks))
        self.head = nn.Linear(d, classes)
        self.pool_dim = pool_dim

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h if self.pool_dim is None else h.mean(self.pool_dim))


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)
