"""Batch-dimension rules for layer ops: linear, embedding, convolution, pooling, normalisation,
attention and losses (see :mod:`fxdp.analysis.batch_dims`; the rule protocol is in
:mod:`fxdp.analysis.batch_rules`)."""
from __future__ import annotations

import torch

from fxdp.analysis.batch_rules import ABSENT, tensors_of, agree, derived


def batch_of(ctx, func, args, kwargs, out):
    """embedding(ids, weight) / one_hot(ids): the ids' batch dimension, new dims at the end. A table
    computed from the batch: looking up its rows (batch along dim 0) hands each sample other samples'
    rows; with the batch along the embedding dim (1) and constant ids every sample keeps its column."""
    ids = args[0] if args else kwargs.get("input")
    pl = ctx.place(ids)
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    wpl = ctx.place(w) if isinstance(w, torch.Tensor) else ABSENT
    if wpl is ABSENT:
        return pl if pl is not ABSENT else None
    if wpl is None:
        return None
    if wpl[0] == 0 or pl is not ABSENT:
        return ctx.mix(w, f"looks up rows of a table computed from the batch (its batch dimension is dim {wpl[0]}), "
                          "so a sample's output holds other samples' values")
    return (ids.dim(), wpl[1]) if isinstance(out, torch.Tensor) else None


def embedding_bag(ctx, func, args, kwargs, out):
    """F.embedding_bag(ids (B, L), weight): one bag per row of 2-D ids, so the ids' batch dimension if it
    is dim 0. Flat ids with ``offsets`` (bags fxdp cannot assign to samples), bags along the batch, or a
    table computed from the batch (its rows are other samples' values) are refused."""
    ids = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    o = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) else None)
    if o is None:
        return None
    if isinstance(w, torch.Tensor) and ctx.place(w) is not ABSENT:
        return ctx.mix(o, "sums rows of a table computed from the batch into bags, so a sample's output holds "
                          "other samples' values")
    pl = ctx.place(ids)
    psw = kwargs.get("per_sample_weights", args[3] if len(args) > 3 else None)
    wpl = ctx.place(psw) if isinstance(psw, torch.Tensor) else ABSENT
    if pl is ABSENT and wpl is ABSENT:
        return None
    if pl is None or wpl is None:
        return None
    if ids.dim() != 2:
        return ctx.mix(o, "forms bags of flat ids with offsets, which fxdp cannot assign to samples; pass 2-D ids "
                          "(B, L), one bag per sample")
    if (pl is not ABSENT and pl[0] != 0) or (wpl is not ABSENT and (wpl[0] != 0 or (pl is not ABSENT and wpl != pl))):
        return ctx.mix(o, "forms bags along the batch dimension (the bag of a row holds several samples)")
    return pl if pl is not ABSENT else wpl


def linear(ctx, func, args, kwargs, out):
    """F.linear(x, W, b) / F.bilinear(x1, x2, W, b): the features (last dim) are contracted. A weight
    computed from the batch: with the batch along its input features it is contracted; along its output
    features each output column is one sample's, which is per-sample only if x does not come from the
    batch (else every sample's row meets every other sample's weights)."""
    if getattr(func, "__name__", "") == "bilinear":
        xs, w = list(args[:2]), (args[2] if len(args) > 2 else kwargs.get("weight"))
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
    else:
        xs, w = list(args[:1]), (args[1] if len(args) > 1 else kwargs.get("weight"))
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(out, torch.Tensor):
        return None
    pairs = derived(ctx, tensors_of(xs))
    wpl = ctx.place(w) if isinstance(w, torch.Tensor) else ABSENT
    if wpl is not ABSENT:
        if wpl is None:
            return None
        if wpl[0] != 0 or pairs or w.dim() != 2:
            return ctx.mix(w, f"multiplies by a weight computed from the batch (its batch dimension is dim {wpl[0]}), "
                              "so each sample's output meets other samples' values")
        place = (out.dim() - 1, wpl[1])
        bpl = ctx.place(bias) if isinstance(bias, torch.Tensor) else ABSENT
        return place if bpl is ABSENT or bpl == (bias.dim() - 1, wpl[1]) else None
    for t, pl in pairs:
        if pl is None:
            return None
        if pl[0] == t.dim() - 1:
            return ctx.mix(t, f"contracts the batch dimension (dim {pl[0]}, the feature dimension) in a linear layer")
    if isinstance(bias, torch.Tensor) and ctx.place(bias) is not ABSENT:
        pairs = pairs + [(bias, ctx.place(bias))]
        if any(pl is None for _, pl in pairs):
            return None
        if len({pl[0] + out.dim() - t.dim() for t, pl in pairs}) > 1:
            return ctx.mix(bias, "adds a bias computed from the batch along another dimension than the samples")
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


