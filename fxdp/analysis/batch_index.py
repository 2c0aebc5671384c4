"""Batch-dimension rules for ``x[index]`` and ``x[index] = v`` (see :mod:`fxdp.analysis.batch_dims`).

Along the batch dimension only the identity is allowed: a full slice (``:``, ``0:B``) or an
integer index tensor equal to ``arange(B)`` (HF's ``logits[torch.arange(B), last_token]``). An
integer (``h[0]``), a partial slice (``h[4:]``), a permutation (``h[perm]``) or a boolean mask
over it is mixing. Basic and advanced indexing follow numpy's placement rule: the dimensions of
the broadcast advanced indices replace the indexed ones when those are adjacent in the index,
else they come first; the batch dimension can then come from ``x`` (kept by a slice, or indexed
by ``arange``) or from a derived index tensor (``pos_embedding[position_ids]``): all must agree.
"""
from __future__ import annotations

import torch

from fxdp.analysis.batch_rules import ABSENT
from fxdp.analysis.batch_reduce import is_arange


def _entries(x, index):
    """The index as a tuple with ``...`` expanded (None when it holds something unsupported)."""
    idx = index if isinstance(index, tuple) else (index,)
    consumed = 0
    for e in idx:
        if e is None or e is Ellipsis:
            continue
        if isinstance(e, torch.Tensor) and e.dtype == torch.bool:
            consumed += e.dim()
        else:
            consumed += 1
    out = []
    for e in idx:
        if e is Ellipsis:
            out.extend([slice(None)] * max(0, x.dim() - consumed))
        else:
            out.append(e)
    return out


def _walk(ctx, x, index):
    """(tokens, advanced, violation, batch_token): tokens describe output dims before advanced
    placement; violation says how the index touches the batch dim of ``x`` when not the identity."""
    pl = ctx.place(x)
    xbd = pl[0] if pl not in (ABSENT, None) else None
    entries = _entries(x, index)
    tokens, adv, violation, d, partial = [], [], None, 0, set()
    for e in entries:
        if e is None:
            tokens.append(("new", None))
        elif isinstance(e, slice):
            size = int(x.shape[d])
            if e.indices(size) != (0, size, 1):
                partial.add(d)
                if d == xbd:
                    violation = f"slices the batch dimension (dim {d}) as [{_fmt(e)}], keeping only some samples"
            tokens.append(("dim", d))
            d += 1
        elif isinstance(e, bool):
            return None
        elif isinstance(e, int):
            if d == xbd:
                violation = f"picks sample {e} of the batch dimension (dim {d})"
            d += 1
        elif isinstance(e, (torch.Tensor, list, tuple)):
            t = e if isinstance(e, torch.Tensor) else torch.as_tensor(e)
            if t.dtype == torch.bool:
                m = max(t.dim(), 1)
                if xbd is not None and d <= xbd < d + m and (bool(t.all()) or routed(ctx, pl, t)):
                    return None
                if xbd is not None and d <= xbd < d + m:
                    violation = f"masks rows of the batch dimension (dim {xbd}) with a boolean index"
                adv.append((len(tokens), t, None, True))
                tokens.append(("adv", None))
                d += m
                continue
            ident = None
            if d == xbd:
                if is_arange(t, int(x.shape[d])):
                    ident = next((i for i, s in enumerate(t.shape) if s != 1), t.dim() - 1)
                elif routed(ctx, pl, t):
                    return None
                else:
                    violation = f"indexes the batch dimension (dim {d}) with a tensor that is not arange(B)"
            adv.append((len(tokens), t, ident, False))
            tokens.append(("adv", None))
            d += 1
        else:
            return None
    tokens.extend(("dim", i) for i in range(d, x.dim()))
    return tokens, adv, violation, xbd, partial


def routed(ctx, pl, index) -> bool:
    """Token routing (a mixture of experts dispatching the rows of ``(B*T, d)``): an index computed
    from the batch, along a dimension that holds several rows per sample. The rows' owners are then
    unknown (the position is lost, not refused); along a plain batch dimension, or with an index
    that does not come from the batch (``randperm``, a constant), it is mixing."""
    return isinstance(pl, tuple) and pl[1] > 1 and ctx.place(index) is not ABSENT



def _fmt(s: slice) -> str:
    parts = ["" if v is None else str(int(v)) for v in (s.start, s.stop, s.step)]
    return ":".join(parts[:2]) + (f":{parts[2]}" if s.step is not None else "")


