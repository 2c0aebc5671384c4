"""Ranks that disagree, or a step that fails on one rank only: every rank raises, fast, and the
process group stays usable -- nobody hangs in a collective."""
import time

import pytest


@pytest.mark.parametrize("kind,field", [("style", "privatize configuration"), ("width", "model parameters"),
                                        ("sigma", "noise and clipping"), ("dataset", "sampling")])
def test_ranks_that_disagree_fail_fast_with_a_clear_error_on_every_rank(cluster, kind, field):
    start = time.monotonic()
    outcomes = cluster.run("tests.distributed.jobs:setup_variant", timeout=30, kind=kind)
    assert time.monotonic() - start < 15
    for o in outcomes:
        assert o.error_type == "RankMismatchError", o.trace
        assert f"disagree on {field}" in o.message and "on rank 1:" in o.message


def test_a_setup_error_on_one_rank_is_raised_on_every_rank(cluster):
    o0, o1 = cluster.run("tests.distributed.jobs:setup_variant", timeout=30, kind="bad-argument")
    assert o1.error_type == "ValueError" and "no-such-style" in o1.message
    assert o0.error_type == "PeerRankError" and "rank(s) [1]" in o0.message and "no-such-style" in o0.message


def test_a_ddp_wrapped_model_is_refused_with_what_to_do(cluster):
    for o in cluster.run("tests.distributed.jobs:setup_variant", timeout=30, kind="ddp"):
        assert o.error_type == "PrivacyConfigError" and "DistributedDataParallel" in o.message
        assert "Pass the plain model" in o.message


@pytest.mark.parametrize("inner", [False, True])
def test_ddp_around_a_privatized_model_is_refused_at_its_first_forward(cluster, inner):
    """DDP synchronises p.grad, never p.private_grad: without the refusal the ranks trained apart (0.49 apart
    after 3 steps) and each added its own noise."""
    for o in cluster.run("tests.distributed.jobs:ddp_around_privatized", timeout=30, inner=inner):
        assert o.error_type == "PrivacyConfigError" and "inside a DistributedDataParallel forward" in o.message
        assert "fxdp.DPDistributed" in o.message


@pytest.mark.parametrize("kind,phrase", [("frozen", "frozen"), ("lr", "learning-rate scheduler"),
                                         ("sigma", "noise multiplier")])
def test_a_step_that_would_differ_between_ranks_is_refused_on_both(cluster, kind, phrase):
    """A parameter frozen, an LR scheduler stepped or σ changed on one rank only."""
    for r in cluster.values("tests.distributed.jobs:step_failure", timeout=30, kind=kind):
        assert r["error"].startswith("PrivacyError") and phrase in r["error"]
        assert r["group_alive"]


@pytest.mark.parametrize("kind,phrase", [("no-backward", "without any private gradient"),
                                         ("two-batches", "2 Poisson batches")])
def test_a_step_refused_on_one_rank_is_reported_to_the_other(cluster, kind, phrase):
    r0, r1 = cluster.values("tests.distributed.jobs:step_failure", timeout=30, kind=kind)
    assert r1["error"].startswith("PrivacyError") and phrase in r1["error"]
    assert r0["error"].startswith("PeerRankError") and phrase in r0["error"]
    assert r0["group_alive"] and r1["group_alive"]
