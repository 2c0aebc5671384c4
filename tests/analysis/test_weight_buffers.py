"""Spectral norm's u, v may change in a private forward only to the values torch's power iteration gives from
their values at the start of the forward and the weights (fxdp.analysis.weight_buffers): batch data written into
them (in place, or through .data, which bumps no version counter) is refused like any other buffer update; the
iteration itself, once or on a layer used twice, is not. (Data written before the iteration reads it changes the
weight every sample sees: the mixing analysis refuses that first.)"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.core.errors import PrivacyError

X = torch.randn(6, 4, dtype=torch.float64)


def _buffers(layer, kind):
    if kind == "parametrization":
        sn = layer.parametrizations.weight[0]
        return sn._u, sn._v
    return layer.weight_u, layer.weight_v


WRITES = {  # the batch written into u (or v) under no_grad, after the layer's power iteration ran
    "mean": lambda u, v, x: u.copy_(x.mean(0)),
    "narrow": lambda u, v, x: u.copy_(x.narrow(0, 0, 1)[0]),
    "max_into_v": lambda u, v, x: v.copy_(x.amax(0)),
    "through_data": lambda u, v, x: u.data.copy_(x.narrow(0, 0, 1)[0]),  # no version bump
}


class Spectral(nn.Module):
    def __init__(self, kind, write=None, calls=1):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if kind == "parametrization" else nn.utils.spectral_norm
        self.kind, self.write, self.calls = kind, write, calls
        self.lin, self.head = sn(nn.Linear(4, 4)), nn.Linear(4, 3)

    def forward(self, x):
        h = x
        for _ in range(self.calls):
            h = torch.tanh(self.lin(h))
        if self.write:
            with torch.no_grad():
                WRITES[self.write](*_buffers(self.lin, self.kind), x)
        return self.head(h)


def _model(*a, **k):
    torch.manual_seed(0)
    return Spectral(*a, **k).double().train()


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_batch_data_written_into_u_or_v_is_refused_like_any_buffer_update(kind, write):
    m = fxdp.privatize(_model(kind, write), max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match=r"buffer\(s\) lin\..*were updated during a private training forward"):
        m(X).sum().backward()


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
@pytest.mark.parametrize("calls", [1, 2])
def test_the_power_iteration_itself_is_accepted_and_advances_u_v_as_without_fxdp(kind, calls):
    plain, private = _model(kind, calls=calls), fxdp.privatize(_model(kind, calls=calls), max_grad_norm=1.0)
    for _ in range(2):
        plain(X)
        F.cross_entropy(private(X), torch.zeros(6, dtype=torch.long)).backward()
    for want, got in zip(_buffers(plain.lin, kind), _buffers(private.lin, kind)):
        assert torch.equal(got, want)
    assert all(p.private_grad is not None for p in private.parameters())
