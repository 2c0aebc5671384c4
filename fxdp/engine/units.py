"""Privacy units: several rows of a batch that are one example (or one user), clipped once.

Rows that belong to one example -- augmentation multiplicity (De et al. 2022: K augmented views
of each example), several views in one loss -- or examples that belong to one user (user-level
DP) are one *privacy unit*. Clipping each row separately bounds a row's contribution by R, so a
unit of K rows moves the update by up to K·R. Inside :func:`privacy_units` fxdp clips each
unit's **summed** gradient once, in one backward pass, with the same BK rules:

    p.private_grad += Σ_u C_u · Σ_{rows r of u} ∇_p ℓ_r         ‖C_u Σ_r ∇ℓ_r‖ ≤ R

How: every rule describes a row's gradient as a factor (:mod:`fxdp.rules.factors`); a unit's
gradient is the same kind of factor over the concatenation of its rows (low-rank factors and
embedding indices stack the rows' positions, dense per-row gradients are summed), so norms, cross
terms of tied parameters and the clipped sum are computed per unit exactly, ghost or instantiated.
Rows are placed unit by unit, padded with zero rows where units have different sizes.

Guarantees and edge cases:

- One ``with`` block is one backward pass: every forward of the model inside it (one forward of
  all K views, or K forwards, one per view, summed into one loss) is finalized together when
  the backward ends; a second backward for the same block is refused (the unit would be clipped
  twice, 2R). Several forward passes in one backward *without* units are refused as before.
- ``loss_reduction="mean"``: the loss is the mean over *units* of each unit's loss (for K views
  of N examples concatenated in one forward, the plain mean over the K·N rows is that, with a
  unit's loss the mean of its views); fxdp undoes 1/U, U = number of units in the backward, and
  the optimizer's ``expected_batch_size`` counts units. ``"sum"``: the loss is the sum over rows.
- ``engine.last_stats["batch_size"]`` is the number of units; non-finite units contribute zero.
- The rows of one unit must be in the same backward pass; a unit split over micro-batches would be
  clipped once per micro-batch (put a whole unit in one micro-batch).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import enum

import torch

from fxdp.core.errors import PrivacyConfigError, PrivacyError
from fxdp.rules import factors as F


class ViewLayout(enum.Enum):
    """How K views of N examples are laid out along the batch dimension of one forward."""
    STACKED = "stacked"          # torch.cat([v_1, ..., v_K]) / x.repeat(K, ...): row r is example r mod N
    INTERLEAVED = "interleaved"  # x.repeat_interleave(K, 0): row r is example r div K


class UnitScope:
    """The privacy units of one ``with privacy_units(...)`` block (one backward pass)."""

    def __init__(self, ids: Optional[torch.Tensor], views: Optional[int], layout: Optional[ViewLayout] = None):
        self.ids = ids
        self.views = views
        self.layout = layout
        self.finalized = False

    def ids_for(self, batch_size: int) -> torch.Tensor:
        """The unit id of every row of a forward pass of ``batch_size`` rows."""
        if self.views is not None:
            if batch_size % self.views:
                raise ValueError(f"fxdp: privacy_units(views={self.views}) needs a batch of K·N rows (K views of N "
                                 f"examples concatenated along the batch dimension), got {batch_size} rows.")
            if self.layout is ViewLayout.INTERLEAVED:
                return torch.arange(batch_size) // self.views
            return torch.arange(batch_size) % (batch_size // self.views)
        if self.ids.shape[0] != batch_size:
            raise ValueError(f"fxdp: privacy_units got {self.ids.shape[0]} unit ids but the forward pass has "
                             f"{batch_size} rows; give one id per row of the batch.")
        return self.ids


def make_scope(ids=None, views: Optional[int] = None, layout: Optional[str] = None) -> UnitScope:
    """Validate the arguments of :func:`fxdp.privacy_units` (strings and tensors at the API edge).

    ``views=K`` needs ``layout``: the same K·N rows group into different units whether the views were
    stacked (``torch.cat``) or interleaved (``repeat_interleave``), and fxdp cannot tell which from
    the batch; a wrong guess clips the wrong rows together (up to K·R per example)."""
    if (ids is None) == (views is None):
        raise ValueError("fxdp: give privacy_units either ids (one per row) or views=K, not both / neither.")
    if views is not None and (not isinstance(views, int) or isinstance(views, bool) or views < 1):
        raise ValueError(f"fxdp: views must be a positive int, got {views!r}.")
    if views is None and layout is not None:
        raise ValueError("fxdp: privacy_units(layout=...) goes with views=K; ids already say which row is which unit.")
    if views is not None:
        names = [m.value for m in ViewLayout]
        if layout not in names:
            raise PrivacyConfigError(
                f"fxdp: privacy_units(views={views}) needs layout='stacked' (torch.cat of the K views, or "
                f"x.repeat(K, ...): row r is example r mod N) or layout='interleaved' (x.repeat_interleave(K, 0): "
                f"row r is example r // K), got {layout!r}; fxdp cannot tell them apart from the batch, and the "
                "wrong one would clip rows of different examples together. Or pass ids= (one unit id per row).")
        return UnitScope(None, views, ViewLayout(layout))
    if ids is not None:
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"fxdp: privacy unit ids must be a 1-D integer tensor (one id per row), got "
                             f"{tuple(ids.shape)} {ids.dtype}.")
        ids = ids.detach().to("cpu", torch.long)
    return UnitScope(ids, views)


# --------------------------------------------------------------------- finalize side
def _placement(inv: torch.Tensor, num_units: int) -> Tuple[torch.Tensor, int]:
    """Destination slot of every row in a (num_units * kmax) row-stack, unit by unit."""
    counts = torch.bincount(inv, minlength=num_units)
    kmax = int(counts.max()) if inv.numel() else 1
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(inv.numel()) - starts[inv[order]]
    return inv * kmax + pos, kmax


def _stack(t: torch.Tensor, dest: torch.Tensor, num_units: int, kmax: int, fill=0) -> torch.Tensor:
    """Rows of ``t`` (dim 0) placed at ``dest`` in a (num_units, kmax, ...) tensor; the rest ``fill``."""
    out = torch.full((num_units * kmax, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[dest.to(t.device)] = t
    return out.view(num_units, kmax, *t.shape[1:])


def merge_factor(f, inv: torch.Tensor, num_units: int):
    """The factor of each unit's summed gradient from a factor of per-row gradients."""
    dest, kmax = _placement(inv, num_units)
    if isinstance(f, F.LowRankGrad):
        def cat(t):  # (B, G, T, m) -> (U, G, kmax*T, m)
            s = _stack(t, dest, num_units, kmax)
            U, K, G, T, m = s.shape
            return s.permute(0, 2, 1, 3, 4).reshape(U, G, K * T, m)
        return F.LowRankGrad(cat(f.left), cat(f.right), f.shape, f.decision)
    if isinstance(f, F.EmbeddingGrad):
        idx = _stack(f.index, dest, num_units, kmax)
        grad = _stack(f.grad, dest, num_units, kmax)
        return F.EmbeddingGrad(idx.reshape(num_units, -1), grad.reshape(num_units, -1, f.grad.shape[-1]),
                               f.shape, f.decision)
    if isinstance(f, F.DenseGrad):
        out = torch.zeros((num_units, *f.grad.shape[1:]), dtype=f.grad.dtype, device=f.grad.device)
        out.index_add_(0, inv.to(f.grad.device), f.grad)
        return F.DenseGrad(out, f.decision)
    raise TypeError(f"fxdp: privacy units cannot merge gradient factor {type(f).__name__}; this is a bug in fxdp.")


