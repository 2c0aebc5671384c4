"""torch.func fallback: ops without a family rule get exact per-sample gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.reference import check_against_reference


class Uncovered(nn.Module):
    """einsum with a raw parameter, PReLU, Bilinear and ConvTranspose1d: no family rule covers them."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.prelu = nn.PReLU(4)
        self.bil = nn.Bilinear(4, 4, 3)
        self.ct = nn.ConvTranspose1d(2, 2, 3)

    def forward(self, x, z):
        h = self.prelu(torch.einsum("bi,ij->bj", x, self.w))
        return self.bil(h, h) + self.ct(z).mean(-1).sum(-1, keepdim=True)


class SeqFirstEinsum(nn.Module):
    """The fallback finds the batch of each input: (T, B, d) input, batch-free weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return torch.einsum("tbi,ij->tbj", x.transpose(0, 1), self.w).mean(0)


def _ce(o, t):
    return F.cross_entropy(o, t, reduction="sum")


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("style", ["all-layer", "param-wise", "block-wise"])
def test_ops_without_a_rule_get_exact_per_sample_gradients(style):
    torch.manual_seed(0)
    x, z, y = torch.randn(5, 6), torch.randn(5, 2, 7), torch.randint(0, 3, (5,))
    err, _, clipped = check_against_reference(Uncovered(), (x, z), {}, y, _ce, style=style)
    assert 0 < clipped < 1


def test_fallback_places_samples_of_each_input_by_analysis():
    torch.manual_seed(1)
    x, y = torch.randn(4, 4, 5), torch.randint(0, 3, (4,))  # B == T
    check_against_reference(SeqFirstEinsum(), (x,), {}, y, _ce, style="all-layer")


def test_explain_names_the_fallback_path():
    torch.manual_seed(0)
    report = fxdp.explain(Uncovered(), torch.randn(4, 6), torch.randn(4, 2, 7))
    assert any("torch.func" in str(r.get("rule", "")) for r in report.rows)
    assert not report.uncovered
