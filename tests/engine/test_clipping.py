"""Clip factors: each sample's whole clipped contribution is bounded by R."""
import math

import pytest
import torch

from fxdp.core.config import make_config
from fxdp.engine.clipping import clip_groups


@pytest.mark.parametrize("fn", ["abadi", "automatic", "global"])
@pytest.mark.parametrize("G", [1, 3])
def test_clipped_contribution_of_every_sample_is_at_most_R(fn, G):
    R = 0.7
    cfg = make_config(max_grad_norm=R, clipping_fn=fn)
    sq = {g: torch.rand(50, dtype=torch.float64) * 4 for g in range(G)}
    res = clip_groups(sq, G, cfg, 50)
    total = sum(res.factors[g] ** 2 * sq[g] for g in range(G)).sqrt()
    assert float(total.max()) <= R * (1 + 1e-12)


def test_abadi_leaves_small_samples_unchanged_and_scales_large_ones_to_the_group_threshold():
    cfg = make_config(max_grad_norm=2.0, clipping_fn="abadi", numerical_stability_constant=0.0)
    res = clip_groups({0: torch.tensor([1.0, 16.0]), 1: torch.tensor([0.25, 1.0])}, 2, cfg, 2)
    thr = 2.0 / math.sqrt(2)
    torch.testing.assert_close(res.factors[0], torch.tensor([1.0, thr / 4.0]))
    torch.testing.assert_close(res.factors[1], torch.tensor([1.0, 1.0]))


def test_automatic_clipping_keeps_the_users_R():
    cfg = make_config(max_grad_norm=3.0, clipping_fn="automatic")
    res = clip_groups({0: torch.tensor([4.0])}, 1, cfg, 1)
    torch.testing.assert_close(res.factors[0], torch.tensor([3.0 / (2.0 + 0.01)]))


def test_global_clipping_drops_samples_above_the_threshold():
    cfg = make_config(max_grad_norm=1.0, clipping_fn="global")
    res = clip_groups({0: torch.tensor([0.81, 1.21])}, 1, cfg, 2)
    torch.testing.assert_close(res.factors[0], torch.tensor([1.0, 0.0]))


def test_non_finite_sample_gets_zero_factor_in_every_group_and_is_counted():
    cfg = make_config(max_grad_norm=1.0)
    res = clip_groups({0: torch.tensor([1.0, float("nan"), 2.0]), 1: torch.tensor([1.0, 1.0, float("inf")])},
                      2, cfg, 3)
    assert res.num_nonfinite == 2
    assert res.keep.tolist() == [True, False, False]
    for g in (0, 1):
        assert res.factors[g][1] == 0 and res.factors[g][2] == 0 and res.factors[g][0] > 0
