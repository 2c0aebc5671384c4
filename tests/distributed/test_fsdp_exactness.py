"""FSDP2 (fully_shard) on 2 gloo ranks == one process on the same global batches, noise off, float64:
all-layer and block-wise, on a block MLP and on GPT-2 (tied wte/lm_head) built from config; both
reshard_after_forward settings and both orders of privatize and fully_shard."""
import pytest
import torch

from tests.distributed.fsdp_jobs import replay

TIGHT = dict(rtol=1e-10, atol=1e-12)


def check(ranks, reference, tight=TIGHT):
    assert len(reference) == len(ranks[0]["params"]) > 1
    assert sum(len(i) for r in ranks for i in r["indices"]) > 0
    for k, want in enumerate(reference):
        torch.testing.assert_close(ranks[0]["params"][k], want, **tight, msg=lambda m: f"step {k}: {m}")
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), f"ranks differ after step {k}"
    assert not torch.equal(reference[0], reference[-1]), "training did not move the parameters"
    assert ranks[0]["grad_types"] == ["DTensor"]


LM = dict(n=16, q=0.5)  # HF models cannot run an empty batch: sample enough
CASES = [dict(kind="mlp"), dict(kind="mlp", style="block-wise", reshard=False),
         dict(kind="mlp", style="layer-wise", privatize_first=True),
         dict(kind="gpt2", **LM), dict(kind="gpt2", style="block-wise", **LM),
         dict(kind="lora-llama", **LM), dict(kind="lora-llama", style="block-wise", reshard=False, **LM)]


@pytest.mark.parametrize("case", CASES, ids=["mlp-all-layer", "mlp-block-wise-no-reshard",
                                              "mlp-layer-wise-privatized-first", "gpt2-all-layer",
                                              "gpt2-block-wise", "lora-llama-all-layer", "lora-llama-block-wise"])
def test_fsdp2_two_ranks_without_noise_equal_one_process(cluster, case):
    ranks = cluster.values("tests.distributed.fsdp_jobs:train", timeout=90, **case)
    # LoRA Llama: an unexplained ~2e-8 relative difference (HF Llama computes RMSNorm and RoPE in float32
    # even in a float64 model); the MLP and GPT-2 match to 1e-10. Far below what a clipping error gives.
    tight = dict(rtol=1e-6, atol=1e-9) if case["kind"] == "lora-llama" else TIGHT
    check(ranks, replay(ranks, kind=case["kind"], style=case.get("style", "all-layer"), n=case.get("n", 24)), tight)


def test_mixed_precision_bf16_params_fp32_reduce_clips_and_sums_in_fp32_close_to_float64(cluster):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the layers run in bf16, but the private
    gradients (norms, clipped sums), the noise and the reduce-scatter are float32; the updates stay
    within bf16 rounding of the float64 single-process updates."""
    ranks = cluster.values("tests.distributed.fsdp_jobs:train", timeout=90, kind="mlp", mixed=True)
    reference = replay(ranks, kind="mlp")
    assert ranks[0]["private_dtypes"] == ["torch.float32"] and ranks[0]["grad_types"] == ["DTensor"]
    for k in range(1, len(reference)):
        got, want = ranks[0]["params"][k] - ranks[0]["params"][0], reference[k] - reference[0]
        assert float((got - want).norm() / want.norm()) < 0.05, k
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])
