"""DPOptimizer: noise, scaling and the inner step, once per logical batch.

For every trainable parameter p in the wrapped optimizer, a (non-skipped) ``step()`` sets

    p.grad = (p.private_grad + N(0, σ²R²·I)) / expected_batch_size     (loss_reduction="mean")
    p.grad =  p.private_grad + N(0, σ²R²·I)                            (loss_reduction="sum")

then runs the inner optimizer's step, then the step hooks (the accountant
records the step), then clears the private gradients.

Guarantees and edge cases:

- ``p.private_grad`` is the clipped sum written by a privatized model
  (``fxdp.privatize``); it accumulates over any number of backward calls, and
  the noise is drawn once per step however many there were. The division is
  by the *expected* batch size, never by the realised (data-dependent) one.
- Noise is drawn in float32 whatever the parameter dtype (float64 parameters
  keep float64 arithmetic), then cast to the parameter dtype. With a
  block/layer/param-wise style it is the same σ·R: the groups' thresholds
  already add up to R in quadrature.
- An empty Poisson batch (B = 0) works: its forward/backward writes zero
  private gradients, and the step releases noise only.
- Refused with an error, never skipped silently: a trainable parameter without
  ``private_grad`` while others have one; a step with no private gradient at
  all since the last one (e.g. a second step without a new backward); more
  than one Poisson batch consumed for one step (gradient accumulation across
  Poisson batches: an example drawn twice would count 2R -- use
  ``fxdp.BatchMemoryManager``); LBFGS-like optimizers whose step re-evaluates
  the closure (that would replace the noised gradient); a trainable parameter of the
  privatized model that is not in this optimizer (it would accumulate un-noised sums);
  where fxdp owns the data loader, a step whose clipped samples are not exactly the
  examples drawn for it, or a step with no batch drawn from that loader
  (:mod:`fxdp.training.step_check`). After each step and each ``zero_grad()`` the private
  gradients of every parameter of the privatized model are cleared.
- Closures: ``step(closure)`` runs the closure once (it does zero_grad,
  forward, backward), then noises and steps the inner optimizer *without*
  the closure, so no recomputed gradient can erase the noise.
- ``p.grad`` set by the user (a parameter used outside the privatized forward, e.g. a
  regulariser added to the loss): ``public_grads="refuse"`` (default) raises, because such a
  gradient is released without clipping or noise; ``public_grads="add"`` adds it unclipped and
  un-noised only for parameters no privatized forward used on data since the last step (a
  regulariser of a used parameter cannot be told from a data term: use ``weight_decay=`` of the
  inner optimizer, or regularise after the step). An all-zero ``p.grad`` (from
  ``zero_grad(set_to_none=False)``) is not a public gradient.
- ``max_grad_norm`` and ``loss_reduction`` must be those the model clips with: ``step()`` checks them
  against the engine that wrote each private gradient (the R of its ``clip_bound`` and of every backward
  pass since the last step) and raises on a mismatch. ``optimizer.max_grad_norm = R`` between steps sets
  R for the noise and the model's bound together (R does not enter the accounting: each step has
  sensitivity R_t and noise σ·R_t); refused mid-step and under ``adaptive_clipping=``, which learns R
  (:mod:`fxdp.training.adaptive`: ``noise_multiplier`` is then the total σ charged and the gradient noise
  uses ``gradient_noise_multiplier``). ``noise_multiplier`` may be changed between steps (noise
  schedulers); the accountant records the σ actually used. Checks: :mod:`fxdp.training.release_check`.
- ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's: LR
  schedulers work on either object (:mod:`fxdp.training.wrapped_optimizer`).
- fp16 with ``torch.amp.GradScaler``: privatize with ``grad_scaler=scaler`` (the
  engine divides by the loss scale before clipping, so private gradients are
  in true units) and call ``scaler.step(optimizer); scaler.update()``. The
  optimizer never skips a step on inf/NaN: an example whose scaled gradient
  overflows already contributes zero (and is counted), while skipping the whole
  step would reveal that some example overflowed. Prefer bf16, or a fixed scale.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from fxdp.core.config import LossReduction, nonnegative_number, positive_number
from fxdp.core.errors import PrivacyError
from fxdp.engine.finalize import accumulation_dtype
from fxdp.training.noise import NoiseSource
from fxdp.training import optimizer_state, release_check, step_check
from fxdp.training.wrapped_optimizer import WrappedOptimizer

PUBLIC_GRAD_POLICIES = ("refuse", "add")


class DPOptimizer(WrappedOptimizer):
    """Wrap ``optimizer`` so that each step releases a noised, clipped gradient (module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer`` except LBFGS-like ones.
        noise_multiplier: σ >= 0 (noise std is σ·R).
        max_grad_norm: R > 0, the model's clipping bound.
        expected_batch_size: the expected logical batch size (q·N under Poisson
            sampling); required for loss_reduction="mean".
        loss_reduction: "mean" or "sum", as the loss combines per-sample losses.
        generator: a ``torch.Generator`` for the noise (None: dedicated generators
            seeded from torch's global RNG, see :mod:`fxdp.training.noise`).
        secure_mode: OS-seeded noise and the floating-point attack mitigation
            (see :mod:`fxdp.training.noise` for what this does and does not protect).
        public_grads: "refuse" or "add" (see the module docstring).
        adaptive_clipping: a :class:`fxdp.training.adaptive.AdaptiveClipping` of the model, to learn R
            (needs ``expected_batch_size``); None keeps R fixed.
    """

    def __init__(self, optimizer: Optimizer, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: Optional[float] = None, loss_reduction="mean",
                 generator: Optional[torch.Generator] = None, secure_mode: bool = False, *,
                 public_grads: str = "refuse", adaptive_clipping=None):
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("fxdp: this optimizer is already a DPOptimizer; wrap the plain optimizer once.")
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"fxdp: DPOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("fxdp: LBFGS re-evaluates the closure inside step(), which would replace the noised "
                             "gradient with a non-private one; it cannot be used for DP-SGD.")
        self.original_optimizer = optimizer
        self.noise_multiplier = nonnegative_number("noise_multiplier", noise_multiplier)
        self._max_grad_norm = positive_number("max_grad_norm", max_grad_norm)
        try:
            self.loss_reduction = LossReduction(loss_reduction) if not isinstance(loss_reduction, LossReduction) \
                else loss_reduction
        except ValueError:
            raise ValueError(f"fxdp: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.") from None
        if expected_batch_size is None and self.loss_reduction is LossReduction.MEAN:
            raise ValueError("fxdp: loss_reduction='mean' needs expected_batch_size (q·N under Poisson sampling): "
                             "the realised batch size depends on the data and must not be used.")
        self.expected_batch_size = None if expected_batch_size is None else positive_number(
            "expected_batch_size", expected_batch_size)
        if public_grads not in PUBLIC_GRAD_POLICIES:
            raise ValueError(f"fxdp: public_grads must be one of {PUBLIC_GRAD_POLICIES}, got {public_grads!r}.")
        self.public_grads = public_grads
        self.secure_mode = bool(secure_mode)
        self.noise = NoiseSource(generator, secure=self.secure_mode)
        self.step_hooks: List[Callable] = []
        self.steps_taken = 0
        self.param_names: Dict[int, str] = {}
        self._skip_next = False
        self._last_step_skipped = False
        self._batches_since_step = 0
        self._zeroed_since_step = True
        # set where fxdp owns the data loader: drawn = clipped at every step (fxdp.training.step_check)
        self.batch_check: Optional[step_check.DrawnBatchCheck] = None
        # True: call the inner optimizer's class-level step/zero_grad, ignoring instance attributes -- needed when
        # the inner optimizer's own ``step`` is redirected to this DPOptimizer (fxdp.compat.fastdp's attach).
        self.inner_class_methods = False
        self.adaptive_clipping = adaptive_clipping
        self.unclipped_count: Optional[torch.Tensor] = None  # the count share travelling through release()
        self.last_release: dict = {}
        if adaptive_clipping is not None:
            from fxdp.training.adaptive import AdaptiveClipping

            if not isinstance(adaptive_clipping, AdaptiveClipping):
                raise ValueError("fxdp: adaptive_clipping must be a fxdp.training.adaptive.AdaptiveClipping.")
            adaptive_clipping.attach(self.expected_batch_size, self.noise_multiplier)
            if not math.isclose(adaptive_clipping.bound.value, self._max_grad_norm, rel_tol=1e-12):
                raise ValueError(f"fxdp: max_grad_norm={self._max_grad_norm} but the model's current bound is "
                                 f"R = {adaptive_clipping.bound.value}; they must agree.")

    # --------------------------------------------------------------- plumbing
    @property
    def max_grad_norm(self) -> float:
        """R: fixed, or the model's current learned bound under adaptive clipping."""
        if self.adaptive_clipping is not None:
            return self.adaptive_clipping.bound.value
        return self._max_grad_norm

    @property
    def gradient_noise_multiplier(self) -> float:
        """σ_g, the gradient noise std / R: ``noise_multiplier`` itself, or under adaptive clipping
        (σ⁻² − (2σ_b)⁻²)^(−1/2) (the total σ is what the accountant charges)."""
        if self.adaptive_clipping is not None:
            return self.adaptive_clipping.gradient_noise_multiplier(self.noise_multiplier)
        return self.noise_multiplier

    @max_grad_norm.setter
    def max_grad_norm(self, value):
        """A new R between steps, for this optimizer's noise and the models it steps (release_check.set_bound)."""
        self._max_grad_norm = release_check.set_bound(self, value)

    def __repr__(self):
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, loss_reduction={self.loss_reduction.value!r}, "
                f"secure_mode={self.secure_mode}"
                + ("" if self.adaptive_clipping is None else f", adaptive_clipping={self.adaptive_clipping!r}")
                + f",\n  {self.original_optimizer!r})")

    def attach_step_hook(self, fn: Callable) -> None:
        """Call ``fn(self)`` after every real step (Opacus convention; several hooks allowed)."""
        self.step_hooks.append(fn)

    # ----------------------------------------------------- logical batches
    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Opacus convention: the next ``step()`` only accumulates (a micro-batch, not the end of a logical batch)."""
        self._skip_next = bool(do_skip)

    def notify_batch(self, ends_logical_batch: bool, num_examples: Optional[int] = None,
                     poisson: bool = True) -> None:
        """Called by fxdp's data loaders for every batch they hand out (see fxdp.training.loaders), with
        the number of examples drawn; ``poisson=False``: a fixed-size batch, which may be accumulated."""
        if self.batch_check is not None and num_examples is not None:
            self.batch_check.drew(num_examples)
        if not poisson:
            return
        if ends_logical_batch:
            self._batches_since_step += 1
        self._skip_next = not ends_logical_batch

    def reset_logical_batch(self) -> None:
        """A loop left mid logical batch (``BatchMemoryManager`` exited): what its micro-batches
        accumulated is discarded -- private gradients and the drawn count -- so that the partial batch
        can never be released with the next logical batch (it is never charged either)."""
        self._skip_next = False
        self._last_step_skipped = False
        self._clear_private_gradients()
        if self.batch_check is not None:
            self.batch_check.reset()

    def _clear_private_gradients(self) -> None:
        """Every private gradient of the models this optimizer steps, their ledgers, and the adaptive
        count (which lives and dies with the private gradients)."""
        step_check.clear_engines(step_check.engines_of(self.params))
        for p in self.params:
            if hasattr(p, "private_grad"):
                del p.private_grad
        if self.adaptive_clipping is not None:
            self.adaptive_clipping.bound.clear_pending()

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and the private gradients -- except after a skipped (micro-batch)
        step, where everything accumulated for the logical batch is kept."""
        if self._last_step_skipped:
            return
        self._clear_private_gradients()
        self._call_inner("zero_grad", set_to_none=set_to_none)
        self._zeroed_since_step = True

    # GradScaler protocol: scaler.step(optimizer) calls step() directly (it never skips a DP step:
    # whether an example overflowed is data-dependent, and such examples already contribute zero).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Noise, scale and step once per logical batch (module docstring). Returns the closure's loss."""
        # Under scaler.step(optimizer): GradScaler sets found_inf (and grad_scale, unless the user called
        # scaler.unscale_(optimizer) first, a no-op here: the model undid the loss scale when it clipped).
        under_scaler = getattr(self, "grad_scale", None) is not None or hasattr(self, "found_inf")
        scaler = release_check.check_loss_scaling(self) if under_scaler else None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self._skip_next = False
            self._last_step_skipped = True
            return loss
        self._last_step_skipped = False
        n, self._batches_since_step = self._batches_since_step, 0
        step_check.check_one_poisson_batch(n)
        engines = step_check.engines_of(self.params)
        self.release(self.params)
        if scaler is not None:
            # records found_inf (zero: noised true-unit gradients) so that scaler.update() can run
            scaler._check_inf_per_device(self)
        self._call_inner("step")
        for hook in self.step_hooks:
            hook(self)
        self.steps_taken += 1
        step_check.clear_engines(engines)
        for p in self.params:
            if hasattr(p, "private_grad"):
                del p.private_grad
        if self.batch_check is not None:
            self.batch_check.reset()
        self._zeroed_since_step = False
        return loss

    # ------------------------------------------------- the release, step by step
    def release(self, params: List[torch.nn.Parameter]) -> None:
        """Write ``p.grad`` for one logical batch: check -> add noise -> reduce -> scale -> write.

        Each step is a method a subclass may override (the distributed optimizers do); the
        gradients travel between them as ``grads``: ``id(p) -> tensor`` in the accumulation dtype
        (float32, float64 for float64 parameters), never in half precision before the noise.
        The noise is added before the reduction, so that with several ranks exactly one share of
        each coordinate carries it (in one process the reduction is the identity). Under adaptive
        clipping the centred unclipped count travels the same way (``self.unclipped_count``: taken in
        ``check``, noised in ``add_noise``, summed in ``reduce``), and R is updated last, for the next step."""
        public = self.check(params)
        grads = {id(p): p.private_grad.detach().to(accumulation_dtype(p)) for p in params}
        adaptive, R, sigma_g = self.adaptive_clipping, self.max_grad_norm, self.gradient_noise_multiplier
        self.add_noise(params, grads)
        self.reduce(params, grads)
        self.scale(params, grads)
        self.write(params, grads, public)
        self.last_release = {"max_grad_norm": R, "noise_multiplier": self.noise_multiplier,
                             "gradient_noise_multiplier": sigma_g}
        if adaptive is not None:
            self.last_release["next_max_grad_norm"] = adaptive.update(self.unclipped_count)
            self.last_release["unclipped_fraction"] = adaptive.bound.last_unclipped_fraction
            self.last_release["count_noise_multiplier"] = adaptive.count_noise_multiplier
            self.unclipped_count = None

    def check(self, params) -> Dict[int, torch.Tensor]:
        """Refuse a step that would release something unclipped or un-noised; returns the public
        gradients allowed by ``public_grads`` (``id(p) -> p.grad``). Under adaptive clipping it also
        takes this step's unclipped-count share (refusing passes clipped with another R)."""
        return release_check.check_release(self, params)

    def add_noise(self, params, grads: Dict[int, torch.Tensor]) -> None:
        """Add N(0, σ_g²R²) to every coordinate, drawn in float32 (float64 parameters: float64 arithmetic);
        σ_g = σ unless adaptive clipping, which also adds N(0, σ_b²) to the unclipped count."""
        std = self.gradient_noise_multiplier * self.max_grad_norm
        self.noise.begin_step()
        for p in params:
            noise = self.noise.draw(p.shape, std, p.device)
            if noise is not None:
                grads[id(p)] = grads[id(p)] + noise.to(grads[id(p)].dtype)
        if self.unclipped_count is not None:
            self.unclipped_count = self.adaptive_clipping.add_count_noise(self.unclipped_count, self.noise)

    def reduce(self, params, grads: Dict[int, torch.Tensor]) -> None:
        """Combine the shares of several processes (one process: nothing to do)."""

    def scale(self, params, grads: Dict[int, torch.Tensor]) -> None:
        """Divide by the expected batch size (loss_reduction="mean"), never by the realised one."""
        if self.loss_reduction is LossReduction.MEAN:
            for p in params:
                grads[id(p)] = grads[id(p)] / self.expected_batch_size

    def write(self, params, grads: Dict[int, torch.Tensor], public: Dict[int, torch.Tensor]) -> None:
        """``p.grad`` = the released gradient (plus an allowed public gradient), in the parameter dtype."""
        for p in params:
            g = grads[id(p)]
            if id(p) in public:
                g = g + public[id(p)].to(g.dtype)
            p.grad = g.to(p.dtype)

    # ----------------------------------------------------------------- state
    def dp_state_dict(self) -> dict:
        """The DP part of the state: noise generator states, step count, configuration."""
        return optimizer_state.dp_state(self)

    def load_dp_state_dict(self, state: dict) -> None:
        """Restore :meth:`dp_state_dict`; refuses a different R, loss reduction or expected batch size.
        Under adaptive clipping the learned R is restored first (into the model's bound)."""
        optimizer_state.load_dp_state(self, state)

    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus the DP state under the key ``"fxdp"``."""
        sd = self.original_optimizer.state_dict()
        sd["fxdp"] = self.dp_state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict`. A plain optimizer state dict loads too, but then the noise
        stream is NOT restored and a PrivacyError is raised unless in secure mode."""
        state_dict = dict(state_dict)
        dp_state = state_dict.pop("fxdp", None)
        if dp_state is None and not self.secure_mode:
            raise PrivacyError("fxdp: this state dict has no DP state (noise generator); resuming from it would "
                               "restart the noise stream and replay earlier noise. Save DPOptimizer.state_dict(), "
                               "or load a non-private state into .original_optimizer deliberately.")
        self.original_optimizer.load_state_dict(state_dict)
        if dp_state is not None:
            self.load_dp_state_dict(dp_state)

