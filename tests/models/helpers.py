"""Shared checks for model-coverage tests: fxdp against the one-sample-at-a-time reference.

``check_against_reference`` privatizes a float64 model, runs one batch, and
compares every ``p.private_grad`` with the clipped sum computed from
materialised per-sample gradients (tests/reference.py), with R set near the
median per-sample norm so that some samples are clipped and some are not.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

import fxdp
from tests.reference import median_threshold, per_sample_gradients, reference_private_grads, split_batch

STYLES = ("all-layer", "layer-wise", "param-wise", "block-wise")


def check_against_reference(model: torch.nn.Module, args: tuple, kwargs: dict, target, loss_fn: Callable,
                            style: str = "all-layer", clipping_fn: str = "abadi", loss_reduction: str = "mean",
                            samples: Optional[list] = None, R: Optional[float] = None, rtol: float = 1e-6,
                            atol: float = 1e-9, **privatize_kwargs) -> dict:
    """Privatize ``model`` (modified in place), run ``loss_fn(model(*args, **kwargs), target).backward()``
    and assert ``private_grad == sum_b C_b grad_b`` for every trainable parameter.

    ``loss_fn(output, target)`` must reduce over the batch as ``loss_reduction`` says; on a batch of one
    it is that sample's loss. ``samples`` (list of (args, kwargs, target)) overrides the batch split.
    Returns a dict with the engine, R and the per-sample norms.
    """
    reference_model = copy.deepcopy(model)
    if samples is None:
        samples = split_batch(args, kwargs, target)
    per_sample = per_sample_gradients(reference_model, samples, loss_fn)
    fxdp.privatize(model, style=style, clipping_fn=clipping_fn, loss_reduction=loss_reduction,
                   max_grad_norm=1.0 if R is None else R, **privatize_kwargs)
    engine = fxdp.get_engine(model)
    groups = [list(g) for g in engine.plan.groups]
    if R is None:
        R = median_threshold(per_sample, groups)
        fxdp.unprivatize(model)
        fxdp.privatize(model, style=style, clipping_fn=clipping_fn, loss_reduction=loss_reduction,
                       max_grad_norm=R, **privatize_kwargs)
        engine = fxdp.get_engine(model)
    out = model(*args, **kwargs)
    loss = loss_fn(out, target)
    loss.backward()
    expected, norms = reference_private_grads(per_sample, groups, R, clipping_fn)
    params = dict(model.named_parameters())
    for name, want in expected.items():
        p = params[name]
        assert p.grad is None, f"{name}: p.grad was written by the private path"
        got = getattr(p, "private_grad", None)
        assert got is not None, f"{name}: no private_grad"
        scale = float(want.abs().max()) + atol
        err = float((got.double() - want.double()).abs().max())
        assert err <= rtol * scale + atol, f"{name} ({style}): max abs error {err:.3e} vs scale {scale:.3e}"
    if style == "all-layer" and clipping_fn == "abadi" and len(samples) >= 3:
        clipped = sum(1 for n in norms if n[0] > R * (1 + 1e-9))
        assert 0 < clipped < len(samples), "R should clip some samples and not others"
    return {"engine": engine, "R": R, "norms": norms, "loss": loss}


def frozen_names(model: torch.nn.Module):
    return [n for n, p in model.named_parameters() if not p.requires_grad]
