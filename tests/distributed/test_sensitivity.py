"""Sensitivity across ranks: each example lives on one rank only, so removing it moves the noiseless
update by at most R/E -- not 2R/E as when every rank samples from the whole data set."""
import pytest


def test_removing_one_example_moves_the_update_by_at_most_R_over_expected_batch_size(cluster):
    for r in cluster.values("tests.distributed.jobs:neighbour_move", timeout=30):
        bound = r["R"] / r["E"]
        assert r["norm_j"] > r["R"], "the removed example must be clipped for the bound to be reached"
        assert r["move"] <= bound * (1 + 1e-9)
        assert r["move"] >= 0.999 * bound


def test_an_example_on_both_ranks_would_double_the_sensitivity(cluster):
    """What a sampler that is not sharded across ranks does -- the case the distributed sampler excludes."""
    for r in cluster.values("tests.distributed.jobs:neighbour_move", timeout=30, duplicate=True):
        assert r["move"] == pytest.approx(2 * r["R"] / r["E"], rel=1e-3)


def test_shards_are_disjoint_cover_the_data_set_and_every_draw_stays_in_its_shard(cluster):
    n, epochs = 25, 3
    r0, r1 = cluster.values("tests.distributed.jobs:shards", timeout=30, n=n, epochs=epochs)
    for e in range(epochs):
        a, b = set(r0["shards"][e]), set(r1["shards"][e])
        assert not a & b and a | b == set(range(n))
        assert set(r0["drawn"][e]) <= a and set(r1["drawn"][e]) <= b
    assert r0["shards"][0] != r0["shards"][1], "set_epoch must change the (public) permutation"
    assert r0["batches_per_epoch"] == r1["batches_per_epoch"] == [int(1 / 0.3)] * epochs
    assert not (r0["generator_state"] == r1["generator_state"]).all(), \
        "the ranks' selection generators must be independent even when seeded alike"
