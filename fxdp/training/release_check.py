"""Release checks of one ``DPOptimizer.step()``: the bound, the loss scale and the public gradients.

- :func:`check_writers`: the engines that wrote the private gradients clipped with the optimizer's R
  (every backward pass since the last step) and loss reduction (Opacus #664: clipping at one bound
  while the noise is calibrated to another).
- :func:`check_loss_scaling`: under ``scaler.step(optimizer)`` the model undid the loss scale.
- :func:`public_gradients`: ``p.grad`` written outside the privatized forward, against the
  ``public_grads`` policy. With ``"add"`` a gradient is accepted only for a parameter that no
  privatized forward used on data since the last step (the engines' step ledgers record which
  parameters each forward used): a data term computed with a parameter the model also uses in
  its forward (``loss + f(model.fc.weight, x)``) reaches ``p.grad`` unclipped and is refused.
- :func:`set_bound`: a new R for the optimizer and every model it steps, between steps.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from fxdp.core.errors import PrivacyError
from fxdp.engine.install import engine_of


def check_loss_scaling(opt):
    """Under ``scaler.step(optimizer)`` the model must undo the loss scale before clipping.
    Returns the engine's GradScaler."""
    scaler = None
    for p in opt.params:
        engine = engine_of(p) if getattr(p, "private_grad", None) is not None else None
        if engine is not None:
            scaler = scaler or engine.grad_scaler
        if engine is not None and engine.grad_scaler is None:
            raise ValueError(
                "fxdp: scaler.step(optimizer) with a model that does not know the GradScaler: its per-sample "
                "gradients were clipped in loss-scaled units (threshold R/S on the true gradients). Privatize "
                "with fxdp.privatize(model, ..., grad_scaler=scaler).")
    return scaler


def check_writers(opt, params) -> None:
    """The engines that wrote the private gradients must clip with this R and loss reduction
    (Opacus #664: clipping at one bound while the noise is calibrated to another).
    Private gradients set by hand (no engine) cannot be checked."""
    engines = {}
    for p in params:
        engine = engine_of(p)
        if engine is not None:
            engines[id(engine)] = engine
    for engine in engines.values():
        config, bound = engine.config, engine.clip_bound
        used = sorted(bound.pending.values | {bound.value})
        if any(not math.isclose(r, opt.max_grad_norm, rel_tol=1e-12) for r in used):
            raise PrivacyError(
                f"fxdp: the model clips with max_grad_norm={used[0] if len(used) == 1 else used} but this "
                f"optimizer calibrates its noise to max_grad_norm={opt.max_grad_norm}; the real noise multiplier "
                "would differ from the one accounted. Use the same R for fxdp.privatize and DPOptimizer.")
        if opt.adaptive_clipping is not None and bound is not opt.adaptive_clipping.bound:
            raise PrivacyError("fxdp: private gradients were written by a model whose clipping bound this "
                               "optimizer's adaptive clipping does not learn; build AdaptiveClipping on that model.")
        if config.loss_reduction is not opt.loss_reduction:
            raise PrivacyError(
                f"fxdp: the model undoes a loss_reduction={config.loss_reduction.value!r} loss but this optimizer "
                f"was built with loss_reduction={opt.loss_reduction.value!r}; use the same for both.")


def public_gradients(opt, params) -> Dict[int, torch.Tensor]:
    """Gradients written outside the privatized forward, checked against the policy."""
    set_grads = [p for p in params if p.grad is not None]
    if not set_grads:
        return {}
    if not opt._zeroed_since_step:
        raise PrivacyError(
            "fxdp: p.grad is set but optimizer.zero_grad() was not called since the last step: it holds the last "
            "step's noised gradient (maybe plus new terms), which cannot be told apart from a public gradient. "
            "Call optimizer.zero_grad() after each step.")
    nonzero = [p for p in set_grads if bool(p.grad.count_nonzero() > 0)]
    if not nonzero:
        return {}
    if opt.public_grads == "refuse":
        names = ", ".join(opt._name(p) for p in nonzero[:5])
        raise PrivacyError(
            f"fxdp: p.grad is set for {names}: these parameters received a gradient outside the privatized "
            "forward pass (e.g. a regularizer added to the loss, or a backward run before privatization: call "
            "optimizer.zero_grad() first), which would be released without clipping or noise. Compute such "
            "terms inside the model's forward, or, ONLY if the term does not depend on the data (e.g. weight "
            "decay), pass public_grads='add' to add it unclipped and un-noised.")
    return {id(p): p.grad.detach() for p in nonzero}
