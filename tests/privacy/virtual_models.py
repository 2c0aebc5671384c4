"""Small models whose trainable parameters are transformed before they meet the batch (virtual parameters,
:mod:`fxdp.rules.virtual`), one per kind of transformation real models use."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class WeightNorm(nn.Module):
    """``g * v / ||v||`` (a parametrization: vjp per sample), with an ordinary bias in the same linear or none."""

    def __init__(self, bias=True):
        super().__init__()
        self.fc, self.head = weight_norm(nn.Linear(6, 6, bias=bias)), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


class LowRankSum(nn.Module):
    """LoRA-style ``W + A @ B``: a chain of two virtual parameters, the only parameters of its layer."""

    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = (nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6, 2)),
                                  nn.Parameter(torch.randn(2, 6)))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ (self.w + self.a @ self.b)))


class RelativeBias(nn.Module):
    """T5-style relative position bias: a table gathered with a fixed (T, T) index, added to attention scores."""

    def __init__(self, T=4, buckets=5):
        super().__init__()
        self.table, self.head = nn.Parameter(torch.randn(buckets, 1)), nn.Linear(6, 3)
        pos = torch.arange(T)
        self.register_buffer("index", (pos[None, :] - pos[:, None]).clamp(-2, 2) + 2, persistent=False)

    def forward(self, x):
        h = x.view(x.shape[0], -1, 6)
        bias = F.embedding(self.index, self.table).squeeze(-1)
        scores = h @ h.transpose(1, 2) + bias
        return self.head((scores.softmax(-1) @ h).mean(1))


class IA3(nn.Module):
    """IA3-style learned rescaling ``h * (1 + s)`` of a frozen layer's output."""

    def __init__(self):
        super().__init__()
        self.frozen, self.s, self.head = nn.Linear(6, 6), nn.Parameter(0.5 * torch.randn(6)), nn.Linear(6, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x) * (1 + self.s)))


def data(model, n=8, seed=0):
    """(x, y) for ``model``: RelativeBias takes (n, 4 * 6) rows (4 tokens of 6), the others (n, 6)."""
    g = torch.Generator().manual_seed(seed)
    width = 24 if isinstance(model, RelativeBias) else 6
    return torch.randn(n, width, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
