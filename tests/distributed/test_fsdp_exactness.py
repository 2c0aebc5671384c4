"""FSDP2 (fully_shard) on 2 gloo ranks == one process on the same global batches, noise off, float64:
all-layer and block-wise, on a block MLP and on GPT-2 (tied wte/lm_head) built from config; both
reshard_after_forward settings and both orders of privatize and fully_shard."""
import pytest
import torch

from tests.distributed.fsdp_jobs import replay

TIGHT = dict(rtol=1e-10, atol=1e-12)


def check(ranks, reference):
    assert len(reference) == len(ranks[0]["params"]) > 1
    assert sum(len(i) for r in ranks for i in r["indices"]) > 0
    for k, want in enumerate(reference):
        torch.testing.assert_close(ranks[0]["params"][k], want, **TIGHT, msg=lambda m: f"step {k}: {m}")
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), f"ranks differ after step {k}"
    assert not torch.equal(reference[0], reference[-1]), "training did not move the parameters"
    assert ranks[0]["grad_types"] == ["DTensor"]


LM = dict(n=16, q=0.5)  # HF models cannot run an empty batch: sample enough
CASES = [dict(kind="mlp"), dict(kind="mlp", style="block-wise", reshard=False),
         dict(kind="mlp", style="layer-wise", privatize_first=True),
         dict(kind="gpt2", **LM), dict(kind="gpt2", style="block-wise", **LM)]


@pytest.mark.parametrize("case", CASES, ids=["mlp-all-layer", "mlp-block-wise-no-reshard",
                                              "mlp-layer-wise-privatized-first", "gpt2-all-layer",
                                              "gpt2-block-wise"])
def test_fsdp2_two_ranks_without_noise_equal_one_process(cluster, case):
    ranks = cluster.values("tests.distributed.fsdp_jobs:train", timeout=90, **case)
    check(ranks, replay(ranks, kind=case["kind"], style=case.get("style", "all-layer"), n=case.get("n", 24)))
