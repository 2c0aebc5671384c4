"""2 ranks == 1 process on the same global batches (float64, tight), noise off and on, for the
plain loop, micro-batches, grouped clipping and the torch.compile backend; ε the same on every rank."""
import pytest
import torch
from opacus.accountants import PRVAccountant

from tests.distributed.replay import replay

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _check(ranks, reference):
    assert len(reference) == len(ranks[0]["params"]) > 1
    for k, want in enumerate(reference):
        torch.testing.assert_close(ranks[0]["params"][k], want, **TIGHT, msg=lambda m: f"step {k}: {m}")
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), f"ranks differ after step {k}"


@pytest.mark.parametrize("case", [dict(), dict(style="block-wise", epochs=2), dict(micro=2, epochs=2)],
                         ids=["all-layer", "block-wise", "micro-batches"])
def test_two_ranks_without_noise_equal_one_process_on_the_same_global_batches(cluster, case):
    ranks = cluster.values("tests.distributed.jobs:train", timeout=60, verify=True, **case)
    _check(ranks, replay(ranks, style=case.get("style", "all-layer")))
    # rank 1's parameters were perturbed before setup: the broadcast from rank 0 made them equal
    assert torch.equal(ranks[0]["params"][0], ranks[1]["params"][0])


def test_empty_local_batches_are_handed_out_and_every_rank_steps_once_per_global_batch(cluster):
    ranks = cluster.values("tests.distributed.jobs:train", timeout=60, epochs=3, q=0.25)
    assert sum(r["empty"] for r in ranks) > 0, "the case was meant to produce empty local batches"
    assert [r["steps"] for r in ranks] == [12, 12] and [r["local_batches"] for r in ranks] == [12, 12]
    _check(ranks, replay(ranks))


def test_two_ranks_with_noise_equal_one_process_with_the_same_noise_generator(cluster):
    ranks = cluster.values("tests.distributed.jobs:train", timeout=60, sigma=0.7, noise_seed=3, epochs=2)
    _check(ranks, replay(ranks, sigma=0.7, noise_seed=3))
    noiseless = replay(ranks)
    assert (ranks[0]["params"][-1] - noiseless[-1]).abs().max() > 1e-3, "the noise had no effect"


def test_secure_mode_noise_drawn_once_from_os_entropy_keeps_the_ranks_identical(cluster):
    ranks = cluster.values("tests.distributed.jobs:train", timeout=60, sigma=0.7, secure=True, verify=True)
    for k in range(len(ranks[0]["params"])):
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])
    assert (ranks[0]["params"][-1] - replay(ranks)[-1]).abs().max() > 1e-3, "the noise had no effect"


def test_epsilon_is_the_same_on_every_rank_and_accounts_the_global_sampling_rate(cluster):
    ranks = cluster.values("tests.distributed.jobs:train", timeout=60, sigma=0.9, epochs=2, q=0.25)
    acc = PRVAccountant()
    for _ in range(ranks[0]["steps"]):
        acc.step(noise_multiplier=0.9, sample_rate=0.25)
    assert ranks[0]["eps"] == ranks[1]["eps"]
    assert ranks[0]["eps"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert ranks[0]["E"] == pytest.approx(0.25 * 24)


def test_compiled_model_on_two_ranks_equals_one_eager_process(cluster):
    ranks = cluster.values("tests.distributed.jobs:train", timeout=90, compile=True)
    _check(ranks, replay(ranks))
