"""Shared pieces of the DP-stack tests: float64 data, models, and the per-sample reference step."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from tests import models_zoo as Z
from tests.reference import median_threshold, per_sample_gradients, reference_private_grads, split_batch


def ce_loss(out, target):
    return F.cross_entropy(out, target)


def make_data(n=32, seed=0, d_in=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def make_model(seed=0):
    torch.manual_seed(seed)
    return Z.MLP().double()


def make_loader(n=32, batch_size=8, seed=0, sampler_seed=None):
    x, y = make_data(n, seed)
    gen = None if sampler_seed is None else torch.Generator().manual_seed(sampler_seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, generator=gen)


def all_layer_groups(model):
    return [[n for n, p in model.named_parameters() if p.requires_grad]]


def median_R(model, x, y):
    """R near the median per-sample gradient norm (all-layer), so that some samples are clipped."""
    per_sample = per_sample_gradients(copy.deepcopy(model), split_batch((x,), {}, y), ce_loss)
    return median_threshold(per_sample, all_layer_groups(model))


def per_sample_norms(model, x, y):
    """Each sample's whole (all-layer) gradient norm of its cross-entropy loss (model untouched)."""
    per_sample = per_sample_gradients(copy.deepcopy(model), split_batch((x,), {}, y), ce_loss)
    return [math.sqrt(sum(float(g.double().square().sum()) for g in grads.values())) for grads in per_sample]


def reference_clipped_sum(model, x, y, R, groups=None):
    """{name: sum_b C_b grad_b} from one-sample-at-a-time autograd (model untouched)."""
    if x.shape[0] == 0:
        return {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    clean = copy.deepcopy(model)
    if fxdp.is_privatized(clean):
        fxdp.unprivatize(clean)
    per_sample = per_sample_gradients(clean, split_batch((x,), {}, y), ce_loss)
    total, _ = reference_private_grads(per_sample, groups or all_layer_groups(model), R)
    return total


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close_dicts(got, want, rtol=1e-9, atol=1e-12):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
