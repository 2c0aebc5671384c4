"""Single-process pieces of the distributed layer: seeds per rank, error text, refusals without a process group."""
import pytest
import torch

import fxdp
from fxdp.distributed.agreement import _around_difference
from fxdp.distributed.sampler import mix_seed, rank_generator


def test_rank_seeds_are_deterministic_and_distinct_across_ranks():
    assert mix_seed(5, 0) == mix_seed(5, 0)
    assert len({mix_seed(5, r) for r in range(64)}) == 64
    assert all(0 <= mix_seed(s, r) < 2 ** 63 for s in (0, 2 ** 62) for r in (0, 7))


def test_ranks_seeded_alike_get_independent_selection_generators_reproducibly():
    def first_draws(rank):
        torch.manual_seed(0)  # the usual habit: the same seed on every rank
        return torch.rand(8, generator=rank_generator(rank, secure=False))

    assert torch.equal(first_draws(0), first_draws(0))
    assert not torch.equal(first_draws(0), first_draws(1))
    a, b = rank_generator(0, secure=True), rank_generator(0, secure=True)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_mismatch_report_shows_the_text_around_the_first_difference():
    ref = "x" * 500 + "A" + "y" * 500
    other = "x" * 500 + "B" + "y" * 500
    shown = _around_difference(other, ref, 60)
    assert "B" in shown and shown.startswith("...") and shown.endswith("...") and len(shown) <= 66


def test_dpdistributed_without_a_process_group_says_to_initialise_one():
    with pytest.raises(ValueError, match="init_process_group"):
        fxdp.DPDistributed()
    from fxdp.distributed import DistributedDPOptimizer
    with pytest.raises(ValueError, match="init_process_group"):
        DistributedDPOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 1.0, 1.0, 4.0)
