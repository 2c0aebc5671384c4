"""Batch layout: where the samples sit in every tapped tensor.

Sample-permutation test. The base run sees samples (0, 1, 2), the roll run
(1, 2, 0). For a tensor X whose dimension k carries the samples, the roll
run's tensor equals X permuted along k (or along the sample axis of k's rows
when k flattens (B, m) or (m, B) rows). A tensor that does not change under
the permutation does not depend on the samples' contents; the dimension that
changes size between the base run and the run with one sample fewer then
tells whether (and where) it still has a batch dimension (all-zero token type
ids, a parameter expanded to the batch). Nothing is assumed from sizes alone:
B == T cannot fool the analysis.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxdp.core.errors import BatchLayoutError
from fxdp.core.layout import BatchLayout, LayoutKind
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values, up to float round-off of the same computation.

    Non-finite entries (a NaN or inf example in the analysed batch) must sit at
    the same places with the same kind; the tolerance comes from finite entries
    only, so an inf can never make every candidate layout look equal.
    """
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a64, b64 = a.double(), b.double()
    fa, fb = torch.isfinite(a64), torch.isfinite(b64)
    if not torch.equal(fa, fb):
        return False
    if not fa.all():
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            if not torch.equal(mask(a64), mask(b64)):
                return False
        a64, b64 = a64[fa], b64[fb]
    scale = float(a64.abs().max()) if a64.numel() else 0.0
    tol = 1e-4 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if a.dtype == torch.float64:
        tol = 1e-9
    return bool(torch.allclose(a64, b64, rtol=tol * 10, atol=tol * max(scale, 1e-12)))


def permute_samples(x: torch.Tensor, layout: BatchLayout, n: int, perm: list) -> torch.Tensor:
    """Reorder the samples of x (batch size n) so that new sample j = old sample perm[j]."""
    xb = layout.to_batch_first(x, n)
    xb = xb[torch.tensor(perm, device=x.device)]
    k = layout.dim
    if layout.kind is LayoutKind.BATCH:
        return xb.movedim(0, k)
    if layout.kind is LayoutKind.ROWS_MAJOR:
        return xb.movedim(0, k).flatten(k, k + 1)
    return xb.movedim(0, k + 1).flatten(k, k + 1)


def candidates(shape, n):
    for k, size in enumerate(shape):
        if size == n:
            yield BatchLayout(LayoutKind.BATCH, k)
        elif n > 1 and size > n and size % n == 0:
            yield BatchLayout(LayoutKind.ROWS_MAJOR, k)
            yield BatchLayout(LayoutKind.ROWS_MINOR, k)


def scaled_dim(shape, small_shape, n) -> Optional[BatchLayout]:
    """The dimension whose size scales with the number of samples, if any."""
    if len(shape) != len(small_shape):
        raise BatchLayoutError(f"fxdp: a tensor changes rank with the batch size ({shape} vs {small_shape}).")
    diff = [k for k, (a, b) in enumerate(zip(shape, small_shape)) if a != b]
    if not diff:
        return None
    if len(diff) == 1:
        k = diff[0]
        if shape[k] == n and small_shape[k] == n - 1:
            return BatchLayout(LayoutKind.BATCH, k)
        if shape[k] % n == 0 and small_shape[k] == shape[k] // n * (n - 1):
            return BatchLayout(LayoutKind.ROWS_MAJOR, k)  # order unknown: checked by the caller
    raise BatchLayoutError(f"fxdp: cannot tell where the samples are in a tensor of shape {shape} "
                           f"(shape {small_shape} with one sample fewer).")


def classify(base: torch.Tensor, rolled: torch.Tensor, small_shape, n: int, perm: list, what: str,
             tiled: bool = False) -> BatchLayout:
    """Layout of ``base`` given its counterpart in the roll run (see module docstring); ``tiled``: ``base`` is
    a (virtual) parameter tiled by the broadcast rule (``p.repeat(B*c, ...)``), whose rows may be flattened
    copies."""
    shape = tuple(base.shape)
    if tuple(rolled.shape) != shape:
        raise BatchLayoutError(f"fxdp: {what}: shape {shape} changes when the samples are reordered.")
    if not close(base, rolled):
        for layout in candidates(shape, n):
            if close(permute_samples(base, layout, n, perm), rolled):
                return layout
        raise BatchLayoutError(
            f"fxdp: {what}: could not locate the samples in a tensor of shape {shape}: reordering the samples "
            "does not reorder this tensor. Either the model mixes samples, or its randomness differs per call.")
    by_shape = scaled_dim(shape, small_shape, n)
    if by_shape is None:
        return BatchLayout(LayoutKind.NONE, 0)
    if by_shape.kind is not LayoutKind.BATCH:
        return _rows_of_copies(base, by_shape.dim, n, what) if tiled else _refuse_unordered(shape, by_shape.dim, n, what)
    return by_shape


