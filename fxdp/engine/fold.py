"""Folding: a tapped use's gradient turned into per-sample factors as soon as it arrives in backward.

Finalize needs every sample's norm over the whole model before it can clip anything, so BK keeps,
for every tapped use, the tensors its rule needs until the end of backward. Folding computes the
rule's factors of a use (:mod:`fxdp.rules.factors`) when its last gradient arrives, instead of at
the end: a use whose norm is computed by instantiation (the ghost / instantiate decision from its
real shapes, :func:`fxdp.rules.factors.decide`) becomes its dense per-sample gradients there and
then, and the activation and output gradient it was computed from are released while backward
runs -- the per-sample gradients take their place instead of being added at the end (peak
memory), and are formed while those tensors are still in cache. Dense per-sample gradients of
several uses of one parameter in one forward pass (tied weights, a block run twice) are summed
as they arrive: the per-sample gradient of the sum, whose norm includes the cross terms exactly.

Guarantee: folding computes exactly the factors finalize would compute from the same tensors (same
rule, same decision, same compute dtype); it only moves the work earlier. Edge cases:

- a use is folded only when all its gradients have arrived (a compiled call site hands the output
  gradient and each broadcast parameter's gradient in separate captures), and only in a backward
  pass that accumulates into its parameters: an input-gradient pass (``torch.autograd.grad(loss,
  x)``, PGD) leaves it as it was, for a later backward through a retained graph;
- a saved input modified in place after the op used it is refused here, and again in finalize for the
  tensors a low-rank (ghost) factor still reads;
- a use folded in a backward pass that then failed midway cannot be folded again (its tensors are
  released): a retried backward through that forward pass is refused, not counted twice;
- a forward pass of no rows folds nothing (finalize writes zeros).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from fxdp.core.errors import PrivacyError
from fxdp.rules import factors as F


def ready(use) -> bool:
    """Every gradient the use's rule reads has arrived (the output's and each broadcast parameter's)."""
    return use.grad_output is not None and all(r in use.extra_grads for r in use.binding.broadcast)


def refuse_modified_inputs(use) -> None:
    """A saved input of ``use`` modified in place after the op read it would give norms of other values."""
    changed = [k for k, t in use.saved.items() if t._version != use.versions.get(k, t._version)]
    if changed:
        raise PrivacyError(
            f"fxdp: the input of {use.op} ({', '.join(use.binding.param_names)}) was modified in place "
            "after the op used it; its per-sample norms would be computed from other values than "
            "the gradient. Avoid in-place operations on tensors a layer has consumed.")


def _rule_factors(use, batch_size: int) -> Dict[str, object]:
    refuse_modified_inputs(use)
    return use.rule.factors(use.binding, use.saved, use.grad_output, use.extra_grads, use.layout, batch_size)


def _release(use, keep=None) -> None:
    """Drop the use's tensors (``keep``: the saved ones a low-rank factor still reads, for :func:`recheck`);
    the binding held the activations too."""
    use.saved, use.grad_output, use.extra_grads = keep or {}, None, {}
    use.binding.saved, use.binding.layout_source = {}, None


def record_factors(use, factors: Dict[str, object], per_param, decisions, prepare: bool = False) -> bool:
    """Each role's factor of ``use`` into ``per_param`` (dense ones summed, :func:`add_factor`) and its norm
    decision into ``decisions``; with ``prepare``, as :func:`fxdp.rules.factors.prepare` leaves it. True if a
    factor stays low-rank (it still reads the use's tensors)."""
    low_rank = False
    for role, factor in factors.items():
        decisions[f"{use.ordinal}:{role}"] = F.decide(factor)
        if prepare:
            factor = F.prepare(factor)
        low_rank = low_rank or not isinstance(factor, F.DenseGrad)
        add_factor(per_param, use.binding.roles[role], factor)
    return low_rank


def factors_of(use, batch_size: int) -> Dict[str, object]:
    """The rule's factors of one use not folded in backward, per role, its tensors released."""
    out = _rule_factors(use, batch_size)
    _release(use)
    return out


def add_factor(per_param: Dict[str, List[object]], name: str, factor) -> None:
    """Append ``factor`` to ``name``'s factors; a dense one is added to the dense one already there (out of
    place: a rule's dense factor may be a gradient autograd still passes on)."""
    factors = per_param.setdefault(name, [])
    if isinstance(factor, F.DenseGrad):
        for i, f in enumerate(factors):
            if isinstance(f, F.DenseGrad) and f.grad.shape == factor.grad.shape:
                dt = F.compute_dtype(f.grad, factor.grad)
                factors[i] = F.DenseGrad(f.grad.to(dt) + factor.grad.to(dt), "instantiate")
                return
    factors.append(factor)


def fold(use, ctx) -> None:
    """Compute ``use``'s factors now (see module docstring) into ``ctx.folded`` / ``ctx.decisions``.

    The tensors of a factor left low-rank (ghost norm, embedding) stay referenced by it until finalize,
    which checks again that none of them was modified in place meanwhile (:func:`recheck`)."""
    if use.folded:
        raise PrivacyError(
            f"fxdp: backward reached {use.op} ({', '.join(use.binding.param_names)}) again after an earlier backward "
            "pass through the same forward pass stopped midway (an error in backward); fxdp had already formed "
            "this use's per-sample gradients and released what they were computed from, so a second pass would "
            "count them twice or from nothing. Run the forward pass again before the next backward.")
    if ctx.batch_size <= 0 or use.layout is None:
        return
    raw = _rule_factors(use, ctx.batch_size)
    kept = {}
    if record_factors(use, raw, ctx.folded, ctx.decisions, prepare=True):
        # a low-rank factor reads the gradients too: checked with the saved inputs at finalize
        grads = {"<output gradient>": use.grad_output,
                 **{f"<gradient of {r}>": g for r, g in use.extra_grads.items()}}
        grads = {k: g for k, g in grads.items() if isinstance(g, torch.Tensor)}
        kept = {**use.saved, **grads}
        use.versions = {**use.versions, **{k: g._version for k, g in grads.items()}}
    _release(use, kept)
    use.folded = True


def recheck(use) -> None:
    """Finalize, for a folded use: the saved tensors and gradients its low-rank factors still read were not
    modified in place since the forward / the fold (a backward hook or custom Function that writes into an
    activation or a kept gradient after the fold)."""
    refuse_modified_inputs(use)
    use.saved = {}
