"""A ``loss.backward()`` inside the ``torch.autocast`` block still clips and sums in fp32.

Autocast is thread-local and the finalize runs at the end of the backward, on the caller's thread:
inside the block its norms and clipped-sum GEMMs were autocast to bf16, and removing one example
moved the clipped sum by 3.4 R at B = 2048 (backward outside the block: 1.0 R).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
@pytest.mark.parametrize("fn", ["abadi", "automatic"])
def test_backward_inside_autocast_moves_the_clipped_sum_by_at_most_R(style, fn):
    B, R = 2048, 0.1
    torch.manual_seed(0)
    model = fxdp.privatize(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)), style=style,
                           max_grad_norm=R, clipping_fn=fn, loss_reduction="sum")
    x, y = 1 + 0.3 * torch.randn(B, 16), torch.zeros(B, dtype=torch.long)

    def clipped_sum(keep):
        fxdp.clear_private_grads(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x[keep]).float(), y[keep], reduction="sum").backward()
        return torch.cat([p.private_grad.double().reshape(-1) for p in model.parameters()])

    full = clipped_sum(torch.arange(B))
    worst = max(float((full - clipped_sum(torch.arange(B) != i)).norm()) / R for i in (0, 7, 1500))
    assert 0.5 <= worst <= 1 + 1e-4, worst
