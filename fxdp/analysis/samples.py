"""Which samples of the example batch the analysis runs look at.

The batch-layout and sample-mixing passes compare runs on a few samples in
different orders; that only tells anything when those samples are *distinct*:
three identical padded sequences give identical rows whatever the layout. So
the analysis picks up to three pairwise distinct samples of the batch (compared
on every batched input). When the whole batch is one sample repeated, the
floating-point inputs of the analysis copy are perturbed per sample (the
analysis only learns structure: where the samples sit, what mixes them); if
there is no floating-point input to perturb, the batch is refused with a
:class:`~fxdp.core.errors.BatchLayoutError` that says what to do.
"""
from __future__ import annotations

from typing import List

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxdp.core.errors import BatchLayoutError
from fxdp.core.inputs import input_batch_dims


def _sample_slices(args, kwargs, batch_dim, b: int):
    _, leaves, dims = input_batch_dims(args, kwargs, batch_dim)
    return [t.select(d, b) for t, d in zip(leaves, dims) if isinstance(t, torch.Tensor) and d is not None]


def _same(a, b) -> bool:
    return all(x.shape == y.shape and bool(torch.equal(x, y)) for x, y in zip(a, b))


def distinct_samples(args, kwargs, batch_dim, batch_size: int, want: int = 3) -> List[int]:
    """Up to ``want`` indices of pairwise distinct samples, in batch order (first one always 0)."""
    kept, slices = [], []
    for b in range(batch_size):
        s = _sample_slices(args, kwargs, batch_dim, b)
        if not any(_same(s, o) for o in slices):
            kept.append(b)
            slices.append(s)
            if len(kept) == want:
                break
    return kept


def perturbed_inputs(args, kwargs, batch_dim, n: int):
    """(args, kwargs) whose floating-point batched inputs differ per sample (for a batch of one repeated sample).

    Raises BatchLayoutError when no input can be perturbed (integer ids only)."""
    _, leaves, dims = input_batch_dims(args, kwargs, batch_dim)
    flat, spec = tree_flatten((args, kwargs))
    out, changed = [], False
    gen = torch.Generator().manual_seed(20261)
    for t, d in zip(flat, dims):
        if isinstance(t, torch.Tensor) and d is not None and t.is_floating_point():
            shape = [1] * t.dim()
            shape[d] = t.shape[d]
            step = torch.arange(t.shape[d], dtype=torch.float64).view(shape) / max(1, n)
            noise = torch.rand(t.shape, generator=gen, dtype=torch.float64) * step
            t = (t.double() + noise * (1e-2 + t.double().abs())).to(t.dtype)
            changed = True
        out.append(t)
    if not changed:
        raise BatchLayoutError(
            "fxdp: every sample of the first batch is the same, so fxdp cannot tell where the samples sit in the "
            "model's tensors (its analysis compares distinct samples), and the inputs are integers it cannot "
            "perturb. Run the first forward pass (or fxdp.explain) on a batch with at least two distinct samples.")
    return tree_unflatten(out, spec)
