"""Bucketed sum of the optimizer's released gradients over the ranks.

:func:`reduce_private_grads` replaces, on every rank, each ``grads[id(p)]``
(the rank's share: its clipped sum, plus the whole noise on rank 0, added by
:meth:`~fxdp.distributed.optimizer.DistributedDPOptimizer.add_noise` before
the sum) with the sum of the shares over the ranks: the sum then carries the
noise exactly once, and no extra collective is needed to share it. Every rank
receives the same result (a sum all-reduce delivers one result to all ranks),
so every rank then applies the same update.

Layout: parameters are packed, in order, into flat buckets of at most
``bucket_cap_bytes`` per (device, accumulation dtype). The accumulation dtype
is float64 for float64 parameters and float32 otherwise (the optimizer's
``grads`` are already in it): half-precision clipped sums are summed over
ranks in float32. Each bucket is all-reduced asynchronously as soon as it is
packed, so packing the next bucket overlaps the communication of the previous
ones; the results are waited for at the end and left in ``grads`` as views
into the reduced buckets; the optimizer casts to the parameter dtype.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from fxdp.distributed.agreement import digest
from fxdp.training.optimizer import accumulation_dtype



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
def reduce_private_grads(params: Sequence[torch.nn.Parameter], grads: Dict[int, torch.Tensor], *, group=None,
                         bucket_cap_bytes: int = 25 * 2 ** 20) -> int:
    """Sum ``grads[id(p)]`` over the ranks of ``group`` in place of each (module docstring).

    Args:
        params: the trainable parameters, in the same order on every rank.
        grads: ``id(p) -> this rank's share`` in the accumulation dtype; replaced by the sums.
        bucket_cap_bytes: bucket size limit (a single larger parameter gets a bucket of its own).

    Returns:
        The number of buckets (all-reduce calls).
    """
    open_buckets: Dict[tuple, _Bucket] = {}
    launched: List[_Bucket] = []

    def launch(bucket: _Bucket):
        bucket.flat = torch.cat(bucket.pieces)  # always a new tensor: never reduce into a caller's tensor
        bucket.pieces = []
        bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        launched.append(bucket)

    for p in params:
        acc = accumulation_dtype(p)
        piece = grads[id(p)].reshape(-1).to(acc)
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
            grads[id(p)] = bucket.flat[offset: offset + n].view(p.shape)
            offset += n
    return len(launched)
