"""Batch-wide values the structural check used to let through (issue #13 §6, second review).

Each was measured above R with noise off (D vs D minus one example) with no error: a min-max
scaling computed with NumPy (2.1 R), a gradient hook that mixes samples' gradients in backward
(2.9 R), an ``any()`` gate over the batch (2.6 R) and a mean pooling divided by the integer token
count of the whole batch (2.0 R). Values taken out of torch and gradient hooks inside the forward are
refused (a gradient hook may read, not replace, the gradient); boolean / integer reductions over the batch are held, and refused when they meet per-sample
values -- which per-sample mask counts and HF's ``if torch.all(mask == 1)`` never do.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.core.errors import SampleMixingError


class NumpyMinMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a = x.detach().numpy()
        return self.fc((x - float(a.min())) / float(a.max() - a.min()))


class GradientHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.on = nn.Linear(6, 8), nn.Linear(8, 3), False

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.on:  # switched on after the analysed forward (on from the start, the analysis refuses it)
            h.register_hook(lambda g: g + g.sum(0, keepdim=True))
        return self.fc2(h)


class AnyGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.where((x.abs() > 5).any(), x / 10, x))


class BatchTokenCount(nn.Module):
    def __init__(self, per_sample=False):
        super().__init__()
        self.fc, self.head, self.per_sample = nn.Linear(4, 8), nn.Linear(8, 3, bias=False), per_sample

    def forward(self, x):
        m = x[..., 4].long()
        count = m.sum(1, keepdim=True).clamp(min=1) if self.per_sample else m.sum()
        return self.head((torch.tanh(self.fc(x[..., :4])) * m.unsqueeze(-1)).sum(1) / count)


def _step(model, x, y):
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("model_class,match", [(NumpyMinMax, r"numpy\(\) takes a floating-point value"),
                                               (GradientHook, "gradient hook registered inside the privatized forward"),
                                               (AnyGate, "any reduces a mask or count"),
                                               (BatchTokenCount, "mask or count computed from the batch")])
def test_batch_values_leaving_torch_or_gating_every_sample_are_refused(model_class, match):
    """The batches are built so that the analysis's numeric probe (it replaces one of the first samples)
    sees nothing: the extremes, the trigger and the long sequence are in samples it does not touch."""
    torch.manual_seed(0)
    model = fxdp.privatize(model_class().double(), max_grad_norm=0.1)
    if model_class is BatchTokenCount:
        x = torch.randn(12, 10, 5, dtype=torch.float64)
        lengths = torch.ones(12, 1, dtype=torch.long)
        lengths[6] = 10
        x[..., 4] = (torch.arange(10)[None] < lengths).double()
    else:
        x = 0.5 * torch.randn(12, 6, dtype=torch.float64)
        x[0], x[5, 2] = 0.0, 30.0
    if model_class is GradientHook:
        _step(model, x, torch.randint(0, 3, (12,)))
        model.on = True
    with pytest.raises(SampleMixingError, match=match):
        _step(model, x, torch.randint(0, 3, (12,)))


def test_per_sample_mask_counts_are_not_refused():
    torch.manual_seed(0)
    model = fxdp.privatize(BatchTokenCount(per_sample=True).double(), max_grad_norm=0.1)
    x = torch.randn(12, 10, 5, dtype=torch.float64)
    x[..., 4] = (torch.arange(10)[None] < torch.randint(1, 10, (12, 1))).double()
    _step(model, x, torch.randint(0, 3, (12,)))
    assert all(p.private_grad is not None for p in model.parameters())


def test_a_gradient_hook_that_only_reads_is_not_refused():
    seen = []

    class Observed(GradientHook):
        def forward(self, x):
            h = torch.tanh(self.fc1(x))
            h.register_hook(lambda g: seen.append(g.norm()))
            return self.fc2(h)

    model = fxdp.privatize(Observed().double(), max_grad_norm=0.1)
    _step(model, torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)))
    assert seen and model.fc1.weight.private_grad is not None


class NumpyArrayMax(nn.Module):
    """np.asarray goes through Tensor.__array__: 3.3 R before it was refused."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        import numpy as np
        return self.fc(x / float(np.abs(np.asarray(x.detach())).max()))


class HeldCountItem(nn.Module):
    """An integer reduction over the whole batch taken out of torch with .item()."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x / (1 + int((x > 2).sum().item())))


@pytest.mark.parametrize("model_class,match", [(NumpyArrayMax, r"__array__\(\) takes a floating-point value"),
                                               (HeldCountItem, r"and item\(\) takes the mixed value out of torch")])
def test_other_routes_out_of_torch_are_refused(model_class, match):
    model = fxdp.privatize(model_class().double(), max_grad_norm=0.1)
    x = 0.5 * torch.randn(12, 6, dtype=torch.float64)
    x[0], x[5, 2] = 0.0, 30.0
    with pytest.raises(SampleMixingError, match=match):
        _step(model, x, torch.randint(0, 3, (12,)))


def test_module_backward_hooks_are_refused_in_a_private_forward():
    """A backward pre-hook that adds the batch sum of the output gradient (only for B > 3, so the
    analysis saw nothing) moved the update by 2.7 R."""
    from fxdp.core.errors import PrivacyError

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    handle = inner[2].register_full_backward_pre_hook(
        lambda m, g: (g[0] + 3 * float(g[0].shape[0] > 3) * g[0].sum(0, keepdim=True),))
    model = fxdp.privatize(inner, max_grad_norm=0.1)
    with pytest.raises(PrivacyError, match=r"module backward hook\(s\) on 2"):
        _step(model, torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    handle.remove()
    _step(model, torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
