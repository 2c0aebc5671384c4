"""Noise on: added once per global batch with std σR/E in the update, identical on both ranks."""
import math

import pytest
import torch


_CACHE = {}


@pytest.fixture
def draws(cluster):
    if "draws" not in _CACHE:
        _CACHE["draws"] = cluster.values("tests.distributed.jobs:noise_in_updates", timeout=60, steps=10, sigma=1.3)
    return _CACHE["draws"]


def test_noise_in_the_update_has_std_sigma_R_over_expected_batch_size_once_not_per_rank(draws):
    noise, R, E = draws[0]["noise"], draws[0]["R"], draws[0]["E"]
    want = 1.3 * R / E
    n = noise.numel()
    assert n > 6000
    got = float(noise.std())
    # std of a sample std of n Gaussians ~ want / sqrt(2n): 5 % is > 4 standard errors here, and
    # noise drawn on each rank would give sqrt(2) * want
    assert abs(got / want - 1) < 0.05, (got, want)
    assert abs(float(noise.mean())) < 4 * want / math.sqrt(n)
    assert draws[0]["buckets"] > 1, "the case was meant to use several buckets"


def test_both_ranks_apply_the_same_noised_update_and_hold_identical_parameters(draws):
    assert torch.equal(draws[0]["noise"], draws[1]["noise"])
    assert torch.equal(draws[0]["params"], draws[1]["params"])
    steps = draws[0]["noise"]
    assert not torch.equal(steps[0], steps[1]), "each step must draw fresh noise"
