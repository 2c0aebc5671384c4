"""A parameter written in place into a batch-free tensor (``pos = zeros(T, d); pos[mask] = p``) never gets a silent
zero gradient: every spelling is refused naming the parameter, eager, compiled and in explain; the out-of-place
spellings and batched destinations stay exact (fxdp.analysis.batch_free_writes)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.core.errors import UncoveredParameterError
from tests.reference import check_against_reference

B, T, d = 6, 5, 4


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _even():
    return torch.arange(T) % 2 == 0


WRITES = {
    "setitem": lambda pos, p: pos.__setitem__(_even(), p),
    "iadd": lambda pos, p: pos.__iadd__(p),
    "copy_where": lambda pos, p: pos.copy_(torch.where(_even()[:, None], p, pos)),
    "scatter_": lambda pos, p: pos.scatter_(0, torch.zeros(1, d, dtype=torch.long), p[None]),
    "index_put_": lambda pos, p: pos.index_put_((torch.tensor([0, 2]),), p),
    "view_add_": lambda pos, p: pos[0].add_(p),
}
OUT_OF_PLACE = {
    "where": lambda pos, p: torch.where(_even()[:, None], p, pos),
    "add": lambda pos, p: pos + p,
    "batch_sized_iadd": None,  # pos = zeros(B, T, d); pos += p: the broadcast rule's, per sample
}


class Table(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.write = write
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 3)
        self.p = nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = self.fc(x)
        if self.write is None:
            pos = torch.zeros(x.shape[0], T, d, dtype=x.dtype)
            pos += self.p
        else:
            pos = torch.zeros(T, d, dtype=x.dtype)
            out = WRITES[self.write](pos, self.p) if self.write in WRITES else OUT_OF_PLACE[self.write](pos, self.p)
            pos = pos if self.write in WRITES else out
        return self.head(torch.tanh(h + pos)).sum(1)


def _data():
    torch.manual_seed(0)
    x = torch.randn(B, T, d, dtype=torch.float64)
    return x, torch.randint(0, 3, (B,))


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_parameter_written_in_place_into_a_batch_free_tensor_is_refused_by_name(write):
    x, y = _data()
    m = fxdp.privatize(Table(write).double(), max_grad_norm=1.0, loss_reduction="sum")
    with pytest.raises(UncoveredParameterError, match=r"parameter\(s\) p in place .*out of place"):
        sum_ce(m(x), y).backward()
    assert m.p.grad is None


@pytest.mark.parametrize("write", sorted(OUT_OF_PLACE))
def test_out_of_place_and_batch_sized_spellings_stay_exact(write):
    x, y = _data()
    torch.manual_seed(1)
    model = Table(None if OUT_OF_PLACE[write] is None else write).double()
    worst, R, clipped = check_against_reference(model, (x,), {}, y, sum_ce, loss_reduction="sum")
    assert worst < 1e-9 and 0 < clipped < 1


def test_explain_reports_the_in_place_write_as_uncovered():
    x, _ = _data()
    report = str(fxdp.explain(Table("setitem").double(), x))
    assert "UNCOVERED parameters (privatize refuses): p" in report
    assert "writes a parameter in place into a batch-free tensor" in report


def test_compiled_forward_refuses_the_in_place_write_too():
    x, y = _data()
    m = fxdp.privatize(Table("copy_where").double(), max_grad_norm=1.0, loss_reduction="sum")
    compiled = torch.compile(m, backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(Exception, match=r"parameter\(s\) p in place"):
        sum_ce(compiled(x), y).backward()
    assert m.p.grad is None and getattr(m.p, "private_grad", None) is None
