"""Clip factors per group (pure functions, no state).

For group g with threshold R_g = R / sqrt(G) and per-sample group norm n_b:

- abadi:     C_b = min(1, R_g / (n_b + gamma))
- automatic: C_b = R_g / (n_b + gamma)
- global:    C_b = 1[n_b <= R_g]

so that ``|| sum_g C_bg * grad_bg || <= R`` for abadi and global, and
``<= R * n/(n+gamma) < R`` for automatic: each sample's clipped contribution is
bounded by R, which is the sensitivity the noise is calibrated to.

A sample whose norm in any group is NaN or inf gets C = 0 in every group (it
contributes nothing, as in jax_privacy) and is counted.

``unclipped`` marks the samples whose norm is finite and ``<= R_g`` in every group
(what adaptive clipping counts; :mod:`fxdp.engine.clip_bound`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fxdp.core.config import ClippingFn, DPConfig


def clip_factor(norms: torch.Tensor, threshold: float, fn: ClippingFn, gamma: float) -> torch.Tensor:
    if fn is ClippingFn.ABADI:
        return (threshold / (norms + gamma)).clamp(max=1.0)
    if fn is ClippingFn.AUTOMATIC:
        return threshold / (norms + gamma)
    return (norms <= threshold).to(norms.dtype)


@dataclass
class ClipResult:
    factors: Dict[int, torch.Tensor]   # group -> (B,)
    keep: torch.Tensor                 # (B,) bool: samples with finite norms
    norms: Dict[int, torch.Tensor]     # group -> (B,) true per-sample norms
    num_nonfinite: int
    unclipped: Optional[torch.Tensor] = None   # (B,) bool: finite and norm <= R_g in every group
    max_grad_norm: Optional[float] = None      # the R these factors were computed with


def clip_groups(group_sq_norms: Dict[int, torch.Tensor], num_groups: int, config: DPConfig,
                batch_size: int, device=None, max_grad_norm: Optional[float] = None) -> ClipResult:
    """Per-group clip factors for one batch from per-group squared norms, with R = ``max_grad_norm``
    (the engine's current :class:`~fxdp.engine.clip_bound.ClipBound`; default ``config.max_grad_norm``)."""
    R = config.max_grad_norm if max_grad_norm is None else float(max_grad_norm)
    threshold = R / math.sqrt(max(num_groups, 1))
    groups = list(group_sq_norms)
    if not groups:
        keep = torch.ones(batch_size, dtype=torch.bool, device=device)
        return ClipResult({}, keep, {}, 0, keep.clone(), R)
    sq = [group_sq_norms[g] for g in groups]
    dt = sq[0].dtype
    for t in sq[1:]:
        dt = torch.promote_types(dt, t.dtype)
    # all groups at once: one (num_groups, B) tensor of norms, one finiteness and one factor computation
    norms = torch.stack([t.to(device=sq[0].device, dtype=dt) for t in sq]).clamp(min=0).sqrt()
    keep = torch.isfinite(norms).all(0)
    unclipped = keep & (norms <= threshold).all(0)
    c = clip_factor(norms, threshold, config.clipping_fn, config.numerical_stability_constant)
    c = torch.where(keep, c, torch.zeros((), dtype=c.dtype, device=c.device))
    if device is not None:
        keep, unclipped = keep.to(device), unclipped.to(device)
    factors = {g: c[i].to(sq[i].dtype) for i, g in enumerate(groups)}  # each group keeps its dtype
    return ClipResult(factors, keep, {g: norms[i].to(sq[i].dtype) for i, g in enumerate(groups)},
                      int((~keep).sum()), unclipped, R)
