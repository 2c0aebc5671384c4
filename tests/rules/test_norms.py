"""The norm family (LayerNorm, RMSNorm, GroupNorm, functional spellings included): instantiated per-sample
gradients of the affine parameters equal the one-sample-at-a-time reference."""
import pytest
import torch
import torch.nn.functional as F

from tests.reference import assert_factor_matches, rule_case

D = torch.float64


def _p(*shape, seed):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("func", [F.layer_norm, torch.layer_norm])
@pytest.mark.parametrize("shape", [(6,), (3, 6)])
def test_layer_norm_weight_and_bias(func, shape):
    x, w, b = _p(4, 5, *shape, seed=0), _p(*shape, seed=1), _p(*shape, seed=2)
    factors, ref = rule_case(func, (x, shape, w, b), {"w": w, "b": b})
    assert_factor_matches(factors["w"], ref["w"])
    assert_factor_matches(factors["b"], ref["b"])


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_weight(eps):
    x, w = _p(3, 4, 6, seed=0), _p(6, seed=1)
    factors, ref = rule_case(F.rms_norm, (x, (6,), w, eps), {"w": w})
    assert_factor_matches(factors["w"], ref["w"])


def test_group_norm_weight_and_bias():
    x, w, b = _p(3, 6, 4, 5, seed=0), _p(6, seed=1), _p(6, seed=2)
    factors, ref = rule_case(F.group_norm, (x, 3, w, b), {"w": w, "b": b})
    assert_factor_matches(factors["w"], ref["w"])
    assert_factor_matches(factors["b"], ref["b"])
