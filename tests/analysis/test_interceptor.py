"""The interceptor routes every torch call that touches a trainable parameter to the rule registry, and
refuses, naming the parameter and the op, any such call whose result carries a gradient no rule covers."""
import pytest
import torch
import torch.nn.functional as F

from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.core.errors import SampleMixingError, UncoveredParameterError


class Recording:
    def __init__(self):
        self.handled = []

    def substitute(self, func, args, kwargs):
        return None

    def refuse(self, exc, func, args, kwargs, out=None):
        raise exc

    def handle(self, call, binding):
        self.handled.append((call.name, binding.rule.name, binding.param_names))
        return call.func(*call.args, **call.kwargs)


def _run(params, fn):
    rec = Recording()
    with ParameterInterceptor({id(p): n for n, p in params.items()}, rec):
        out = fn()
    return rec.handled, out


def test_covered_calls_are_bound_to_their_rule_and_others_pass_through():
    W, frozen = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 4)
    handled, out = _run({"W": W}, lambda: F.linear(x, W) + F.linear(x, frozen))
    assert handled == [("F.linear", "linear", ("W",))]
    assert out.shape == (2, 3)


def test_metadata_reads_and_detach_are_not_uses():
    W = torch.randn(3, 4, requires_grad=True)
    handled, _ = _run({"W": W}, lambda: (W.shape, W.detach() * 2, W.dtype, W.size(0)))
    assert handled == []


def test_a_single_tensor_use_without_family_rule_goes_to_the_per_sample_fallback():
    W = torch.randn(3, 3, requires_grad=True)
    handled, _ = _run({"W": W}, lambda: torch.linalg.inv(W))
    assert [(rule, names) for _, rule, names in handled] == [("per-sample (torch.func)", ("W",))]


def test_a_gradient_carrying_use_no_rule_covers_names_parameter_and_op():
    W = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(UncoveredParameterError, match="no per-sample rule") as info:
        _run({"W": W}, lambda: torch.linalg.qr(W))
    assert "W" in str(info.value) and "qr" in str(info.value) and info.value.param_names == ("W",)


def test_no_routing_without_grad_mode():
    W = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        handled, _ = _run({"W": W}, lambda: F.linear(torch.randn(2, 4), W))
    assert handled == []


def test_batch_norm_in_training_mode_is_refused_as_sample_mixing():
    w = torch.ones(4, requires_grad=True)
    x = torch.randn(5, 4)
    with pytest.raises(SampleMixingError, match="BatchNorm"):
        _run({"w": w}, lambda: F.batch_norm(x, torch.zeros(4), torch.ones(4), w, None, training=True))
