"""Adaptive clipping: the clipping bound R learned privately during training (quantile clipping).

After Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping". Usage::

    model = fxdp.privatize(model, max_grad_norm=1.0)                 # R_0
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.1,
                           max_grad_norm=1.0, expected_batch_size=256,
                           adaptive_clipping=fxdp.AdaptiveClipping(model, target_unclipped_quantile=0.5,
                                                                   clipbound_learning_rate=0.2,
                                                                   count_noise_multiplier=256 / 20))

or ``PrivacyEngine().make_private(..., clipping="adaptive", target_unclipped_quantile=...,
clipbound_learning_rate=..., count_noise_multiplier=...)`` (Opacus's names; ``unclipped_num_std``,
``max_clipbound``, ``min_clipbound`` too), the same on ``DPDistributed``.

The mechanism, at step t with the current bound R_t, the logical batch Q_t (Poisson, expected size
m = q·N, public) and the user's total noise multiplier σ:

1. Clipping (the engine): every sample i is clipped to R_t (R_t/√G per group, any style; abadi or
   global clipping) and b_i = 1 if its norm is finite and <= R_t/√G in every group ("unclipped"),
   else 0. The engine reads R_t from its :class:`~fxdp.engine.clip_bound.ClipBound`, the same object
   the optimizer's noise reads: they cannot disagree (Opacus #664).
2. Release (``DPOptimizer.step``): the clipped sum with noise std σ_g·R_t, and the *centred* count
   ``S_b = Σ_i (b_i − 1/2) + N(0, σ_b²)`` (σ_b = ``count_noise_multiplier``, the count noise's std).
3. Update: the noised unclipped fraction ``b̃ = S_b / m + 1/2`` (unbiased: E Σ_i (b_i − 1/2) =
   m (f − 1/2) for the data set's unclipped fraction f) and the geometric step
   ``R_{t+1} = clamp(R_t · exp(−η (b̃ − γ)), min_clipbound, max_clipbound)`` with γ =
   ``target_unclipped_quantile`` and η = ``clipbound_learning_rate``. R_{t+1} is used from the next
   step on, by the clipping and the noise.

Accounting (why σ_g = (σ⁻² − (2σ_b)⁻²)^(−1/2), charged at σ). Add or remove one example x. The
clipped sum moves by a vector of norm <= R_t; the centred count by exactly |b_x − 1/2| = 1/2 (the raw
count Σ b_i would move by 1: centring halves the sensitivity). Divide each released part by its
noise std: ``(S_g / (σ_g R_t), S_b / σ_b)`` is the query plus N(0, I), and the query moves by at most

    Δ = sqrt( (R_t / (σ_g R_t))² + ((1/2) / σ_b)² ) = sqrt( σ_g⁻² + (2σ_b)⁻² )

in L2. A Gaussian mechanism with unit noise and sensitivity Δ is the Gaussian mechanism of noise
multiplier 1/Δ, so the step (both parts use the same Poisson sample, rate q) costs exactly one
subsampled Gaussian step of multiplier σ with σ⁻² = σ_g⁻² + (2σ_b)⁻². For a user-chosen total σ the
gradient noise is therefore σ_g = (σ⁻² − (2σ_b)⁻²)^(−1/2) > σ (requires σ < 2σ_b), and the
accountant charges σ -- the optimizer's ``noise_multiplier`` stays the total σ, and its
``gradient_noise_multiplier`` is σ_g. Charging σ_g instead under-reports ε (Opacus #807). R_{t+1}
is a function of the released S_b and the public R_t only (post-processing), and the per-step
cost does not depend on R_t, so the accountant's adaptive composition over steps holds.

Differences from Opacus's ``AdaClipDPOptimizer``, both privacy bugs there: it releases the raw count
(sensitivity 1) while using the 2σ_b formula of the centred one, and divides by the realised batch
size, which is data-dependent and not noised. fxdp releases the centred count and divides by the
public m.

Edge cases: an example with a non-finite loss or gradient contributes zero gradient and b = 0 (still
±1/2 in the centred count). Virtual steps (``BatchMemoryManager``): the count accumulates over the
micro-batches with the private gradients and is released once per logical step. ``DPDistributed``:
every rank's centred count is summed across ranks with the gradients, rank 0 adds the count noise
once. σ = 0 (noise off) gives σ_g = 0; σ_b = 0 (a noise-free count) is refused unless σ = 0.
Automatic clipping is refused: every sample is scaled by R/(‖g‖+γ), none is "unclipped", and R only
scales the update. Checkpoints (``DPOptimizer.state_dict``) carry R_t and its history exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fxdp.core.config import ClippingFn, nonnegative_number, positive_number
from fxdp.core.errors import PrivacyError
from fxdp.engine.clip_bound import ClipBound

DEFAULT_COUNT_NOISE_FRACTION = 1 / 20  # Andrew et al.: σ_b = m / 20


def gradient_noise_multiplier(sigma: float, count_std: float) -> float:
    """σ_g = (σ⁻² − (2σ_b)⁻²)^(−1/2): the gradient noise multiplier that makes the combined release of the
    gradient sum and the centred count cost a Gaussian step of multiplier ``sigma`` (module docstring).

    Raises:
        ValueError: σ >= 2σ_b (no real σ_g), or σ_b = 0 with σ > 0 (a count released without noise).
    """
    sigma = nonnegative_number("noise_multiplier", sigma)
    count_std = nonnegative_number("count_noise_multiplier", count_std)
    if sigma == 0:
        return 0.0
    if count_std == 0:
        raise ValueError("fxdp: count_noise_multiplier = 0 releases the unclipped count without noise, which has no "
                         "privacy; it is only allowed with noise_multiplier = 0 (noise off).")
    if sigma >= 2 * count_std:
        raise ValueError(f"fxdp: adaptive clipping needs noise_multiplier < 2 * count_noise_multiplier (the count's "
                         f"share of the privacy budget); got σ = {sigma} and σ_b = {count_std}. Raise "
                         "count_noise_multiplier (Andrew et al. use expected_batch_size / 20).")
    return (sigma ** -2 - (2 * count_std) ** -2) ** -0.5


def combined_noise_multiplier(gradient_sigma: float, count_std: float) -> float:
    """The inverse: the multiplier σ of one Gaussian step equivalent to releasing the gradient sum with
    σ_g = ``gradient_sigma`` and the centred count with std σ_b = ``count_std``."""
    inv = (math.inf if gradient_sigma == 0 else gradient_sigma ** -2) + \
          (math.inf if count_std == 0 else (2 * count_std) ** -2)
    return 0.0 if math.isinf(inv) else inv ** -0.5


class AdaptiveClipping:
    """Learns ``module``'s clipping bound during training (module docstring); give it to
    :class:`fxdp.DPOptimizer` as ``adaptive_clipping=``.

    Args:
        module: the privatized model (``fxdp.privatize``; a ``torch.compile`` wrapper of it is fine).
        target_unclipped_quantile: γ in [0, 1], the fraction of samples meant to be unclipped.
        clipbound_learning_rate: η >= 0 of the geometric update.
        count_noise_multiplier: σ_b >= 0, the std of the noise on the centred unclipped count
            (Opacus: ``unclipped_num_std``); None: expected_batch_size / 20.
        max_clipbound, min_clipbound: R is kept in [min_clipbound, max_clipbound].

    Raises:
        ValueError: the module is not privatized, uses automatic clipping, its bound is already learned
            by another mechanism, or bad arguments.
    """

    def __init__(self, module: torch.nn.Module, *, target_unclipped_quantile: float = 0.5,
                 clipbound_learning_rate: float = 0.2, count_noise_multiplier: Optional[float] = None,
                 max_clipbound: float = math.inf, min_clipbound: float = 0.0,
                 unclipped_num_std: Optional[float] = None):
        from fxdp.engine.install import get_engine

        engine = get_engine(getattr(module, "_orig_mod", module)) if isinstance(module, torch.nn.Module) else None
        if engine is None:
            raise ValueError("fxdp: AdaptiveClipping needs the privatized model (fxdp.privatize(model, ...)).")
        if engine.config.clipping_fn is ClippingFn.AUTOMATIC:
            raise ValueError("fxdp: adaptive clipping does not apply to automatic clipping: C = R/(norm+gamma) scales "
                             "every sample, none is unclipped, and R only scales the update (use the learning rate). "
                             "Use clipping_fn='abadi' or 'global' with adaptive clipping.")
        q = float(target_unclipped_quantile)
        if not (0.0 <= q <= 1.0):
            raise ValueError(f"fxdp: target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile!r}.")
        if count_noise_multiplier is not None and unclipped_num_std is not None:
            raise ValueError("fxdp: give count_noise_multiplier or Opacus's unclipped_num_std, not both.")
        std = count_noise_multiplier if count_noise_multiplier is not None else unclipped_num_std
        self.target_unclipped_quantile = q
        self.clipbound_learning_rate = nonnegative_number("clipbound_learning_rate", clipbound_learning_rate)
        self.count_noise_multiplier = None if std is None else nonnegative_number("count_noise_multiplier", std)
        self.max_clipbound = float(max_clipbound)
        self.min_clipbound = nonnegative_number("min_clipbound", min_clipbound)
        if not self.max_clipbound > self.min_clipbound:
            raise ValueError(f"fxdp: max_clipbound ({max_clipbound}) must be larger than min_clipbound "
                             f"({min_clipbound}).")
        self.bound: ClipBound = engine.clip_bound
        if not (self.min_clipbound <= self.bound.value <= self.max_clipbound):
            raise ValueError(f"fxdp: the model's R = {self.bound.value} lies outside [min_clipbound, max_clipbound].")
        self.expected_batch_size: Optional[float] = None
        self.bound.claim(self)

    def __repr__(self):
        return (f"AdaptiveClipping(target_unclipped_quantile={self.target_unclipped_quantile}, "
                f"clipbound_learning_rate={self.clipbound_learning_rate}, "
                f"count_noise_multiplier={self.count_noise_multiplier})")

    # ------------------------------------------------------------ optimizer side
    def attach(self, expected_batch_size: Optional[float], noise_multiplier: float) -> None:
        """Called by the optimizer: fixes m (and the default σ_b = m/20) and validates σ."""
        if expected_batch_size is None:
            raise ValueError("fxdp: adaptive clipping needs expected_batch_size (q·N): the unclipped fraction is the "
                             "noised count divided by it (never by the realised, data-dependent batch size).")
        self.expected_batch_size = positive_number("expected_batch_size", expected_batch_size)
        if self.count_noise_multiplier is None:
            self.count_noise_multiplier = self.expected_batch_size * DEFAULT_COUNT_NOISE_FRACTION
        self.gradient_noise_multiplier(noise_multiplier)

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """σ_g for the total σ = ``noise_multiplier`` (see :func:`gradient_noise_multiplier`)."""
        return gradient_noise_multiplier(noise_multiplier, self.count_noise_multiplier)

    def count_share(self) -> torch.Tensor:
        """This process's centred count Σ_i (b_i − 1/2) of the passes since the last release (float64,
        shape (1,)); the pending record is consumed. Refuses passes clipped with another R."""
        pending = self.bound.take_pending()
        if pending.passes == 0:
            raise PrivacyError("fxdp: the step releases private gradients but no backward pass recorded its "
                               "unclipped count (was the count cleared without the private gradients?).")
        if any(not math.isclose(v, self.bound.value, rel_tol=1e-12) for v in pending.values):
            raise PrivacyError(f"fxdp: private gradients of this step were clipped with R in {sorted(pending.values)}, "
                               f"but the noise is calibrated to R = {self.bound.value}; clear the private gradients "
                               "(optimizer.zero_grad()) after changing the bound (e.g. loading a checkpoint).")
        count = pending.unclipped.to(torch.float64).reshape(1)
        return count - pending.samples / 2.0

    def add_count_noise(self, count: torch.Tensor, noise) -> torch.Tensor:
        """``count + N(0, σ_b²)`` from the optimizer's noise source (drawn in float32)."""
        draw = noise.draw((1,), self.count_noise_multiplier, count.device)
        return count if draw is None else count + draw.to(count.dtype)

    def update(self, released_count: torch.Tensor) -> float:
        """The geometric update from the released (noised, summed) centred count; returns the new R."""
        fraction = float(released_count.reshape(-1)[0]) / self.expected_batch_size + 0.5
        R = self.bound.value * math.exp(-self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile))
        R = min(max(R, self.min_clipbound), self.max_clipbound)
        self.bound.update(R, fraction, self)
        return R

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"bound": self.bound.state_dict(), "target_unclipped_quantile": self.target_unclipped_quantile,
                "clipbound_learning_rate": self.clipbound_learning_rate,
                "count_noise_multiplier": self.count_noise_multiplier, "max_clipbound": self.max_clipbound,
                "min_clipbound": self.min_clipbound}

    def load_state_dict(self, state: dict) -> None:
        """Restore R_t and its history; refuses other hyperparameters (the run would not continue the same)."""
        for key in ("target_unclipped_quantile", "clipbound_learning_rate", "count_noise_multiplier",
                    "max_clipbound", "min_clipbound"):
            if state[key] != getattr(self, key):
                raise ValueError(f"fxdp: the checkpoint's adaptive clipping has {key}={state[key]}, this one "
                                 f"{getattr(self, key)}; resume with the same settings.")
        self.bound.load_state_dict(state["bound"])
        self.bound.clear_pending()


