"""Dropout applied to a parameter (or a tensor computed from parameters only) before it meets the batch --
DeBERTa-v2's ``pos_dropout(rel_embeddings)``: inactive (p = 0, or eval mode) it is the identity, as the
analysis runs see every dropout, and the model equals the one-sample-at-a-time reference (float64, R at the
median norm); active in training it is refused, saying why (one mask for the whole batch, which per-sample
gradients of a batch-free tensor cannot replay) -- not as "data-dependent control flow"."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.models.helpers import check_against_reference


class DroppedTable(nn.Module):
    def __init__(self, p=0.0, d=6, T=4):
        super().__init__()
        self.table, self.drop = nn.Parameter(torch.randn(T, d)), nn.Dropout(p)
        self.proj, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head((x + self.proj(self.drop(self.table))).tanh().mean(1))


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def data(B=6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("p,train", [(0.0, True), (0.3, False)])
def test_inactive_dropout_on_a_parameter_is_the_identity_and_exact(p, train):
    torch.manual_seed(0)
    x, y = data()
    model = DroppedTable(p).double().train(train)
    check_against_reference(model, (x,), {}, y, sum_ce, loss_reduction="sum")


def test_active_dropout_on_a_parameter_is_refused_saying_why():
    torch.manual_seed(0)
    x, y = data()
    m = fxdp.privatize(DroppedTable(0.3).double(), max_grad_norm=1.0)
    with pytest.raises(fxdp.UncoveredParameterError, match="mask is drawn once for the whole batch"):
        sum_ce(m(x), y).backward()
