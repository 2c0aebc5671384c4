"""Where the samples of a batch sit inside a tensor.

A :class:`BatchLayout` is found once per call site by the batch-layout
analysis (``fxdp.analysis.batch_layout``) and applied at every step with the
step's actual batch size B, which is never baked in.

Kinds:
- ``BATCH``: dimension ``dim`` has size B and indexes samples.
- ``ROWS_MAJOR``: dimension ``dim`` has size B*m, sample-major (``row // m``).
- ``ROWS_MINOR``: dimension ``dim`` has size m*B, sample-minor (``row % B``),
  as in seq-first attention internals that flatten (T, B) rows.
- ``NONE``: the tensor does not depend on which sample is where.
- ``WHOLE``: a batch of one sample whose layout was never analysed: the whole
  tensor belongs to that sample.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fxdp.core.errors import BatchLayoutError


class LayoutKind(enum.Enum):
    BATCH = "batch"
    ROWS_MAJOR = "rows-major"
    ROWS_MINOR = "rows-minor"
    NONE = "none"
    WHOLE = "whole"


@dataclass(frozen=True)
class BatchLayout:
    kind: LayoutKind
    dim: int = 0

    def describe(self) -> str:
        if self.kind is LayoutKind.NONE:
            return "no batch dim"
        if self.kind is LayoutKind.WHOLE:
            return "single sample"
        if self.kind is LayoutKind.BATCH:
            return f"dim {self.dim}"
        order = "B-major" if self.kind is LayoutKind.ROWS_MAJOR else "B-minor"
        return f"dim {self.dim} ({order} rows)"

    def to_batch_first(self, t: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Return a view of ``t`` shaped (B, ...) with sample b at index b."""
        B = batch_size
        k = self.dim
        if self.kind is LayoutKind.NONE:
            raise BatchLayoutError("fxdp: internal error: asked for the samples of a batch-independent tensor.")
        if self.kind is LayoutKind.WHOLE:
            if B != 1:
                raise BatchLayoutError(f"fxdp: internal error: single-sample layout used for a batch of {B}.")
            return t.unsqueeze(0)
        if k >= t.dim():
            raise BatchLayoutError(f"fxdp: tensor of shape {tuple(t.shape)} has no dimension {k} for the batch.")
        size = t.shape[k]
        if self.kind is LayoutKind.BATCH:
            if size != B:
                raise BatchLayoutError(
                    f"fxdp: batch dimension {k} of a tensor of shape {tuple(t.shape)} has size {size}, "
                    f"but the batch has {B} samples; the model's batch layout changed since it was analysed.")
            return t.movedim(k, 0)
        if B <= 0 or size % B:
            raise BatchLayoutError(
                f"fxdp: flattened batch dimension {k} of shape {tuple(t.shape)} is not a multiple of B={B}.")
        if self.kind is LayoutKind.ROWS_MAJOR:
            return t.unflatten(k, (B, size // B)).movedim(k, 0)
        return t.unflatten(k, (size // B, B)).movedim(k + 1, 0)


def batch_first_2d(t: torch.Tensor, layout: BatchLayout, batch_size: int, feature_dims: int = 1) -> torch.Tensor:
    """(B, T, F): samples first, the last ``feature_dims`` dims flattened into F,
    everything else flattened into T (T = 1 for a plain (B, F) input)."""
    bt = layout.to_batch_first(t, batch_size)
    feat = bt.shape[bt.dim() - feature_dims:] if feature_dims else ()
    F = 1
    for s in feat:
        F *= s
    return bt.reshape(batch_size, -1, F)