def getitem_place(ctx, func, args, kwargs, out):
    x, index = args[0], args[1]
    walked = _walk(ctx, x, index)
    if walked is None:
        return None
    tokens, adv, violation, xbd, _ = walked
    if violation is not None:
        return ctx.mix(x, violation)
    pl = ctx.place(x)
    k = pl[1] if pl not in (ABSENT, None) else None
    if not adv:
        if xbd is None:
            return None
        return (tokens.index(("dim", xbd)), k)
    try:
        shapes = [(t.nonzero().shape[:1] if is_bool else t.shape) for _, t, _, is_bool in adv]
        S = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return None
    spots = [i for i, _, _, _ in adv]
    adjacent = spots == list(range(spots[0], spots[0] + len(spots)))
    plain = [tok for tok in tokens if tok[0] != "adv"]
    if adjacent:
        start = sum(1 for tok in tokens[:spots[0]] if tok[0] != "adv")
    else:
        start = 0
    final = plain[:start] + [("S", j) for j in range(len(S))] + plain[start:]
    cands = set()
    if xbd is not None:
        if ("dim", xbd) in final:
            cands.add((final.index(("dim", xbd)), k))
        for _, t, ident, _ in adv:
            if ident is not None:
                cands.add((final.index(("S", len(S) - t.dim() + ident)), k))
    elif pl is None:
        return None
    for _, t, _, is_bool in adv:
        tp = ctx.place(t)
        if tp is ABSENT:
            continue
        if tp is None or is_bool:
            return None
        cands.add((final.index(("S", len(S) - t.dim() + tp[0])), tp[1]))
    return cands.pop() if len(cands) == 1 else None


def setitem_place(ctx, func, args, kwargs, out):
    """``x[index] = v`` (and ``index_put``): batch-derived values written into selected rows of
    the batch dimension move them between samples; otherwise ``x`` keeps (or gains) its place.
    Values whose batch position is known must land exactly on the batch dimension of ``x`` (or, for a
    fresh ``x``, on a dimension the index keeps whole: T5's shift-right): written at a permutation of
    the rows (``z[perm] = h``), accumulated (``index_put(..., accumulate=True)``) or broadcast across
    another dimension they would reach other samples' rows, and are refused."""
    x = args[0]
    accumulate = False
    if getattr(func, "__name__", "").startswith("index_put"):
        index, value = tuple(args[1]), (args[2] if len(args) > 2 else kwargs.get("values"))
        accumulate = bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
    else:
        index, value = args[1], args[2]
    vpl = ctx.place(value) if isinstance(value, torch.Tensor) else ABSENT
    walked = _walk(ctx, x, index)
    pl = ctx.place(x)
    if walked is not None and walked[2] is not None and vpl is not ABSENT:
        ctx.mix(value, f"writes batch-derived values into a selection of the batch dimension ({walked[2]})")
    target = x if out is None else out
    if pl is ABSENT and vpl is not ABSENT:
        place = None if accumulate else _written_place(ctx, x, index, walked, value, vpl)
        if place is None and isinstance(vpl, tuple):
            ctx.mix(value, "writes batch-derived values into a fresh tensor at positions fxdp cannot match to the "
                           "samples (advanced indices, accumulation, or across the dimension of the samples)")
        ctx.set(target, place)
    elif pl is not ABSENT:
        if isinstance(vpl, tuple) and isinstance(pl, tuple) and not _lands_on_batch(ctx, x, index, value, vpl):
            ctx.mix(value, f"writes batch-derived values into x[...] elsewhere than its batch dimension (dim {pl[0]})")
        ctx.set(target, pl if walked is not None else None)
    return ctx.KEEP


class _Supposing:
    """The rule context, with ``x`` supposed to hold the batch at ``place`` (a fresh tensor written into)."""

    def __init__(self, ctx, x, place):
        self.ctx, self.x, self.supposed, self.B = ctx, x, place, ctx.B

    def place(self, t):
        return self.supposed if t is self.x else self.ctx.place(t)

    def mix(self, t, what):
        return self.ctx.mix(t, what)


def _lands_on_batch(ctx, x, index, value, vpl) -> bool:
    """The value's batch dimension, broadcast into ``x[index]``, is the batch dimension of that selection."""
    try:
        sel = getitem_place(ctx, None, (x, index), {}, None)
        shape = x[index].shape
    except Exception:  # Mixing, or an index fxdp cannot replay
        return False
    return isinstance(sel, tuple) and (vpl[0] + len(shape) - value.dim(), vpl[1]) == sel


def _written_place(ctx, x, index, walked, value, vpl):
    """The place of a fresh tensor (``zeros``) after ``x[index] = value`` (T5's shift-right of the
    labels): the value's batch dimension lands on a dimension of ``x`` the index keeps whole (or indexes
    by ``arange(B)``)."""
    if walked is not None and walked[1] and isinstance(vpl, tuple):
        for d in range(x.dim()):
            if int(x.shape[d]) == ctx.B * vpl[1] and _lands_on_batch(_Supposing(ctx, x, (d, vpl[1])), x,
                                                                    index, value, vpl):
                return (d, vpl[1])
        return None
    if walked is None or not isinstance(vpl, tuple) or walked[1]:
        return None
    tokens, partial = walked[0], walked[4]
    pos = vpl[0] + len(tokens) - value.dim()
    if not 0 <= pos < len(tokens) or tokens[pos][0] != "dim" or tokens[pos][1] in partial:
        return None
    d = tokens[pos][1]
    return (d, vpl[1]) if int(x.shape[d]) == ctx.B * vpl[1] else None
