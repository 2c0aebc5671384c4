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
    norms = {g: sq.clamp(min=0).sqrt() for g, sq in group_sq_norms.items()}
    keep = torch.ones(batch_size, dtype=torch.bool, device=device)
    for n in norms.values():
        keep = keep & torch.isfinite(n).to(keep.device)
    factors = {}
    unclipped = keep.clone()
    for g, n in norms.items():
        unclipped = unclipped & (n <= threshold).to(keep.device)
        c = clip_factor(n, threshold, config.clipping_fn, config.numerical_stability_constant)
        factors[g] = torch.where(keep.to(c.device), c, torch.zeros((), dtype=c.dtype, device=c.device))
    return ClipResult(factors, keep, norms, int((~keep).sum()), unclipped, R)
