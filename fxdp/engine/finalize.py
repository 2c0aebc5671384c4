"""Finalize: what the engine does once, at the end of a backward pass, for one forward pass.

A pipeline of small steps, each a function of the previous one's result:

1. :func:`collect` -- every tapped use that received its output gradient gives, through its rule,
   one *factor* per parameter role (:mod:`fxdp.rules.factors`: the per-sample gradient in a form
   whose norms, inner products and clipped sums are cheap); uses whose saved inputs were modified
   in place after the op are refused. Most uses were folded into factors already, in backward,
   when their gradients arrived (:mod:`fxdp.engine.fold`: instantiated per-sample gradients then
   replace the tensors they come from while backward runs).
2. :func:`group_norms` -- per clip group, every sample's squared norm of the SUM of its gradients:
   for a parameter used several times, the squared norms of the parts plus twice every cross
   term (never the sum of norms, never one part only). A low-rank factor whose norm is computed by
   instantiation is instantiated here once and the same per-sample gradients give its clipped sum.
   Parameters of one group whose one factor is a small dense per-sample gradient (biases, norm
   weights) are packed side by side: one norm and one clipped-sum product for all of them.
3. clip factors -- :func:`fxdp.engine.clipping.clip_groups` (pure; one factor per group and sample,
   zero for samples with a non-finite norm).
4. :func:`write_private_grads` -- per trainable parameter, the clipped sum of its factors as one
   matmul / index_add, added to ``p.private_grad`` (zeros for a trainable parameter this pass did
   not use: it is never left out), and the writer recorded. The sum stays in the accumulation
   dtype (float32; float64 for float64 parameters) also for bf16/fp16 parameters: rounding a sum
   of B clipped contributions to half precision before the noise moves it by about
   B·R·2^-8, far more than R (3.4 R measured at B=2048 in bf16); only the released, noised
   gradient is rounded to the parameter dtype (by the optimizer).
5. :func:`step_stats` -- what ``engine.last_stats`` reports.

Scale: with ``loss_reduction="mean"`` the output gradients carry 1/B (this forward's B) and a
GradScaler's loss scale; both are undone before the norms (``scale``), so R bounds each sample's
true gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from fxdp.core.errors import BatchLayoutError, PrivacyError
from fxdp.engine import fold
from fxdp.engine.clipping import ClipResult
from fxdp.rules import factors as F

PerParam = Dict[str, List[object]]


@contextlib.contextmanager
def autocast_off():
    """Finalize in the dtypes it chose: a ``loss.backward()`` inside a ``torch.autocast`` block would
    otherwise run the norms and clipped-sum GEMMs in bf16/fp16 (3.4 R measured at B = 2048)."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p.private_grad``: float64 for float64 parameters, float32 otherwise (never half
    precision before the noise)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def collect(uses, batch_size: int, folded=None, folded_decisions=None) -> Tuple[PerParam, Dict[str, str]]:
    """Factors of every parameter from the uses of one forward pass -- those folded in backward
    (``folded``, :mod:`fxdp.engine.fold`) and the rest, computed here -- and each factor's ghost /
    instantiate decision (``"ordinal:role" -> decision``). Releases the uses' tensors."""
    per_param: PerParam = {}
    decisions: Dict[str, str] = dict(folded_decisions or {})
    if batch_size <= 0:
        return per_param, {}
    for name, factors in (folded or {}).items():
        per_param[name] = list(factors)
    for u in uses:
        if u.folded:
            fold.recheck(u)
            continue
        if u.layout is None:
            raise BatchLayoutError(f"fxdp: no batch layout for {u.op}; this is a bug in fxdp.")
        fold.record_factors(u, fold.factors_of(u, batch_size), per_param, decisions)
    return per_param, decisions


