"""A small DiT-style diffusion transformer (Peebles & Xie 2023), ``model(x, t, y)``.

Image patches (Conv2d), a learned position table added by broadcast, a
sinusoidal timestep embedding through an MLP, a class-label embedding with a
null class (classifier-free guidance), adaLN-Zero modulation of every block
from the conditioning vector, nn.MultiheadAttention, and a modulated final
layer. Used when diffusers is not installed, and to test fxdp on raw
parameters, MHA and three inputs at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, h, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        a = modulate(self.norm1(h), s1, sc1)
        h = h + g1.unsqueeze(1) * self.attn(a, a, a, need_weights=False)[0]
        return h + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(h), s2, sc2))


class TinyDiT(nn.Module):
    """``forward(x, t, y)``: x (B, C, H, W), t (B,) or a 0-dim timestep shared by the batch, y (B,) labels.

    ``broadcast_shared_t=True`` feeds a shared timestep through the MLP once and
    broadcasts its embedding over the batch (as some code bases do); the default
    expands t to (B,) first.
    """

    def __init__(self, channels=3, size=8, patch=2, d=16, heads=2, depth=2, classes=5, freq_dim=16,
                 broadcast_shared_t=False):
        super().__init__()
        self.channels, self.patch_size, self.freq_dim, self.size = channels, patch, freq_dim, size
        self.broadcast_shared_t = broadcast_shared_t
        n = (size // patch) ** 2
        self.patch = nn.Conv2d(channels, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.1)
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.y_emb = nn.Embedding(classes + 1, d)
        self.blocks = nn.ModuleList([DiTBlock(d, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, patch * patch * channels)

    def forward(self, x, t, y):
        B = x.shape[0]
        if t.dim() == 0 and not self.broadcast_shared_t:
            t = t.expand(B)
        t_emb = self.t_mlp(timestep_embedding(t.reshape(-1), self.freq_dim).to(x.dtype))
        c = t_emb + self.y_emb(y)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
        h = self.out(modulate(self.final_norm(h), shift, scale))
        p, g = self.patch_size, self.size // self.patch_size
        h = h.reshape(B, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, self.channels, g * p, g * p)


def diffusion_loss(pred, noise):
    """Per-sample mean squared error, averaged over the batch (loss_reduction="mean")."""
    return (pred - noise).square().flatten(1).mean(1).mean()
