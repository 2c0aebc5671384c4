"""The conv family: per-sample gradients of conv1d/2d/3d weights and biases (stride, padding, dilation,
groups that must not mix) equal the one-sample-at-a-time reference."""
import pytest
import torch
import torch.nn.functional as F

from tests.reference import assert_factor_matches, rule_case

D = torch.float64


def _p(*shape, seed):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("conv, spatial", [(F.conv1d, (9,)), (F.conv2d, (6, 5)), (F.conv3d, (4, 4, 3))])
def test_conv_weight_and_bias(conv, spatial):
    k = len(spatial)
    x, W, b = _p(3, 4, *spatial, seed=0), _p(6, 4, *([2] * k), seed=1), _p(6, seed=2)
    factors, ref = rule_case(conv, (x, W, b), {"w": W, "b": b})
    assert_factor_matches(factors["w"], ref["w"])
    assert_factor_matches(factors["b"], ref["b"])


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(dilation=2, padding="same"), dict(groups=2),
                                    dict(groups=4, stride=(1, 2))], ids=["stride", "dilation-same", "groups", "depthwise"])
def test_conv2d_options_and_groups_do_not_mix(kwargs):
    groups = kwargs.get("groups", 1)
    x, W = _p(3, 4, 7, 6, seed=0), _p(8, 4 // groups, 3, 3, seed=1)
    factors, ref = rule_case(F.conv2d, (x, W), {"w": W}, kwargs=kwargs)
    assert_factor_matches(factors["w"], ref["w"])
