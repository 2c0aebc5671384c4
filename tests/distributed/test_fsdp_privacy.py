"""FSDP2 on 2 ranks: the released noise has std σR/E on every coordinate, once (not per rank), from
independent streams on the ranks even when they are seeded alike, fresh at every step; removing one
example moves the noiseless update by at most R/E."""
import math

import pytest
import torch

_CACHE = {}


@pytest.fixture
def draws(cluster):
    if "draws" not in _CACHE:
        _CACHE["draws"] = cluster.values("tests.distributed.fsdp_jobs:noise_in_updates", timeout=90)
    return _CACHE["draws"]


def test_noise_std_is_sigma_R_over_expected_batch_size_on_every_rank_within_3_percent(draws):
    for d in draws:
        noise, want = d["noise"], d["sigma"] * d["R"] / d["E"]
        n = noise.numel()
        assert n > 20000  # 3 % is > 6 standard errors of a sample std (~ 1 / sqrt(2n))
        assert abs(float(noise.std()) / want - 1) < 0.03, (float(noise.std()), want)
        assert abs(float(noise.mean())) < 5 * want / math.sqrt(n)


def test_noise_differs_across_steps_and_ranks_draw_independent_streams(draws):
    a, b = draws[0]["noise"], draws[1]["noise"]
    for d in draws:
        assert not torch.allclose(d["noise"][0], d["noise"][1])
    m = min(a.shape[1], b.shape[1])
    corr = torch.corrcoef(torch.stack([a[:, :m].reshape(-1), b[:, :m].reshape(-1)]))[0, 1]
    assert abs(float(corr)) < 0.05, "the ranks' noise streams are correlated (seeded alike?)"


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
def test_removing_one_example_moves_the_update_by_at_most_R_over_E(cluster, style):
    for r in cluster.values("tests.distributed.fsdp_jobs:neighbour_move", timeout=60, style=style):
        bound = r["R"] / r["E"]
        assert r["norm_j"] > r["R"], "the removed example must be clipped for the bound to be reached"
        assert r["move"] <= bound * (1 + 1e-9)
        if style == "all-layer":
            assert r["move"] >= 0.999 * bound
