"""Release checks of one ``DPOptimizer.step()``: the bound, the loss scale and the public gradients.

- :func:`check_writers`: the engines that wrote the private gradients clipped with the optimizer's R
  (every backward pass since the last step) and loss reduction (Opacus #664: clipping at one bound
  while the noise is calibrated to another).
- :func:`check_loss_scaling`: under ``scaler.step(optimizer)`` the model undid the loss scale.
- :func:`public_gradients`: ``p.grad`` written outside the privatized forward, against the
  ``public_grads`` policy. With ``"add"`` a gradient is accepted only for a parameter that no
  privatized forward used on data since the last step (its clipped sum is all zeros): once the
  backward has freed the graph, a data-dependent term computed with such a parameter outside the
  forward (``loss + F.linear(x, model.fc.weight).sum()``) cannot be told from weight decay, and both
  are refused (weight decay belongs in the inner optimizer's ``weight_decay=``). Limit: a parameter
  the forward used but whose clipped contributions are exactly zero counts as unused.
- :func:`set_bound`: a new R for the optimizer and every model it steps, between steps.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from fxdp.core.errors import PrivacyError
from fxdp.engine.install import engine_of
from fxdp.training import step_check


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


def check_release(opt, params) -> Dict[int, torch.Tensor]:
    """Every check of one release (``DPOptimizer.check``): private gradients for every parameter, the
    writers' R and loss reduction, ownership, drawn = clipped, the public gradients; returns those."""
    have = [p for p in params if getattr(p, "private_grad", None) is not None]
    if not have:
        raise PrivacyError(
            "fxdp: step() without any private gradient since the last step. Run a forward and backward pass "
            "of the privatized model on a batch (an empty Poisson batch too) before each step; a second step "
            "without a new backward is refused.")
    if len(have) != len(params):
        missing = [opt._name(p) for p in params if getattr(p, "private_grad", None) is None]
        raise PrivacyError(
            f"fxdp: {len(missing)} trainable parameter(s) of the optimizer have no private gradient while "
            f"others do: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Is every parameter of the "
            "optimizer part of the privatized model, and was it trainable when the model was privatized?")
    check_writers(opt, have)
    engines = step_check.engines_of(have)
    step_check.check_one_engine(engines)
    step_check.check_owned(params, engines)
    if opt.batch_check is not None:
        opt.batch_check.verify(engines)
    elif opt.expected_batch_size is not None:
        step_check.check_plausible_count(engines, opt.expected_batch_size)
    public = public_gradients(opt, params)
    opt.unclipped_count = opt.adaptive_clipping.count_share() if opt.adaptive_clipping is not None else None
    return public


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
    used = [p for p in nonzero if _used_on_data(p)]
    if used:
        names = ", ".join(opt._name(p) for p in used[:5])
        raise PrivacyError(
            f"fxdp: public_grads='add' cannot add p.grad of {names}: the privatized forward used these parameters "
            "on data in this step, and a gradient reaching p.grad outside that forward cannot be told apart from a "
            "data-dependent one (e.g. F.linear(x, model.fc.weight) or model outputs in the loss), which would be "
            "released without clipping or noise. For weight decay use the optimizer's weight_decay= (applied by "
            "the inner step to the released weights); other regularisers of the weights are post-processing: "
            "apply them after optimizer.step() under torch.no_grad(). public_grads='add' is for parameters that "
            "no privatized forward used on data (e.g. a term of the loss that only depends on such parameters).")
    return {id(p): p.grad.detach() for p in nonzero}


def _used_on_data(p) -> bool:
    """A privatized forward used ``p`` on data since the last step: its clipped sum is not all zeros."""
    private = getattr(p, "private_grad", None)
    return private is not None and bool(private.count_nonzero() > 0)


def set_bound(opt, value) -> float:
    """``optimizer.max_grad_norm = R``: a new R from the next step on, for the noise (σ·R) and for the clip
    bound of every model whose private gradients this optimizer releases. R does not enter the accounting:
    each step is a Gaussian mechanism of sensitivity R_t and noise σ·R_t, whatever R_t. Refused under
    adaptive clipping (R is learned), while private gradients clipped with the old R are pending, and
    when no privatized model of this optimizer is known. Returns the new R."""
    from fxdp.core.config import positive_number
    from fxdp.engine.install import get_engine

    value = positive_number("max_grad_norm", value)
    if opt.adaptive_clipping is not None:
        raise PrivacyError("fxdp: max_grad_norm is learned by adaptive clipping (adaptive_clipping=); it cannot be "
                           "set by hand. Build the optimizer without adaptive clipping to choose R.")
    if any(getattr(p, "private_grad", None) is not None for p in opt.params):
        raise PrivacyError("fxdp: max_grad_norm changed while private gradients clipped with the old R are waiting "
                           "for their step; the noise would be calibrated to another bound. Change it between "
                           "steps (after optimizer.step() or optimizer.zero_grad()).")
    engines = {}
    module = getattr(opt, "_module", None)
    module = module() if module is not None else None
    for engine in [get_engine(module) if module is not None else None] + [engine_of(p) for p in opt.params]:
        if engine is not None:
            engines[id(engine)] = engine
    if not engines:
        raise PrivacyError("fxdp: max_grad_norm cannot change: this optimizer knows no privatized model whose clipping "
                           "bound would change with it (build it with fxdp.PrivacyEngine.make_private, or call "
                           "optimizer.set_param_names(model) with the privatized model first).")
    for engine in engines.values():
        bound = engine.clip_bound
        if bound.owner is not None or bound.pending.passes:
            raise PrivacyError(f"fxdp: max_grad_norm cannot change now: the model's clipping bound is "
                               + ("learned by adaptive clipping." if bound.owner is not None else
                                  f"pending {bound.pending.passes} backward pass(es) clipped with R = {bound.value:g}; "
                                  "change it between steps (after optimizer.step() or optimizer.zero_grad())."))
    for engine in engines.values():
        engine.clip_bound.set_fixed(value)
    return value
