"""The linear family (F.linear, torch.addmm as in HF Conv1D, x @ W): per-sample norms by ghost Gram or by
instantiation, and clipped sums as one matmul, equal the one-sample-at-a-time reference."""
import pytest
import torch
import torch.nn.functional as F

from fxdp.rules import factors as FA
from tests.reference import assert_factor_matches, assert_inner_matches, rule_case

D = torch.float64


def _p(*shape, seed):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("T, d, p", [(1, 5, 3), (2, 16, 12), (9, 2, 3)], ids=["T1-outer", "ghost", "instantiate"])
def test_linear_weight_and_bias_are_exact_in_every_norm_regime(T, d, p):
    x, W, b = _p(4, T, d, seed=0), _p(p, d, seed=1), _p(p, seed=2)
    factors, ref = rule_case(F.linear, (x, W, b), {"w": W, "b": b})
    for name in ("w", "b"):
        assert_factor_matches(factors[name], ref[name])
    expected = "outer" if T == 1 else FA.norm_decision(T, d, p)
    FA.sq_norm(factors["w"])
    assert factors["w"].decision == expected


def test_linear_without_a_sequence_dimension():
    x, W = _p(5, 4, seed=0), _p(3, 4, seed=1)
    factors, ref = rule_case(F.linear, (x, W), {"w": W})
    assert_factor_matches(factors["w"], ref["w"])


def test_addmm_as_in_huggingface_conv1d():
    x, W, b = _p(6, 4, seed=0), _p(4, 3, seed=1), _p(3, seed=2)
    factors, ref = rule_case(torch.addmm, (b, x, W), {"w": W, "b": b})
    assert_factor_matches(factors["w"], ref["w"])
    assert_factor_matches(factors["b"], ref["b"])


def test_matmul_with_the_weight_on_the_right():
    x, W = _p(3, 5, 4, seed=0), _p(4, 2, seed=1)
    factors, ref = rule_case(torch.matmul, (x, W), {"w": W})
    assert_factor_matches(factors["w"], ref["w"])


def test_cross_term_of_one_weight_used_by_two_linear_calls():
    W = _p(3, 4, seed=0)
    x1, x2 = _p(5, 2, 4, seed=1), _p(5, 7, 4, seed=2)
    f1, r1 = rule_case(F.linear, (x1, W), {"w": W}, seed=3)
    f2, r2 = rule_case(F.linear, (x2, W), {"w": W}, seed=4)
    assert_inner_matches(f1["w"], f2["w"], r1["w"], r2["w"])
