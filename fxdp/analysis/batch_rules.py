"""Batch-dimension rules for shape, layout, contraction and layer ops (see :mod:`fxdp.analysis.batch_dims`).

A rule is ``rule(ctx, func, args, kwargs, out) -> place``: ``ctx.place(t)`` is ``ABSENT`` for a
tensor not derived from the batch, ``None`` for one whose batch position is unknown, else
``(dim, k)``; ``ctx.mix(t, what)`` raises :class:`Mixing` when ``t`` is floating point (else it
returns ``None``: an integer or boolean tensor carries no gradient). The place returned is checked
against the output's shape by the monitor (a wrong guess becomes ``None``, never a refusal).
"""
from __future__ import annotations

import inspect
import string

import torch

ABSENT = object()
_T_PROP = inspect.getattr_static(torch.Tensor, "T")


class Mixing(Exception):
    """An op moves values across the batch dimension; ``what`` says how."""

    def __init__(self, what: str, requires_grad: bool = True):
        super().__init__(what)
        self.what = what
        self.requires_grad = requires_grad  # False: the mixed tensor is detached (the monitor may hold it)


class Untracked(Mixing):
    """An op with no batch-dimension rule (or whose rule cannot read the call) gets a tensor whose batch
    position is known: fxdp cannot tell whether it mixes samples, so it is refused as if it did."""


def tensors_of(xs):
    return [x for x in xs if isinstance(x, torch.Tensor)]


