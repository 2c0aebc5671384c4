"""FSDP2 checkpoints through torch.distributed.checkpoint: a resume on the same world size continues
exactly (noise on: every rank's noise stream, sampler and RNG restored), and spends the same ε."""
import torch


def test_dcp_checkpoint_resumes_exactly_with_noise_at_the_same_world_size(cluster, tmp_path):
    ranks = cluster.values("tests.distributed.fsdp_jobs:checkpoint_resume", timeout=90, path=str(tmp_path / "ck"))
    for r in ranks:
        assert torch.equal(r["a"], r["b"]), float((r["a"] - r["b"]).abs().max())
        assert r["eps"][0] == r["eps"][1] > 0 and r["steps"][0] == r["steps"][1] == 8
    assert torch.equal(ranks[0]["a"], ranks[1]["a"])
    assert "fxdp_state.pt" in ranks[0]["files"] and any(f.endswith(".distcp") for f in ranks[0]["files"])
