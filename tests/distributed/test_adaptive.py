"""Adaptive clipping on 2 ranks == one process on the same global batches: the unclipped counts are summed
across ranks before the count noise, which rank 0 adds once, so every rank learns the same R."""
import pytest
import torch

import fxdp
from tests.distributed.adaptive_jobs import ADAPTIVE
from tests.distributed.jobs import make_data, make_model
from tests.distributed.replay import replay_steps


def replay_adaptive(ranks, *, n=24, seed=0, sigma=0.0, count_std=0.0, noise_seed=None):
    x, y = make_data(n, seed)
    model = fxdp.privatize(make_model(seed), max_grad_norm=ranks[0]["R"])
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    ada = fxdp.AdaptiveClipping(model, count_noise_multiplier=count_std, **ADAPTIVE)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), sigma, ranks[0]["R"],
                           expected_batch_size=ranks[0]["E"], generator=gen, adaptive_clipping=ada)
    bounds, fractions = [], []

    def on_step():
        bounds.append(opt.last_release["max_grad_norm"])
        fractions.append(opt.last_release["unclipped_fraction"])

    return replay_steps(ranks, model, opt, x, y, on_step), bounds, fractions


@pytest.mark.parametrize("case", [dict(sigma=0.7, count_std=0.8, noise_seed=3),
                                  dict(sigma=0.0, count_std=0.5, noise_seed=5, micro=2)],
                         ids=["noise", "count-noise-micro-batches"])
def test_two_ranks_learn_the_R_of_one_process_with_the_count_noise_added_once(cluster, case):
    ranks = cluster.values("tests.distributed.adaptive_jobs:train_adaptive", timeout=90, **case)
    case = {k: v for k, v in case.items() if k != "micro"}
    params, bounds, fractions = replay_adaptive(ranks, **case)
    for r in ranks:
        assert r["bounds"] == pytest.approx(bounds, rel=1e-12)
        assert r["fractions"] == pytest.approx(fractions, rel=1e-9, abs=1e-12)
        for got, want in zip(r["params"], params):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert ranks[0]["bounds"] == ranks[1]["bounds"] and ranks[0]["eps"] == ranks[1]["eps"]
    assert len(set(bounds)) > 3, "R was meant to change"


def test_resume_restores_the_learned_R_on_every_rank_and_continues_exactly(cluster, tmp_path):
    for r in cluster.values("tests.distributed.adaptive_jobs:resume_adaptive", timeout=60,
                            path=str(tmp_path / "ck.pt")):
        assert r["loaded_R"] == r["saved_R"] != 0.3
        params, bounds = r["uninterrupted"]
        params2, bounds2 = r["resumed"]
        assert bounds2 == bounds and len(set(bounds)) > 1
        assert torch.equal(params2, params)
