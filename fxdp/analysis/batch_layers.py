"""Batch-dimension rules for layer ops: linear, embedding, convolution, pooling, normalisation,
attention and losses (see :mod:`fxdp.analysis.batch_dims`; the rule protocol is in
:mod:`fxdp.analysis.batch_rules`)."""
from __future__ import annotations

import torch

from fxdp.analysis.batch_rules import ABSENT, tensors_of, agree, derived


def batch_of(ctx, func, args, kwargs, out):
    """embedding(ids, weight) / one_hot(ids): the ids' batch dimension, new dims at the end."""
    pl = ctx.place(args[0])
    return pl if pl is not ABSENT else None


def linear(ctx, func, args, kwargs, out):
    """F.linear(x, W, b) / F.bilinear(x1, x2, W, b): the features (last dim) are contracted."""
    if getattr(func, "__name__", "") == "bilinear":
        xs, w = list(args[:2]), (args[2] if len(args) > 2 else kwargs.get("weight"))
    else:
        xs, w = list(args[:1]), (args[1] if len(args) > 1 else kwargs.get("weight"))
    if not isinstance(out, torch.Tensor) or (isinstance(w, torch.Tensor) and ctx.place(w) is not ABSENT):
        return None
    pairs = derived(ctx, tensors_of(xs))
    for t, pl in pairs:
        if pl is None:
            return None
        if pl[0] == t.dim() - 1:
            return ctx.mix(t, f"contracts the batch dimension (dim {pl[0]}, the feature dimension) in a linear layer")
    return agree(ctx, pairs, out.dim()) if pairs else None


def conv(ctx, func, args, kwargs, out):
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    pl = ctx.place(x)
    if pl is ABSENT or pl is None or (isinstance(w, torch.Tensor) and ctx.place(w) is not ABSENT):
        return None
    bd, k = pl
    batched = isinstance(w, torch.Tensor) and x.dim() == w.dim()
    if batched and bd == 0:
        return (0, k)
    return ctx.mix(x, f"convolves over the batch dimension (dim {bd} of the input: channels or space)")


def spatial(ctx, func, args, kwargs, out):
    """Pooling, resampling, pixel shuffles: per (sample, channel); the batch stays where it is."""
    pl = ctx.place(args[0]) if args else ABSENT
    if pl is ABSENT or pl is None or pl[0] > 1:
        return None
    return pl


def norm_layer(ctx, func, args, kwargs, out):
    x = args[0]
    pl = ctx.place(x)
    if pl is ABSENT or pl is None:
        return None
    bd, k = pl
    name = getattr(func, "__name__", "")
    n = x.dim()
    if name in ("layer_norm", "rms_norm"):
        shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
        m = 1 if isinstance(shape, int) else len(shape)
        if bd >= n - m:
            return ctx.mix(x, f"normalises over the batch dimension (dim {bd}) in {name}")
        return pl
    if name == "group_norm":
        return pl if bd == 0 else ctx.mix(x, f"normalises over the batch dimension (dim {bd}) in group_norm")
    if name == "instance_norm":
        return pl if bd <= 1 else ctx.mix(x, f"normalises over the batch dimension (dim {bd}) in instance_norm")
    if name == "local_response_norm":
        return pl if bd != 1 else ctx.mix(x, "normalises across the batch dimension (dim 1) in local_response_norm")
    # batch_norm: refused in training mode by the interceptor; with running statistics it is per channel
    return pl if bd != 1 else None


def sdpa(ctx, func, args, kwargs, out):
    q, k_, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
    if not isinstance(out, torch.Tensor):
        return None
    lead, found = set(), None
    for role, t in (("query", q), ("key", k_), ("value", v)):
        pl = ctx.place(t) if isinstance(t, torch.Tensor) else ABSENT
        if pl is ABSENT:
            continue
        if pl is None:
            return None
        bd, k = pl
        n = t.dim()
        if bd == n - 1 or (role != "query" and bd == n - 2):
            return ctx.mix(t, f"attends across the batch dimension (dim {bd} of the {role})")
        if bd == n - 2:
            found = (out.dim() - 2, k)
        else:
            lead.add((bd + out.dim() - n, k))
    if found is not None:
        return found if not lead else None
    return lead.pop() if len(lead) == 1 else None


def mha(ctx, func, args, kwargs, out):
    """F.multi_head_attention_forward: (L, N, E) inputs, (attention (L, N, E), weights (N, L, S))."""
    q = args[0]
    pl = ctx.place(q)
    if pl is ABSENT or pl is None:
        return None
    bd, k = pl
    if q.dim() == 3 and bd == 1:
        return [(1, k), (0, k)]
    return ctx.mix(q, f"attends across the batch dimension (dim {bd} of the query of multi_head_attention_forward)")


def loss(ctx, func, args, kwargs, out):
    """Per-element losses keep the batch dimension; reduced losses are the training loss (not refused)."""
    if kwargs.get("reduction", "mean") != "none" or not isinstance(out, torch.Tensor):
        return None
    pl = ctx.place(args[0])
    if pl is ABSENT or pl is None:
        return None
    if out.dim() == args[0].dim():
        return pl
    return pl if pl[0] == 0 else None
