"""Reference for forwards that draw randomness in training mode (dropout, masks): the same draws.

A one-sample-at-a-time reference would draw other masks than the batch does. Instead a plain copy of the
model runs the *batch* once, from the same RNG state (torch's and numpy's) as the privatized forward, and
each sample's gradient is autograd's gradient of that sample's own loss in that one graph. For a model that
does not mix samples this is exactly the gradient of the sample alone under the masks the batch drew for
it; so ``private_grad`` matches it only if fxdp's analysis runs left the user's RNG streams as they were
(other masks otherwise), and only with the right per-sample grouping, clip factors and scale.
"""
from __future__ import annotations

import copy
import random
from typing import Callable

import numpy as np
import torch

import fxdp
from tests.reference import median_threshold, reference_private_grads


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def same_draw_per_sample_gradients(model, forward: Callable, sample_losses: Callable, seed: int):
    """[{name: gradient of sample b's loss}] from one batched forward of ``model`` seeded with ``seed``;
    also the draws that follow (what the user's RNG streams give next) and the buffers after the forward."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seed_all(seed)
    losses = sample_losses(forward(model))
    after = draws(), buffers(model)
    out = []
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], [p for _, p in params], retain_graph=True, allow_unused=True)
        out.append({n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)})
    return out, after


def buffers(model):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def draws():
    """What torch's, numpy's and Python's global RNGs give next."""
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def check_same_draws(model, forward: Callable, sample_losses: Callable, seed: int = 5, style: str = "all-layer",
                     compiled: bool = False, rtol: float = 1e-9) -> float:
    """Privatize a copy of ``model`` (R at the median norm, loss_reduction "sum"), run ``forward`` on it once
    from ``seed`` and compare every private_grad with the same-draw reference; assert the RNG streams then
    continue, and the buffers (power-iteration estimates...) are, as after one unprivatized forward.
    ``sample_losses(output)`` is the (B,) per-sample losses. Returns the worst relative error."""
    per_sample, want_after = same_draw_per_sample_gradients(copy.deepcopy(model), forward, sample_losses, seed)
    m = fxdp.privatize(copy.deepcopy(model), style=style, max_grad_norm=1.0, loss_reduction="sum")
    groups = [list(g) for g in fxdp.get_engine(m).plan.groups]
    R = median_threshold(per_sample, groups)
    fxdp.unprivatize(m)
    fxdp.privatize(m, style=style, max_grad_norm=R, loss_reduction="sum")
    run = torch.compile(m, backend="fxdp", options={"compiler": "aot_eager"}) if compiled else m
    seed_all(seed)
    losses = sample_losses(forward(run))
    assert draws() == want_after[0], "the privatized forward changed what the user's RNG streams give next"
    got = buffers(m)
    for name, want in want_after[1].items():
        assert torch.equal(got[name], want), f"buffer {name} is not what one unprivatized forward leaves"
    losses.sum().backward()
    expected, norms = reference_private_grads(per_sample, groups, R)
    thr = R / len(groups) ** 0.5
    assert any(n > thr for gn in norms for n in gn) and any(n < thr for gn in norms for n in gn)
    worst = 0.0
    floor = 1e-6 * max(float(e.abs().max()) for e in expected.values())  # gradients that are 0 up to round-off
    for name, p in m.named_parameters():
        want = expected[name]
        assert p.grad is None, f"{name}: p.grad was written by the private path"
        err = float((p.private_grad - want).abs().max()) / max(float(want.abs().max()), floor)
        assert err < rtol, f"{name}: relative error {err:.3e}"
        worst = max(worst, err)
    return worst
