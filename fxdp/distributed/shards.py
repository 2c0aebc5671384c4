"""Row shards of FSDP2 parameters: which rows a rank owns, and the reduce-scatter into them.

FSDP2 shards every parameter ``Shard(0)`` with torch.chunk's split: with ``c = ceil(n / W)`` rows per
chunk, rank r owns rows ``[r·c, min((r+1)·c, n))`` (possibly none). :func:`owned_rows` computes that
split and checks it against the parameter's local tensor, so a different layout is refused
(:class:`ShardingError`) rather than noised or reduced at the wrong place.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from fxdp.core.errors import PrivacyError
from fxdp.training.optimizer import accumulation_dtype


class ShardingError(PrivacyError):
    """A sharded model fxdp cannot clip and noise exactly (see :mod:`fxdp.distributed.fsdp`)."""


_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def owned_rows(p, rank: int, world_size: int):
    """``(start, stop)`` of the rows of sharded parameter ``p`` that ``rank`` owns (torch.chunk split)."""
    n = p.shape[0] if p.dim() else 1
    c = math.ceil(n / world_size) if n else 0
    start, stop = min(rank * c, n), min((rank + 1) * c, n)
    local = p.to_local() if hasattr(p, "to_local") else None
    if local is not None and (local.shape[0] if local.dim() else 1) != stop - start:
        raise ShardingError(f"fxdp: a parameter of shape {tuple(p.shape)} has {local.shape[0]} local rows on rank "
                            f"{rank}, not the {stop - start} of an even Shard(0) split; fxdp cannot place its "
                            "noise and reduction.")
    return start, stop, c


@torch.no_grad()
def reduce_scatter_rows(params: Sequence, grads: Dict[int, torch.Tensor], rank: int, world_size: int, *,
                        group=None, bucket_cap_bytes: int = 25 * 2 ** 20) -> int:
    """Replace each full ``grads[id(p)]`` by the sum over ranks of the rows this rank owns, with one
    reduce-scatter per bucket (per accumulation dtype, at most ``bucket_cap_bytes`` of full-size input).
    Returns the number of reduce-scatters."""
    buckets: Dict[tuple, List[list]] = {}
    for p in params:
        key = (grads[id(p)].device, accumulation_dtype(p))
        full = grads[id(p)]
        size = full.numel() * full.element_size()
        open_ = buckets.setdefault(key, [[]])
        if open_[-1] and sum(q[1] for q in open_[-1]) + size > bucket_cap_bytes:
            open_.append([])
        open_[-1].append((p, size))
    calls = 0
    for (device, acc), chunks in buckets.items():
        for chunk in chunks:
            pieces, layout = [], []
            for p, _ in chunk:
                start, stop, c = owned_rows(p, rank, world_size)
                full = grads[id(p)].to(acc).reshape(p.shape[0] if p.dim() else 1, -1)
                padded = full.new_zeros((world_size * c, full.shape[1]))
                padded[: full.shape[0]] = full
                pieces.append(padded.reshape(world_size, -1))
                layout.append((p, stop - start, c * full.shape[1], full.shape[1]))
                grads[id(p)] = None  # the full-size sum is not kept past its reduction
            inp = torch.cat(pieces, dim=1).reshape(-1)
            del pieces
            out = inp.new_empty(inp.numel() // world_size)
            _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=group)
            del inp
            calls += 1
            offset = 0
            for p, rows, width, cols in layout:
                local_shape = (rows,) + tuple(p.shape[1:]) if p.dim() else ()
                grads[id(p)] = out[offset: offset + rows * cols].reshape(local_shape)
                offset += width
    return calls
