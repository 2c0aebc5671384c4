"""Batch-dimension rules for ops that act along chosen dimensions: padding, ``torch.fft``, trapezoid
integration, ``cdist``, batched linear algebra (``linalg.solve``, ``inv``, ``det``, ...) and
``sum_to_size`` (see :mod:`fxdp.analysis.batch_dims`; the rule protocol is in
:mod:`fxdp.analysis.batch_rules`).

Each is per-sample exactly when the dimensions it transforms, pads, integrates, solves over or sums
away are not the batch dimension: then the batch dimension stays where it is (shifted by the
dimensions the op removes); when it is one of them the op moves values between samples and the rule
raises :class:`~fxdp.analysis.batch_rules.Mixing` (an FFT along the batch, ``trapezoid(h, dim=0)``,
``torch.cdist(h, h)`` between samples, ``linalg.solve(A, h)`` with the samples as the equations,
``h.sum_to_size(1, d)``, ``F.pad`` of the batch dimension); and the complex views and ``F.unfold``,
which keep the batch dimension unless they act on it.
"""
from __future__ import annotations

import torch

from fxdp.analysis.batch_rules import ABSENT


def _known(ctx, t):
    pl = ctx.place(t) if isinstance(t, torch.Tensor) else ABSENT
    return pl


def pad(ctx, func, args, kwargs, out):
    """``F.pad(x, (l_last, r_last, l_prev, r_prev, ...))``: padding the batch dimension adds rows that
    are no sample's (and ``reflect`` / ``replicate`` / ``circular`` copy samples into them)."""
    x = args[0]
    widths = kwargs.get("pad", args[1] if len(args) > 1 else ())
    pl = _known(ctx, x)
    if not isinstance(pl, tuple):
        return None
    bd = pl[0]
    widths = [int(w) for w in widths]
    for i in range(len(widths) // 2):
        if x.dim() - 1 - i == bd and (widths[2 * i] or widths[2 * i + 1]):
            return ctx.mix(x, f"pads the batch dimension (dim {bd}), adding or copying rows across samples")
    return pl


_FFT1 = "fft ifft rfft irfft hfft ihfft".split()
_FFT2 = "fft2 ifft2 rfft2 irfft2 hfft2 ihfft2".split()
_FFTN = "fftn ifftn rfftn irfftn hfftn ihfftn".split()
_SHIFT = "fftshift ifftshift".split()
FFT = _FFT1 + _FFT2 + _FFTN + _SHIFT


def fft(name):
    """torch.fft transforms: per sample iff the batch dimension is not among the transformed dims."""
    def rule(ctx, func, args, kwargs, out):
        x = args[0] if args else kwargs.get("input")
        pl = _known(ctx, x)
        if not isinstance(pl, tuple):
            return None
        n = x.dim()
        if name in _SHIFT:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = range(n) if dim is None else ([dim] if isinstance(dim, int) else dim)
        elif name in _FFT1:
            dims = [kwargs.get("dim", args[2] if len(args) > 2 else -1)]
        else:
            s = kwargs.get("s", args[1] if len(args) > 1 else None)
            dim = kwargs.get("dim", args[2] if len(args) > 2 else ((-2, -1) if name in _FFT2 else None))
            if dim is None:
                dim = range(n) if s is None else range(n - len(s), n)
            dims = [dim] if isinstance(dim, int) else dim
        if pl[0] in {int(d) % n for d in dims}:
            return ctx.mix(x, f"(torch.fft) transforms along dim {pl[0]}, the batch dimension")
        return pl
    return rule


def trapezoid(ctx, func, args, kwargs, out):
    """trapezoid / trapz / cumulative_trapezoid(y, x=None, *, dx, dim=-1): integrates along ``dim``."""
    y = args[0] if args else kwargs.get("y")
    pl = _known(ctx, y)
    xs = args[1] if len(args) > 1 else kwargs.get("x")
    if isinstance(xs, torch.Tensor) and _known(ctx, xs) is not ABSENT:
        if not isinstance(pl, tuple) or xs.dim() != y.dim() or _known(ctx, xs) != pl:
            return ctx.mix(xs, "integrates over sample points computed from the batch that fxdp cannot align "
                               "with the samples")
    if not isinstance(pl, tuple) or not isinstance(out, torch.Tensor):
        return None
    bd, k = pl
    dim = int(kwargs.get("dim", -1)) % y.dim()
    if dim == bd:
        return ctx.mix(y, f"integrates along dim {bd}, the batch dimension")
    return (bd - 1 if out.dim() < y.dim() and dim < bd else bd, k)


def cdist(ctx, func, args, kwargs, out):
    """cdist(x1 (*, P, M), x2 (*, R, M)) -> (*, P, R): distances between the rows of x1 and of x2."""
    if not isinstance(out, torch.Tensor):
        return None
    places = set()
    rows = 0
    for t, j in ((args[0], 0), (args[1] if len(args) > 1 else kwargs.get("x2"), 1)):
        pl = _known(ctx, t)
        if pl is ABSENT:
            continue
        if pl is None:
            return None
        bd, k = pl
        n = t.dim()
        if bd == n - 1:
            return ctx.mix(t, f"measures distances over the batch dimension (dim {bd}, the features)")
        if bd == n - 2:
            rows += 1
            places.add((out.dim() - 2 + j, k))
        else:
            places.add((bd + out.dim() - n, k))
    if len(places) > 1 or (rows and len([a for a in args[:2] if _known(ctx, a) is not ABSENT]) > 1):
        return ctx.mix(args[0] if _known(ctx, args[0]) is not ABSENT else args[1],
                       "measures distances between samples (rows of the batch against other rows)")
    return places.pop() if places else None


def solve(ctx, func, args, kwargs, out):
    """linalg.solve(A (*, n, n), B (*, n, k) or (*, n)): the n equations are solved together, the k
    right-hand sides (columns of B) and the leading dimensions separately."""
    A = args[0] if args else kwargs.get("A")
    Bm = args[1] if len(args) > 1 else kwargs.get("B")
    o = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) else None)
    if o is None:
        return None
    if not kwargs.get("left", True):
        for t in (A, Bm):
            if _known(ctx, t) is not ABSENT:
                return ctx.mix(t, "with left=False: fxdp follows the batch through linalg.solve only for left=True")
    vector = Bm.dim() == 1 or (Bm.dim() == A.dim() - 1 and Bm.shape == A.shape[:-1])
    places = set()
    for t, core in ((A, 2), (Bm, 1 if vector else 2)):
        pl = _known(ctx, t)
        if pl is ABSENT:
            continue
        if pl is None:
            return None
        bd, k = pl
        n = t.dim()
        if t is Bm and not vector and bd == n - 1:
            places.add((o.dim() - 1, k))
        elif bd >= n - core:
            return ctx.mix(t, f"solves a linear system whose equations run along the batch dimension (dim {bd})")
        else:  # leading dims broadcast from the right among themselves: (*, n, n) and (*, n[, k]) -> (*, n[, k])
            out_core = 1 if vector else 2
            places.add((bd + (o.dim() - out_core) - (n - core), k))
    if len(places) > 1:
        return ctx.mix(A, "solves systems that pair each sample with other samples' right-hand sides")
    return places.pop() if places else None


