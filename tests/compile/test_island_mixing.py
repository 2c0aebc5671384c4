"""The structural sample-mixing check runs over code dynamo does not trace, too (the eager islands of
the hooks fallback): a ``torch.compiler.disable``'d submodule that sums over the batch only for even
batch sizes -- the analysed batch of 7 was odd, so the numeric probe saw nothing -- moved the update by
4.6 R under ``torch.compile(backend="fxdp")`` while eager mode refused it; it is refused compiled too.
A per-sample disabled submodule still trains (tests/compile/test_fallback.py checks its exactness)."""
import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.core.errors import SampleMixingError


class EvenBatchMix(nn.Module):
    """Owns its parameters directly: its hooks open the island (a disabled container without parameters
    of its own is not an island: its children are, and code between them is seen only by the probe)."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 4) / 2), nn.Parameter(torch.zeros(4))

    @torch.compiler.disable
    def forward(self, h):
        z = torch.nn.functional.linear(h, self.w, self.b)
        return z + z.sum(0 if h.shape[0] % 2 == 0 else 1, keepdim=True)


class PerSample(EvenBatchMix):
    @torch.compiler.disable
    def forward(self, h):
        z = torch.nn.functional.linear(h, self.w, self.b)
        return z + z.sum(1, keepdim=True)


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.a, self.inner = nn.Linear(4, 4), inner

    def forward(self, x):
        return self.inner(self.a(x))


def _step(compiled, x):
    compiled(x).pow(2).sum().backward()


def test_mixing_inside_a_disabled_submodule_is_refused_when_compiled():
    model = fxdp.privatize(Outer(EvenBatchMix()), max_grad_norm=1.0, loss_reduction="sum")
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "eager"})
    _step(compiled, 3 * torch.randn(7, 4))  # odd batch: per-sample
    with pytest.raises(SampleMixingError, match="sum along dim 0, the batch dimension"):
        _step(compiled, 3 * torch.randn(8, 4))


def test_a_per_sample_disabled_submodule_is_not_refused():
    model = fxdp.privatize(Outer(PerSample()), max_grad_norm=1.0, loss_reduction="sum")
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "eager"})
    for B in (7, 8):
        fxdp.clear_private_grads(model)
        _step(compiled, torch.randn(B, 4))
        assert all(p.private_grad is not None for p in model.parameters())