def _refuse_unordered(shape, k: int, n: int, what: str):
    raise BatchLayoutError(
        f"fxdp: {what}: dimension {k} of this tensor (shape {shape}) grows with the batch ({n} x "
        f"{shape[k] // n} rows for {n} samples), but the tensor does not change when the samples are reordered: "
        "it does not depend on the samples' values, so nothing tells which of its rows belong to which sample. "
        "Give it a batch dimension of its own first (x.expand(B, ...) before any reshape to B*m rows).")


def _rows_of_copies(base: torch.Tensor, k: int, n: int, what: str) -> BatchLayout:
    """Layout of a batch-free tensor tiled to n*m rows along dim k (``u.repeat(B, 1, 1)`` to (B*H, S, d),
    ``u.repeat_interleave(B, 0)``): the grouping of its rows into n samples of m under which every sample
    holds the same copy -- B-major preferred when both do (m copies of one row). Which rows really serve
    which sample is decided by the ops after it, and checked on gradients (gradient-mixing pass)."""
    shape = tuple(base.shape)
    for kind in (LayoutKind.ROWS_MAJOR, LayoutKind.ROWS_MINOR):
        layout = BatchLayout(kind, k)
        per_sample = layout.to_batch_first(base, n)
        if all(close(per_sample[0], per_sample[b]) for b in range(1, n)):
            return layout
    raise BatchLayoutError(
        f"fxdp: {what}: a tensor computed without the samples is tiled to {shape[k]} rows along dimension {k} "
        f"(shape {shape}, {n} samples), but no grouping of those rows into {n} samples of {shape[k] // n} gives "
        "every sample the same rows, so fxdp cannot tell which rows belong to which sample. Repeat whole copies "
        "per sample (u.repeat(B, 1, ...) or u.expand(B, ...)) instead.")


def infer_batch_layouts(analysis: Analysis) -> PassResult:
    """Give every entry (and every model output) its batch layout."""
    runs = analysis.runs
    base, roll, small = runs["base"], runs["roll"], runs["small"]
    n = len(base.samples)
    perm = [base.samples.index(s) for s in roll.samples]  # positions within the base run
    if [r.param_names for r in base.records] != [r.param_names for r in roll.records] or \
            [r.param_names for r in base.records] != [r.param_names for r in small.records]:
        analysis.problem(BatchLayoutError(
            "fxdp: the model uses its parameters in a different sequence when the batch changes "
            "(data-dependent control flow over the batch); fxdp cannot match uses across batches."))
        return PassResult(analysis, False)
    for entry, rb, rr, rs in zip(analysis.entries, base.records, roll.records, small.records):
        if entry.virtual:
            continue  # batch-free by construction: checked by check_virtuals
        what = f"{entry.op} using {', '.join(entry.param_names)}"
        try:
            tiled = entry.binding.options.get("op") == "tile" and entry.binding.rule.name == "broadcast"
            entry.layout = classify(rb.source, rr.source, rs.source_shape, n, perm, what, tiled)
            entry.input_layouts = {k: classify(t, rr.inputs[k], tuple(rs.inputs[k].shape), n, perm,
                                               f"input {k} of {what}") for k, t in rb.inputs.items()}
        except BatchLayoutError as exc:
            entry.reason = str(exc)
            analysis.problem(exc)
    analysis.output_layouts = []
    for i, (ob, orr) in enumerate(zip(base.outputs, roll.outputs)):
        small_shape = tuple(small.outputs[i].shape) if i < len(small.outputs) else tuple(ob.shape)
        try:
            analysis.output_layouts.append(classify(ob, orr, small_shape, n, perm, f"model output {i}"))
        except BatchLayoutError as exc:
            analysis.output_layouts.append(None)
            analysis.problem(exc)
    return PassResult(analysis, True)
