"""Batch-dimension rules for reductions, scans and selections along a dim (see :mod:`fxdp.analysis.batch_dims`).

Each op is described by where its ``dim`` argument sits and what it defaults to; along the batch
dimension it mixes (a sum, a softmax, a sort, ``index_select`` of other rows, ``split``); along
another dimension the batch dimension stays, shifted by the dimensions the op removes.
"""
from __future__ import annotations

import torch

from fxdp.analysis.batch_rules import ABSENT, agree, derived

FULL = "full"  # no dim given: over every element (the monitor's full-reduction check covers the float case)
# name -> (position of dim, default when absent); the output keeps its rank iff the op is a scan/sort
REDUCE = {
    (1, FULL): "sum mean nansum nanmean amax amin aminmax max min std var std_mean var_mean median nanmedian prod "
               "logsumexp argmax argmin all any count_nonzero".split(),
    (2, FULL): "norm quantile nanquantile vector_norm".split(),
    (1, -1): "mode".split(),
    (2, -1): "kthvalue".split(),
    (2, (-2, -1)): "matrix_norm".split(),
}
ALONG = {  # shape-preserving (or nearly: topk, diff, glu) ops that combine values along dim
    "softmax": (1, None), "log_softmax": (1, None), "softmin": (1, None), "cumsum": (1, None),
    "cumprod": (1, None), "logcumsumexp": (1, None), "cummax": (1, None), "cummin": (1, None),
    "normalize": (2, 1), "glu": (1, -1), "sort": (1, -1), "argsort": (1, -1), "msort": (9, 0), "topk": (2, -1),
    "diff": (2, -1), "gumbel_softmax": (4, -1), "cosine_similarity": (2, 1), "pairwise_distance": (9, -1),
}
SELECT = {  # name -> (position of dim, default, kind)
    "index_select": (1, None, "index"), "narrow": (1, None, "narrow"), "select": (1, None, "select"),
    "gather": (1, None, "gather"), "take_along_dim": (2, None, "gather"),
    "scatter": (1, None, "scatter"), "scatter_add": (1, None, "scatter"), "scatter_reduce": (1, None, "scatter"),
    "scatter_": (1, None, "scatter"), "scatter_add_": (1, None, "scatter"), "scatter_reduce_": (1, None, "scatter"),
    "index_add": (1, None, "scatter"), "index_add_": (1, None, "scatter"), "index_copy": (1, None, "scatter"),
    "index_copy_": (1, None, "scatter"), "index_reduce": (1, None, "scatter"), "index_reduce_": (1, None, "scatter"),
    "split": (2, 0, "pieces"), "tensor_split": (2, 0, "pieces"), "chunk": (2, 0, "pieces"),
    "unbind": (1, 0, "unbind"), "vsplit": (9, 0, "pieces"), "hsplit": (9, 1, "pieces"), "dsplit": (9, 2, "pieces"),
    "roll": (2, None, "roll"), "flip": (1, None, "flip"), "fliplr": (9, 1, "flip"), "flipud": (9, 0, "flip"),
    "rot90": (2, (0, 1), "flip"), "unfold": (1, None, "window"),
}


def _dims(value, n):
    if isinstance(value, (list, tuple, torch.Size)):
        return [int(v) % n for v in value] if n else []
    return [int(value) % n] if n else []


def _dim_arg(args, kwargs, pos, default, keys=("dim", "axis", "dims")):
    for key in keys:
        if key in kwargs:
            return kwargs[key]
    if len(args) > pos:
        v = args[pos]
        if isinstance(v, (int, list, tuple, torch.Size)) and not isinstance(v, bool):
            return v
    return default


def _name(func):
    return getattr(func, "__name__", str(func))


def is_arange(index, n) -> bool:
    """``index`` (an integer tensor with one dimension of size n, the others 1) equals arange(n)."""
    if not isinstance(index, torch.Tensor) or index.dtype in (torch.bool,) or index.is_floating_point():
        return False
    if index.numel() != n or sum(1 for s in index.shape if s != 1) > 1:
        return False
    return bool(torch.equal(index.reshape(-1).to(torch.long), torch.arange(n, device=index.device)))


