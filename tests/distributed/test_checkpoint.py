"""Checkpoints written and read by rank 0: a resume on the same world size continues exactly."""
import torch


def test_resume_on_the_same_world_size_continues_exactly(cluster, tmp_path):
    for r in cluster.values("tests.distributed.jobs:resume", timeout=60, path=str(tmp_path / "ck.pt")):
        params, eps, batches = r["uninterrupted"]
        params2, eps2, batches2 = r["resumed"]
        assert batches2 == batches, "the resumed run must draw the same local batches"
        assert torch.equal(params2, params)
        assert eps2 == eps > 0
        assert r["extra"] == [0], "the user's entries come from rank 0's checkpoint"
