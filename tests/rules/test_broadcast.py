"""The broadcast family: a raw parameter used elementwise or expanded over the batch (cls token, position
table, layer-scale γ, a hand-written norm weight) gets its per-sample gradient before autograd sums over
the batch -- each use alone, and all together with cross terms, equal the one-sample-at-a-time reference."""
import pytest
import torch
import torch.nn as nn

from tests import models_zoo as Z
from tests.reference import check_against_reference


class OneRawUse(nn.Module):
    def __init__(self, kind: str, d: int = 5, T: int = 3):
        super().__init__()
        self.kind = kind
        shape = {"expand": (1, 1, d), "add": (1, T, d), "mul": (d,), "sub_rev": (T, 1)}[kind]
        self.p = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
        self.head = nn.Linear(d, 2, dtype=torch.float64)

    def forward(self, x):
        if self.kind == "expand":
            h = torch.cat([self.p.expand(x.shape[0], -1, -1), x], 1)
        elif self.kind == "add":
            h = x + self.p
        elif self.kind == "mul":
            h = torch.tanh(x) * self.p
        else:
            h = self.p - x
        return self.head(h.pow(2).mean(1))


@pytest.mark.parametrize("kind", ["expand", "add", "mul", "sub_rev"])
def test_each_broadcast_use_alone(kind):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    worst, _, clipped = check_against_reference(OneRawUse(kind), (x,), {}, y, Z.ce_sum)
    assert worst < 1e-9 and 0 < clipped < 1


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_raw_parameters_used_together_with_cross_terms(style):
    torch.manual_seed(1)
    model = Z.RawParams().double()
    x = torch.randn(6, 4, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    worst, _, clipped = check_against_reference(model, (x,), {}, y, Z.ce_sum, style=style)
    assert worst < 1e-9 and 0 < clipped < 1