def reduction(name, spec):
    pos, default = spec

    def rule(ctx, func, args, kwargs, out):
        x = args[0] if args else kwargs.get("input")
        if name in ("max", "min") and (len(args) > 1 and isinstance(args[1], torch.Tensor) or "other" in kwargs):
            return agree(ctx, derived(ctx, [t for t in list(args) + list(kwargs.values())
                                            if isinstance(t, torch.Tensor)]), out.dim())
        if name in ("cosine_similarity", "pairwise_distance"):
            place = agree(ctx, derived(ctx, [t for t in args[:2] if isinstance(t, torch.Tensor)]),
                          max(t.dim() for t in args[:2]))
            if place is None:
                return None
            x, pl = (args[0] if args[0].dim() >= args[1].dim() else args[1]), place
        else:
            pl = ctx.place(x) if isinstance(x, torch.Tensor) else ABSENT
        if pl is ABSENT or pl is None:
            return None
        bd, k = pl
        dim = _dim_arg(args, kwargs, pos, default)
        if dim is None:
            return None
        if dim is FULL:
            return ctx.mix(x, f"over all elements (no dim) reduces across the batch dimension (dim {bd})")
        dims = _dims(dim, x.dim())
        if bd in dims:
            return ctx.mix(x, f"along dim {bd}, the batch dimension")
        o = out if isinstance(out, torch.Tensor) else next((t for t in out if isinstance(t, torch.Tensor)), None)
        if o is not None and o.dim() < x.dim():
            bd -= sum(1 for d in set(dims) if d < bd)
        return (bd, k)
    return rule


def select(name, spec):
    pos, default, kind = spec

    def rule(ctx, func, args, kwargs, out):
        x = args[0]
        pl = ctx.place(x)
        src = None
        if kind == "scatter":
            src = args[3] if len(args) > 3 else kwargs.get("src", kwargs.get("source"))
            if pl is ABSENT and isinstance(src, torch.Tensor):
                pl = ctx.place(src)
        if pl is ABSENT or pl is None:
            return None
        bd, k = pl
        n = x.dim()
        dim = _dim_arg(args, kwargs, pos, default)
        if kind == "roll":
            shifts = kwargs.get("shifts", args[1] if len(args) > 1 else 0)
            if dim is None:
                return ctx.mix(x, "over the flattened tensor moves values across the batch dimension")
            shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
            for d, s in zip(_dims(dim, n), shifts):
                if d == bd and int(s) % x.shape[d]:
                    return ctx.mix(x, f"along dim {bd}, the batch dimension, moves samples into other rows")
            return pl
        if dim is None:
            return None
        dims = _dims(dim, n)
        hit = bd in dims
        if kind == "flip":
            return ctx.mix(x, f"along dim {bd}, the batch dimension, reorders the samples") if hit else pl
        if kind == "window":
            return ctx.mix(x, f"along dim {bd}, the batch dimension, makes windows of samples") if hit else pl
        if kind == "unbind":
            return ctx.mix(x, f"along dim {bd}, the batch dimension (a loop over the samples)") if hit \
                else (bd - (1 if dims[0] < bd else 0), k)
        if kind == "pieces":
            return ctx.mix(x, f"along dim {bd}, the batch dimension, separates the samples into pieces") \
                if hit and len(out) > 1 else pl
        if kind == "select":
            return ctx.mix(x, f"picks one sample of dim {bd}, the batch dimension") if hit \
                else (bd - (1 if dims[0] < bd else 0), k)
        if not hit:
            return pl
        size = x.shape[bd]
        if kind == "narrow":
            start, length = (list(args[2:4]) + [kwargs.get("start"), kwargs.get("length")])[:2]
            if int(start) == 0 and int(length) == size:
                return pl
            return ctx.mix(x, f"keeps rows {int(start)}..{int(start) + int(length) - 1} of dim {bd}, "
                              "the batch dimension")
        index = args[2] if len(args) > 2 else kwargs.get("index", kwargs.get("indices"))
        if kind == "gather" and name == "take_along_dim":
            index = args[1] if len(args) > 1 else kwargs.get("indices")
        if kind == "index" and is_arange(index, size):
            return pl
        if kind in ("gather", "scatter") and isinstance(index, torch.Tensor) and index.dim() == n and _along(index, bd):
            return pl
        if k > 1 and isinstance(index, torch.Tensor) and ctx.place(index) is not ABSENT:
            return None  # token routing by an index computed from the batch (see batch_index.routed)
        who = src if kind == "scatter" and isinstance(src, torch.Tensor) and ctx.place(src) is not ABSENT else x
        return ctx.mix(who, f"along dim {bd}, the batch dimension, with an index that is not arange(B): "
                            "it moves values between samples")
    return rule


def _along(index, bd) -> bool:
    """``index[..., i, ...] == i`` along ``bd`` everywhere (gather/scatter that keep every row)."""
    if index.is_floating_point() or index.dtype == torch.bool:
        return False
    shape = [1] * index.dim()
    shape[bd] = index.shape[bd]
    ar = torch.arange(index.shape[bd], device=index.device).view(shape)
    return bool(torch.equal(index.to(torch.long), ar.expand_as(index)))


__all__ = ["REDUCE", "ALONG", "SELECT", "reduction", "select", "is_arange"]
