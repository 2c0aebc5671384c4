"""FSDP2 on 4 gloo ranks == one process on the same global batches (noise off, float64)."""
import pytest
import torch

from tests.distributed.cluster import Cluster
from tests.distributed.fsdp_jobs import replay
from tests.distributed.test_fsdp_exactness import TIGHT


@pytest.fixture(scope="module")
def four():
    c = Cluster(world_size=4)
    yield c
    c.close()


@pytest.mark.parametrize("case", [dict(kind="mlp", q=0.5),
                                  pytest.param(dict(kind="gpt2", style="block-wise", n=24, q=0.5), marks=pytest.mark.slow)],
                         ids=["mlp-all-layer", "gpt2-block-wise"])
def test_fsdp2_four_ranks_without_noise_equal_one_process(four, case):
    ranks = four.values("tests.distributed.fsdp_jobs:train", timeout=120, steps=2, **case)
    reference = replay(ranks, kind=case["kind"], style=case.get("style", "all-layer"), n=case.get("n", 24))
    for k, want in enumerate(reference):
        torch.testing.assert_close(ranks[0]["params"][k], want, **TIGHT)
        assert all(torch.equal(r["params"][k], ranks[0]["params"][k]) for r in ranks[1:])
    assert not torch.equal(reference[0], reference[-1])