_RANK = {"1d": 1, "2d": 2, "3d": 3}


def spatial(ctx, func, args, kwargs, out):
    """Pooling, resampling, pixel shuffles: per (sample, channel) over the spatial dims (the last 1, 2 or 3;
    for interpolate / upsample all but the first two); the batch stays where it is, unless it is one of
    the dims the op pools, resamples or shuffles."""
    x = args[0] if args else kwargs.get("input")
    pl = ctx.place(x) if isinstance(x, torch.Tensor) else ABSENT
    if pl is ABSENT or pl is None:
        return None
    bd, k = pl
    name = getattr(func, "__name__", "")
    n = x.dim()
    if name in ("pixel_shuffle", "pixel_unshuffle"):
        touched = {n - 3, n - 2, n - 1}
    elif name in ("channel_shuffle", "native_channel_shuffle"):
        touched = {1}
    else:
        rank = next((r for s, r in _RANK.items() if s in name), n - 2)
        touched = set(range(n - rank, n))
    if name == "grid_sample":
        grid = args[1] if len(args) > 1 else kwargs.get("grid")
        gpl = ctx.place(grid) if isinstance(grid, torch.Tensor) else ABSENT
        if gpl is not ABSENT and gpl != (0, k):
            return ctx.mix(grid, "samples with a grid whose batch dimension is not the input's")
    if bd in touched:
        return ctx.mix(x, f"pools, resamples or shuffles along dim {bd}, the batch dimension")
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


def recurrent(ctx, func, args, kwargs, out):
    """torch.lstm / gru / rnn_tanh / rnn_relu (dense input, hx, params, has_biases, layers, dropout, train,
    bidirectional, batch_first): the recurrence runs along time, each sample alone; outputs
    (output, h_n[, c_n]) with the batch at dim 0 (batch_first) or 1, and at dim 1 of the states."""
    if not (len(args) >= 9 and isinstance(args[3], bool)):
        return None  # packed: its data has no position (the rules refuse a trainable packed RNN)
    x, hx, batch_first = args[0], args[1], bool(args[8])
    want = 0 if batch_first else 1
    ks = set()
    pl = ctx.place(x)
    if pl is None:
        return None
    if pl is not ABSENT:
        if x.dim() != 3 or pl[0] != want:
            return ctx.mix(x, f"runs a recurrence over dim {pl[0]}, the batch dimension (time or features)")
        ks.add(pl[1])
    for h in tensors_of(hx if isinstance(hx, (list, tuple)) else [hx]):
        hp = ctx.place(h)
        if hp is None:
            return None
        if hp is not ABSENT:
            if h.dim() != 3 or hp[0] != 1:
                return ctx.mix(h, f"starts the recurrence from a state whose batch dimension is dim {hp[0]}, not 1")
            ks.add(hp[1])
    if len(ks) != 1:
        return None
    k = ks.pop()
    n = len(out) if isinstance(out, (list, tuple)) else 1
    return [(want, k)] + [(1, k)] * (n - 1)


def recurrent_cell(ctx, func, args, kwargs, out):
    """torch.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell (input (B, d), hx (B, H) ...): per row."""
    places = set()
    for t in tensors_of(list(args[:2]) + (list(args[1]) if isinstance(args[1], (list, tuple)) else [])):
        p = ctx.place(t)
        if p is None:
            return None
        if p is not ABSENT:
            if p[0] != 0 or t.dim() != 2:
                return ctx.mix(t, f"runs a recurrent cell across the batch dimension (dim {p[0]})")
            places.add(p)
    return places.pop() if len(places) == 1 else None