ADAPTIVE_OPTIONS = ("target_unclipped_quantile", "clipbound_learning_rate", "count_noise_multiplier",
                    "unclipped_num_std", "max_clipbound", "min_clipbound")


def check_clipping_option(clipping: str, options: dict) -> None:
    """Validate ``make_private``'s Opacus-style ``clipping=`` ("flat" or "adaptive") and adaptive keywords
    before anything is privatized. Unknown keywords raise TypeError, as for any function."""
    unknown = [k for k in options if k not in ADAPTIVE_OPTIONS]
    if unknown:
        raise TypeError(f"make_private() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if clipping not in ("flat", "adaptive"):
        raise ValueError(f"fxdp: clipping={clipping!r} is not supported; use 'flat' or 'adaptive' (fxdp groups "
                         "parameters with style= ('all-layer', 'layer-wise', 'param-wise', 'block-wise'), "
                         "thresholds R/sqrt(groups)).")
    if clipping == "flat" and options:
        raise ValueError(f"fxdp: {', '.join(sorted(options))} only apply to clipping='adaptive'.")


def from_clipping_option(clipping: str, module: torch.nn.Module, options: dict) -> Optional[AdaptiveClipping]:
    """The mechanism for ``make_private(..., clipping="adaptive", **options)`` on the privatized ``module``,
    or None for ``clipping="flat"`` (see :func:`check_clipping_option`)."""
    check_clipping_option(clipping, options)
    return AdaptiveClipping(module, **options) if clipping == "adaptive" else None
