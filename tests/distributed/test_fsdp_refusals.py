"""Sharded setups fxdp does not support are refused on every rank with a message, never trained:
HSDP / 2-D meshes, tensor-parallel DTensor parameters, FSDP2 CPU offload, torch.compile per block or
of the whole sharded model, a model whose root is not fully_shard-ed."""
import pytest

CASES = {"hsdp": ("ShardingError", "2-D mesh"), "tensor-parallel": ("PrivacyConfigError", "DTensor"),
         "cpu-offload": ("ShardingError", "CPU offload"), "compiled-block": ("ShardingError", "compile"),
         "compiled-model": ("ValueError", "torch.compile"), "not-root": ("ValueError", "root module")}


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_sharding_is_refused_on_every_rank(cluster, case):
    kind, words = CASES[case]
    for error, message in cluster.values("tests.distributed.fsdp_jobs:refusal", timeout=60, case=case):
        assert error == kind, (error, message)
        assert words in message and message.startswith("fxdp"), message


MISUSE = {"micro-batches": ("ShardingError", "micro-batches"), "public-grad": ("PrivacyError", "p.grad is set")}


@pytest.mark.parametrize("case", list(MISUSE))
def test_sharded_loop_misuse_is_refused(cluster, case):
    kind, words = MISUSE[case]
    for error, message in cluster.values("tests.distributed.fsdp_jobs:misuse", timeout=60, case=case):
        assert error == kind, (error, message)
        assert words in message, message