def _leaves(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(tensors_of(a))
        elif isinstance(a, torch.Tensor):
            out.append(a)
    return out


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return None


def agree(ctx, pairs, out_ndim):
    """The common output place of derived inputs aligned at the right (broadcasting), or None."""
    cand = set()
    for t, pl in pairs:
        if pl is None:
            return None
        bd, k = pl
        cand.add((bd + out_ndim - t.dim(), k))
    if len(cand) != 1:
        return None
    (bd, k), = cand
    return (bd, k) if bd >= 0 else None


def derived(ctx, ts):
    return [(t, ctx.place(t)) for t in ts if ctx.place(t) is not ABSENT]


_NOT_VALUES = ("type_as", "to", "new_tensor")  # their other tensor argument gives a dtype / device, no values


def elementwise(ctx, func, args, kwargs, out):
    """Elementwise and broadcasting ops. Two inputs whose batch dimensions land on different output
    dimensions (``h[None] * h[:, None]``) pair every sample with every other: refused."""
    o = _first(out)
    if o is None:
        return None
    leaves = tensors_of(args[:1]) if getattr(func, "__name__", "") in _NOT_VALUES else _leaves(args, kwargs)
    pairs = derived(ctx, leaves)
    place = agree(ctx, pairs, o.dim())
    if place is None and pairs and all(isinstance(pl, tuple) for _, pl in pairs):
        values = [t for t, _ in pairs if t.is_floating_point() or t.is_complex()]
        if values and len({(pl[0] + o.dim() - t.dim(), pl[1]) for t, pl in pairs}) > 1:
            return ctx.mix(values[0], "broadcasts batch-derived tensors whose batch dimensions land on different "
                                      "dimensions (as h[None] against h[:, None]), pairing samples with each other")
    return place


def _norm(d, n):
    return d + n if d < 0 else d


def reshape(ctx, func, args, kwargs, out):
    """view / reshape / flatten / (un)squeeze: followed while the batch stays the leading factor of one
    dimension (``(B, T, d) -> (B*T, d)`` gives ``k = T``); one that regroups it with other dimensions
    into several new ones is refused (for floating-point tensors); a merge behind another dimension or a
    split of the batch loses the position."""
    x = args[0]
    pl = ctx.place(x)
    if pl is None or pl is ABSENT or not isinstance(out, torch.Tensor):
        return None
    bd, k = pl
    before = 1
    for s in x.shape[:bd]:
        before *= int(s)
    prefix = 1
    for j, n in enumerate(out.shape):
        n = int(n)
        if prefix == before and n > 0 and n % ctx.B == 0:
            return (j, n // ctx.B)
        prefix *= n
        if prefix > before:
            break
    if _regroups(x.shape, out.shape, bd):
        return ctx.mix(x, f"reshapes the batch dimension (dim {bd}) together with other dimensions into new ones "
                          f"({tuple(x.shape)} -> {tuple(out.shape)}, as h.t().reshape(h.shape)), so rows of the "
                          "result hold several samples; keep the batch dimension whole, or move it first "
                          "(x.transpose(0, 1)) before reshaping")
    return None  # a merge behind another dim ((T, B, d) -> (T*B, d)) or a split of the batch: position lost


def _prefixes(shape):
    out = [1]
    for n in shape:
        out.append(out[-1] * int(n))
    return out


def _regroups(before_shape, after_shape, bd) -> bool:
    """The smallest run of input dims around ``bd`` that the reshape maps onto a run of output dims has
    several non-trivial dims on both sides: the batch is cut into pieces that land in other samples' rows."""
    pin, pout = _prefixes(before_shape), _prefixes(after_shape)
    a = max(i for i in range(bd + 1) if pin[i] in pout)
    b = min(i for i in range(bd + 1, len(pin)) if pin[i] in pout)
    j0 = max(j for j, p in enumerate(pout) if p == pin[a])
    j1 = min(j for j, p in enumerate(pout) if p == pin[b])
    m = sum(1 for n in before_shape[a:b] if int(n) > 1)
    n = sum(1 for s in after_shape[j0:j1] if int(s) > 1)
    return m >= 2 and n >= 2


def expand(ctx, func, args, kwargs, out):
    pl = ctx.place(args[0])
    if pl is None or pl is ABSENT or not isinstance(out, torch.Tensor):
        return None
    return (pl[0] + out.dim() - args[0].dim(), pl[1])


def permute(ctx, func, args, kwargs, out):
    x = args[0]
    pl = ctx.place(x)
    if pl is None or pl is ABSENT:
        return None
    bd, k = pl
    n = x.dim()
    name = getattr(func, "__name__", "")
    if name == "permute":
        dims = kwargs.get("dims", args[1:] if len(args) > 1 else ())
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        dims = [_norm(int(d), n) for d in dims]
        return (dims.index(bd), k) if bd in dims else None
    if name in ("transpose", "swapaxes", "swapdims"):
        vals = list(args[1:3]) + [kwargs[key] for key in ("dim0", "dim1", "axis0", "axis1") if key in kwargs]
        if len(vals) != 2:
            return None
        d0, d1 = (_norm(int(v), n) for v in vals)
        return ((d1 if bd == d0 else d0 if bd == d1 else bd), k)
    prop = getattr(func, "__self__", None) if name == "__get__" else None
    if name == "t" or (prop is _T_PROP and n == 2):
        return ((1 - bd) if n == 2 else bd, k)
    if prop is _T_PROP:
        return (n - 1 - bd, k)
    # mT / H / mH / adjoint: the last two dimensions swap
    if n >= 2 and bd >= n - 2:
        return ((2 * n - 3 - bd), k)
    return (bd, k)


def movedim(ctx, func, args, kwargs, out):
    x = args[0]
    pl = ctx.place(x)
    if pl is None or pl is ABSENT:
        return None
    n = x.dim()
    src = kwargs.get("source", args[1] if len(args) > 1 else None)
    dst = kwargs.get("destination", args[2] if len(args) > 2 else None)
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src, dst = [_norm(s, n) for s in src], [_norm(d, n) for d in dst]
    order = [None] * n
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(n) if i not in src)
    order = [o if o is not None else next(rest) for o in order]
    return (order.index(pl[0]), pl[1])


def repeat(ctx, func, args, kwargs, out):
    x = args[0]
    pl = ctx.place(x)
    if pl is None or pl is ABSENT or not isinstance(out, torch.Tensor):
        return None
    bd, k = pl
    name = getattr(func, "__name__", "")
    if name == "repeat_interleave":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        reps = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        if not isinstance(reps, int) or dim is None:
            return None
        return (bd, k * reps) if _norm(int(dim), x.dim()) == bd else (bd, k)
    sizes = kwargs.get("dims", kwargs.get("repeats", args[1:]))
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = sizes[0]
    sizes = [int(s) for s in sizes]
    sizes = [1] * (x.dim() - len(sizes)) + sizes
    at = bd + len(sizes) - x.dim()
    if sizes[at] != 1:
        return ctx.mix(x, f"repeats the rows of the batch dimension (dim {bd}) {sizes[at]} times")
    return (at, k)


def cat(ctx, func, args, kwargs, out):
    seq = kwargs.get("tensors", args[0] if args else ())
    ts = [t for t in tensors_of(seq) if not (t.dim() == 1 and t.numel() == 0)]  # torch.cat skips legacy empties
    name = getattr(func, "__name__", "")
    dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
    if name in ("vstack", "row_stack"):
        dim = 0
    elif name == "hstack":
        dim = 1 if ts and ts[0].dim() > 1 else 0
    elif name == "dstack":
        dim = 2
    pairs = derived(ctx, ts)
    if not pairs or any(pl is None for _, pl in pairs):
        return None
    places = {pl for _, pl in pairs}
    if len(places) != 1 or len({t.dim() for t in ts}) != 1:
        return None
    (bd, k), = places
    if name in ("stack",):
        d = _norm(int(dim), ts[0].dim() + 1)
        return (bd + (1 if d <= bd else 0), k)
    d = _norm(int(dim), ts[0].dim())
    if d == bd and len(ts) > 1:
        for t, _ in pairs:
            ctx.mix(t, f"concatenates batch-derived rows with other rows along the batch dimension (dim {bd})")
        return None
    return (bd, k)


def _mm_place(ctx, a, b, out_ndim):
    """matmul(a, b) semantics (1-D, 2-D and broadcast batched operands); ABSENT: neither is derived."""
    na, nb = a.dim(), b.dim()
    places = []
    for t, is_a in ((a, True), (b, False)):
        pl = ctx.place(t)
        if pl is ABSENT:
            continue
        if pl is None:
            return None
        bd, k = pl
        n = t.dim()
        if is_a:
            contracted, free = n - 1, (n - 2 if n >= 2 else None)
            free_out = out_ndim - 2 if nb >= 2 else out_ndim - 1
        else:
            contracted, free = (0, None) if n == 1 else (n - 2, n - 1)
            free_out = out_ndim - 1
        if bd == contracted:
            return ctx.mix(t, f"contracts the batch dimension (dim {bd}) in a matrix product (as in h.T @ h)")
        if bd == free:
            places.append((free_out, k, True))
        else:
            places.append((bd + out_ndim - n + (1 if min(na, nb) == 1 else 0), k, False))
    if not places:
        return ABSENT
    if len(places) == 2 and (places[0][2] or places[1][2]):
        return ctx.mix(a if a.is_floating_point() else b,
                       "multiplies the samples of one operand with the samples of the other (an outer product "
                       "between samples, as text @ image.T)")
    if len({p[:2] for p in places}) != 1:
        return None
    return places[0][:2]


def matmul_family(ctx, func, args, kwargs, out):
    o = _first(out)
    if o is None:
        return None
    name = getattr(func, "__name__", "")
    if name == "__rmatmul__":
        a, b = args[1], args[0]
    elif name in ("baddbmm", "addmm", "addbmm", "addmv"):
        keys = {"baddbmm": ("batch1", "batch2"), "addbmm": ("batch1", "batch2"), "addmm": ("mat1", "mat2"),
                "addmv": ("mat", "vec")}[name]
        a = args[1] if len(args) > 1 else kwargs.get(keys[0])
        b = args[2] if len(args) > 2 else kwargs.get(keys[1])
    else:
        a, b = args[0], args[1]
    if name in ("dot", "vdot"):
        for t in (a, b):
            if ctx.place(t) is not ABSENT:
                return ctx.mix(t, "contracts the batch dimension in a dot product")
        return None
    if name in ("outer", "ger"):
        pa, pb = ctx.place(a), ctx.place(b)
        if pa is not ABSENT and pb is not ABSENT:
            return ctx.mix(a if a.is_floating_point() else b, "forms the outer product of two batch-derived vectors")
        return pa if pa is not ABSENT else ((1, pb[1]) if pb is not None else None)
    if name == "inner":
        for t in (a, b):
            pl = ctx.place(t)
            if pl is not ABSENT and pl is not None and pl[0] == t.dim() - 1:
                return ctx.mix(t, "contracts the batch dimension (the last one) in torch.inner")
        pa, pb = ctx.place(a), ctx.place(b)
        if pa is not ABSENT and pb is ABSENT:
            return pa
        if pb is not ABSENT and pa is ABSENT and pb is not None:
            return (a.dim() - 1 + pb[0], pb[1])
        return None
    place = _mm_place(ctx, a, b, o.dim() + (1 if name == "addbmm" else 0))
    if name == "addbmm" and place is not None and place is not ABSENT:
        if place[0] == 0:
            return ctx.mix(a, "sums the matrix products over the batch dimension (addbmm)")
        place = (place[0] - 1, place[1])
    extra = derived(ctx, tensors_of([args[0]])) if name in ("baddbmm", "addmm", "addbmm", "addmv") else []
    if extra:
        both = agree(ctx, extra, o.dim())
        return both if place is ABSENT else (place if both == place else None)
    return None if place is ABSENT else place


def einsum(ctx, func, args, kwargs, out):
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    o = _first(out)
    if not isinstance(eq, str) or o is None:
        return None
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return None
    free = iter(c for c in string.ascii_letters if c not in eq)
    ell = ""
    width = max((t.dim() - (len(s) - 3) for s, t in zip(terms, ops) if "..." in s), default=0)
    ell = "".join(next(free) for _ in range(width))
    terms = [s.replace("...", ell[len(ell) - (t.dim() - (len(s) - 3)):] if t.dim() - (len(s) - 3) else "")
             for s, t in zip(terms, ops)]
    if "->" not in eq:
        counts = {c: "".join(terms).count(c) for c in "".join(terms)}
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    rhs = rhs.replace("...", ell)
    labels = set()
    ks = set()
    for s, t in zip(terms, ops):
        pl = ctx.place(t)
        if pl is ABSENT or not isinstance(t, torch.Tensor):
            continue
        if pl is None or len(s) != t.dim():
            return None
        c = s[pl[0]]
        if c not in rhs:
            return ctx.mix(t, f"contracts the batch dimension (label {c!r}) in einsum({args[0]!r})")
        labels.add(c)
        ks.add(pl[1])
    if len(labels) != 1 or len(ks) != 1:
        return None
    return (rhs.index(labels.pop()), ks.pop())