def _total(terms: List[torch.Tensor]) -> torch.Tensor:
    """Sum of (B,) tensors as one stacked reduction (promoted to the widest dtype among them)."""
    if len(terms) == 1:
        return terms[0]
    dt = terms[0].dtype
    for t in terms[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.stack([t.to(dt) for t in terms]).sum(0)


# per-sample gradients of at most this many values per sample (biases, norm weights) are packed side by side
PACK_NUMEL = 1 << 16


@dataclass(eq=False)
class DensePack:
    """The small dense per-sample gradients of several parameters of one clip group, side by side as one
    ``(B, P)`` tensor: one norm and one clipped-sum product for all of them instead of a few small ops per
    parameter. Only parameters with exactly one factor are packed (no cross terms between their uses), so
    the squared norm of a pack's row is exactly the sum of its members' squared per-sample norms."""
    flat: torch.Tensor
    slices: Dict[str, Tuple[int, int, torch.Size]]   # name -> (offset, numel, shape)
    _total: Optional[torch.Tensor] = field(default=None, repr=False)

    def clipped_sum(self, name: str, coef: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """``sum_b coef[b] * grad_b`` of member ``name`` (the product over the whole pack is formed once; every
        member of a pack is in the same group, so all are asked with the same ``coef`` and ``keep``)."""
        if self._total is None:
            self._total = coef.to(self.flat.dtype) @ F.mask_rows(self.flat, keep)
        offset, numel, shape = self.slices[name]
        return self._total[offset:offset + numel].reshape(shape).clone()


@dataclass(eq=False)
class PackedGrad:
    """A parameter's place in a :class:`DensePack` (its one factor after :func:`group_norms`)."""
    pack: DensePack
    name: str


def _pack_small_dense(per_param: PerParam, group_of: Dict[str, int], terms: Dict[int, List[torch.Tensor]],
                      candidates: List[str]) -> None:
    """Pack the single small dense factors of ``candidates`` per (group, dtype, device) and add each pack's
    squared row norms to its group's ``terms``; a lone candidate keeps its factor."""
    packs: Dict[tuple, List[str]] = {}
    for name in candidates:
        g = per_param[name][0].grad
        packs.setdefault((group_of[name], F.compute_dtype(g), g.device), []).append(name)
    for (group, dt, _), names in packs.items():
        factors = [per_param[n][0] for n in names]
        if len(names) == 1:
            terms.setdefault(group, []).append(F.sq_norm(factors[0]))
            continue
        B = factors[0].grad.shape[0]
        flat = torch.cat([f.grad.reshape(B, -1).to(dt) for f in factors], 1)
        slices, offset = {}, 0
        for n, f in zip(names, factors):
            slices[n] = (offset, f.grad[0].numel(), f.shape)
            offset += f.grad[0].numel()
        pack = DensePack(flat, slices)
        terms.setdefault(group, []).append(torch.linalg.vector_norm(flat, dim=1).square())
        for n in names:
            per_param[n] = [PackedGrad(pack, n)]


def group_norms(per_param: PerParam, group_of: Dict[str, int], scale: float) -> Dict[int, torch.Tensor]:
    """Per group, each sample's squared norm of its (scaled) summed gradient, cross terms included.

    Factors whose norm is computed by instantiation are replaced, in ``per_param``, by their dense
    per-sample gradients (:func:`fxdp.rules.factors.prepare`), so the clipped sum reuses them; the low-rank
    factors they replace are released here, so the instantiated gradients take their memory. Parameters
    whose one factor is a small dense one are packed per group (:class:`DensePack`)."""
    terms: Dict[int, List[torch.Tensor]] = {}
    small: List[str] = []
    for name, factors in per_param.items():
        factors[:] = [F.prepare(f) for f in factors]
        if len(factors) == 1 and isinstance(factors[0], F.DenseGrad) and factors[0].grad[0].numel() <= PACK_NUMEL:
            small.append(name)
            continue
        out = terms.setdefault(group_of[name], [])
        out.extend(F.sq_norm(f) for f in factors)
        for i in range(len(factors)):
            for j in range(i + 1, len(factors)):
                out.append(2 * F.inner(factors[i], factors[j]))
    _pack_small_dense(per_param, group_of, terms, small)
    return {g: _total(ts) * (scale * scale) for g, ts in terms.items()}


def _clipped_sum(f, coef: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(f, PackedGrad):
        return f.pack.clipped_sum(f.name, coef, keep)
    return F.clipped_sum(f, coef, keep)


def write_private_grads(params: Dict[str, torch.nn.Parameter], trainable: List[str], per_param: PerParam,
                        result: ClipResult, group_of: Dict[str, int], scale: float, on_write,
                        convert=None) -> None:
    """``p.private_grad += Σ_b C_b(group(p)) · scale · g_b(p)`` for every trainable parameter.

    ``convert(name, p, total)``, if given, turns each full clipped sum into the form ``p.private_grad``
    holds before it is added (a sharded model: this rank's reduce-scattered shard, see
    :mod:`fxdp.core.identity`); it is called for every trainable parameter, in the same order."""
    keep = None if result.num_nonfinite == 0 else result.keep
    coefs: Dict[int, torch.Tensor] = {}
    for name in trainable:
        p = params[name]
        factors = per_param.pop(name, [])
        if factors:
            g = group_of[name]
            if g not in coefs:
                coefs[g] = result.factors[g] * scale
            total = _clipped_sum(factors[0], coefs[g], keep)
            for f in factors[1:]:
                total = total + _clipped_sum(f, coefs[g], keep)
            total = total.to(accumulation_dtype(p))
        else:
            total = torch.zeros(p.shape, dtype=accumulation_dtype(p), device=p.device)  # p may be a DTensor
        if convert is not None:
            total = convert(name, p, total)
        existing = getattr(p, "private_grad", None)
        p.private_grad = total if existing is None else existing.to(total.dtype) + total
        on_write(p)


def step_stats(batch_size: int, result: ClipResult, decisions, loss_scale: float, labels) -> dict:
    return {
        "batch_size": batch_size, "num_nonfinite": result.num_nonfinite, "decisions": decisions,
        "loss_scale": loss_scale,
        "group_norms": {labels[g]: n.detach() for g, n in result.norms.items()},
        "clip_factors": {labels[g]: c.detach() for g, c in result.factors.items()},
        "max_grad_norm": result.max_grad_norm, "unclipped": result.unclipped,
    }
