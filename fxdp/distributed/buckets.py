"""Bucketed sum of the private gradients over the ranks, with the noise injected once.

:func:`reduce_private_grads` replaces, on every rank, each ``p.private_grad``
with ``Σ_ranks p.private_grad + noise(p)``, where ``noise(p)`` is added by
the reduction's root rank only (rank 0 of the group) to its own contribution
before the sum: the sum then carries the noise exactly once, and no extra
collective is needed to share it. Every rank receives the same result (a
sum all-reduce delivers one result to all ranks), so every rank then applies
the same update.

Layout: parameters are packed, in order, into flat buckets of at most
``bucket_cap_bytes`` per (device, accumulation dtype). The accumulation dtype
is float64 for float64 parameters and float32 otherwise -- the noise is
never added in half precision, and half-precision clipped sums are summed
over ranks in float32. Each bucket is all-reduced asynchronously as soon as
it is packed, so packing (and, on the root, drawing the noise of) the next
bucket overlaps the communication of the previous ones; the results are
waited for at the end. The private gradients are left as float32/float64
views into the reduced buckets; the optimizer casts to the parameter dtype.

The noise of each parameter is drawn in the parameters' order, exactly as the
single-process :class:`fxdp.DPOptimizer` draws it: with the same generator,
a distributed run adds the same noise as a single-process run.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from fxdp.distributed.agreement import digest

NoiseFn = Callable[[torch.nn.Parameter], Optional[torch.Tensor]]


def accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def layout_digest(params: Sequence[torch.Tensor]) -> int:
    """Digest of what :func:`reduce_private_grads` will send: the ranks must agree on it."""
    return digest(repr([(tuple(p.shape), str(accumulation_dtype(p)), p.device.type) for p in params]))


class _Bucket:
    def __init__(self):
        self.params: List[torch.nn.Parameter] = []
        self.pieces: List[torch.Tensor] = []
        self.nbytes = 0
        self.flat: Optional[torch.Tensor] = None
        self.work = None


@torch.no_grad()
def reduce_private_grads(params: Sequence[torch.nn.Parameter], *, group=None, noise: Optional[NoiseFn] = None,
                         bucket_cap_bytes: int = 25 * 2 ** 20) -> int:
    """Sum ``p.private_grad`` over the ranks of ``group`` in place of each (module docstring).

    Args:
        params: the trainable parameters, in the same order on every rank; each has a private_grad.
        noise: on the rank that injects the noise, ``noise(p)`` returns the float32 noise of
            ``p`` (or None); None on every other rank.
        bucket_cap_bytes: bucket size limit (a single larger parameter gets a bucket of its own).

    Returns:
        The number of buckets (all-reduce calls).
    """
    open_buckets: Dict[tuple, _Bucket] = {}
    launched: List[_Bucket] = []

    def launch(bucket: _Bucket):
        bucket.flat = torch.cat(bucket.pieces)  # always a new tensor: never reduce into a private_grad
        bucket.pieces = []
        bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        launched.append(bucket)

    for p in params:
        acc = accumulation_dtype(p)
        piece = p.private_grad.detach().reshape(-1).to(acc)
        extra = noise(p) if noise is not None else None
        if extra is not None:
            piece = piece + extra.reshape(-1).to(device=piece.device, dtype=acc)
        key = (p.device, acc)
        bucket = open_buckets.get(key)
        size = piece.numel() * piece.element_size()
        if bucket is not None and bucket.nbytes + size > bucket_cap_bytes:
            launch(open_buckets.pop(key))
            bucket = None
        if bucket is None:
            bucket = open_buckets[key] = _Bucket()
        bucket.params.append(p)
        bucket.pieces.append(piece)
        bucket.nbytes += size
    for bucket in open_buckets.values():
        launch(bucket)
    for bucket in launched:
        bucket.work.wait()
        offset = 0
        for p in bucket.params:
            n = p.numel()
            p.private_grad = bucket.flat[offset: offset + n].view(p.shape)
            offset += n
    return len(launched)
