"""Single-process replay of a distributed run: the same global batches through fxdp.DPOptimizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxdp
from tests.distributed.jobs import flat_params, make_data, make_model


def global_batches(ranks):
    """Per step, the global batch: rank 0's indices, then rank 1's, ..."""
    steps = len(ranks[0]["indices"])
    assert all(len(r["indices"]) == steps for r in ranks), "the ranks took different numbers of steps"
    return [sum((r["indices"][k] for r in ranks), []) for k in range(steps)]


def replay(ranks, *, n=24, seed=0, sigma=0.0, noise_seed=None, style="all-layer", momentum=0.9, lr=0.5):
    """Parameters after each step of one process on the ranks' global batches (same R, E, optimizer)."""
    x, y = make_data(n, seed)
    model = fxdp.privatize(make_model(seed), style=style, max_grad_norm=ranks[0]["R"])
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), sigma, ranks[0]["R"],
                           expected_batch_size=ranks[0]["E"], generator=gen)
    return replay_steps(ranks, model, opt, x, y)


def replay_steps(ranks, model, opt, x, y, on_step=None):
    """One cross-entropy step of ``opt`` per global batch of ``ranks`` on rows of (x, y), in one process;
    ``on_step()`` after each. Returns ``model``'s parameters before the first step and after each."""
    out = [flat_params(model)]
    for idx in global_batches(ranks):
        idx = torch.tensor(idx, dtype=torch.long)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        out.append(flat_params(model))
        if on_step is not None:
            on_step()
    return out