MATRIX = "inv inv_ex det slogdet logdet cholesky cholesky_ex matrix_exp matrix_power eigvalsh eigh qr svd svdvals " \
         "pinverse pinv matrix_rank".split()


def matrix(ctx, func, args, kwargs, out):
    """Batched linear algebra on the last two dimensions: per sample iff the batch is a leading one."""
    x = args[0] if args else kwargs.get("A", kwargs.get("input"))
    return _batch_leading(ctx, x, "is a matrix function over the batch dimension (dim {bd}, one of the last two)")


def _batch_leading(ctx, x, what: str):
    """The place of ``x`` when its batch is a leading dimension of an op over its last two; else refused."""
    pl = _known(ctx, x)
    if not isinstance(pl, tuple):
        return None
    if pl[0] >= x.dim() - 2:
        return ctx.mix(x, what.format(bd=pl[0]))
    return pl


def sum_to_size(ctx, func, args, kwargs, out):
    """``x.sum_to_size(*size)``: sums the dimensions the (right-aligned) size drops or makes 1."""
    x = args[0]
    pl = _known(ctx, x)
    if not isinstance(pl, tuple):
        return None
    size = args[1:] if len(args) > 1 else kwargs.get("size", ())
    if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)):
        size = size[0]
    size = [int(s) for s in size]
    bd, k = pl
    lead = x.dim() - len(size)
    if bd < lead or (size[bd - lead] == 1 and x.shape[bd] != 1):
        return ctx.mix(x, f"sums along dim {bd}, the batch dimension")
    return (bd - lead, k)


def per_position(ctx, func, args, kwargs, out):
    """triu / tril: each output element is its input element or zero, by its position in the last two
    dimensions -- per sample when the batch is a leading dimension; with the batch among the last two, which
    entries survive depends on the sample's index (removing one example shifts every later one)."""
    return _batch_leading(ctx, args[0], "keeps or zeroes entries by their index along the batch dimension (dim {bd})")


def complex_view(ctx, func, args, kwargs, out):
    """``view_as_real`` adds a trailing dimension of size 2, ``view_as_complex`` removes one (rotary
    embeddings in complex form): the batch dimension stays where it is unless it is that trailing one."""
    x = args[0] if args else kwargs.get("input")
    pl = _known(ctx, x)
    if not isinstance(pl, tuple):
        return None
    if func is torch.view_as_complex and pl[0] == x.dim() - 1:
        return ctx.mix(x, "pairs the batch dimension's entries into complex numbers (view_as_complex along it)")
    return pl


def unfold(ctx, func, args, kwargs, out):
    """``F.unfold(x, kernel)`` (im2col) of ``(B, C, *spatial)``: patches within each sample, the batch stays
    dim 0; with the batch anywhere else its entries are gathered into other samples' patches."""
    x = args[0] if args else kwargs.get("input")
    pl = _known(ctx, x)
    if not isinstance(pl, tuple):
        return None
    if pl[0] != 0:
        return ctx.mix(x, f"unfolds patches across the batch dimension (dim {pl[0]})")
    return pl


__all__ = ["FFT", "MATRIX", "pad", "fft", "trapezoid", "cdist", "solve", "matrix", "sum_to_size", "per_position",
           "complex_view", "unfold"]
