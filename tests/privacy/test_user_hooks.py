"""User forward pre-hooks on the privatized model run inside fxdp's per-forward checks.

A pre-hook registered before ``privatize`` ran before fxdp's, so a batch-wide min-max scaling in it
was invisible to the mixing checks: removing one example moved the update by 2.5 R. fxdp's pre-hook
now runs first, and the hook's ops are checked like the forward's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.core.errors import SampleMixingError


def _model_with_pre_hook(hook):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model.register_forward_pre_hook(hook)
    return fxdp.privatize(model, max_grad_norm=0.1)


def test_a_pre_hook_that_scales_by_batch_statistics_is_refused():
    model = _model_with_pre_hook(lambda m, inp: ((inp[0] - inp[0].min()) / (inp[0].max() - inp[0].min()),))
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    x[0], x[5, 2] = 0.0, 30.0  # the extremes are where the analysis's few probed samples do not move them
    with pytest.raises(SampleMixingError, match="across the batch dimension"):
        F.cross_entropy(model(x), y).backward()


def test_a_per_sample_pre_hook_keeps_the_clipped_sum_exact():
    model = _model_with_pre_hook(lambda m, inp: (inp[0] * 2.0,))
    plain = fxdp.privatize(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(), max_grad_norm=0.1)
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(2.0 * x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.private_grad, q.private_grad, rtol=1e-10, atol=1e-12)