def merge_contexts(contexts, collected) -> Tuple[Dict[str, List[object]], Dict[str, str], int]:
    """Per-unit factors of every parameter over the forward passes of one backward.

    ``collected`` holds ``(per_param, decisions)`` of each context (rows as samples). Returns
    ``(per_param, decisions, number of units)``; the factors of different forward passes become
    separate uses of a parameter over the same units (their cross terms are included)."""
    scopes = {id(c.unit_scope) for c in contexts if c.unit_scope is not None}
    if any(c.unit_scope is None for c in contexts) or len(scopes) != 1:
        raise PrivacyError(
            f"fxdp: one backward pass went through {len(contexts)} forward passes of the privatized model, not all "
            "inside the same fxdp.privacy_units block; samples of different forward passes cannot be matched. "
            "Run every forward of one loss inside one `with fxdp.privacy_units(model, ids)` block.")
    scope = contexts[0].unit_scope
    if scope.finalized:
        raise PrivacyError(
            "fxdp: a second backward pass for the same fxdp.privacy_units block: each privacy unit's summed gradient "
            "must be clipped once, but this would clip its rows again (a unit could move the update by 2R). Put "
            "every forward of the units into one loss and call backward once per block.")
    scope.finalized = True
    ids = [c.unit_ids for c in contexts]
    uniq, inv = torch.unique(torch.cat(ids), return_inverse=True)
    num_units = int(uniq.numel())
    per_param: Dict[str, List[object]] = {}
    decisions: Dict[str, str] = {}
    offset = 0
    for i, (ctx, (pp, dec)) in enumerate(zip(contexts, collected)):
        rows = inv[offset: offset + ctx.batch_size]
        offset += ctx.batch_size
        for name, factors in pp.items():
            per_param.setdefault(name, []).extend(merge_factor(f, rows, num_units) for f in factors)
        decisions.update({(k if i == 0 else f"forward{i}:{k}"): v for k, v in dec.items()})
    return per_param, decisions, num_units
