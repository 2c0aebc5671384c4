"""``PrivacyArguments``: the DP settings of :class:`fxdp.integrations.DPTrainer`, checked at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

from fxdp.core.config import make_config, nonnegative_number, positive_number
from fxdp.training.accounting import MECHANISMS


@dataclass
class PrivacyArguments:
    """DP-SGD settings for :class:`~fxdp.integrations.DPTrainer`.

    Give ``target_epsilon`` (σ is calibrated for the planned number of optimizer steps,
    from ``num_train_epochs`` or ``max_steps``) or ``noise_multiplier`` (then ε is only
    reported; with both, the run is refused if σ would spend more than ``target_epsilon``).

    Attributes:
        target_epsilon: ε budget at ``target_delta``; training stops before a step that would exceed it.
        target_delta: δ; default ``1 / (10 · N)`` for N training examples.
        noise_multiplier: σ (noise std σ·R), instead of ``target_epsilon``.
        max_grad_norm: R, the per-sample clipping bound (the Trainer's own ``max_grad_norm`` is not used:
            it would clip the already-noised gradient).
        style, clipping_fn, block_heads, numerical_stability_constant: as in :func:`fxdp.privatize`.
        accountant: "pld" (default, tightest), "prv", "rdp" or "gdp" (the last can under-estimate ε).
        epsilon_tolerance: precision of the σ search.
        secure_mode: OS-seeded noise and sampling (see :mod:`fxdp.training.noise`).
        per_sample_loss_fn: ``fn(outputs, labels: dict) -> (B,) tensor`` of per-sample losses; default:
            cross-entropy per token averaged over each sample's own non-ignored tokens (shifted for
            causal LMs), or per-sample cross-entropy for classification.
        shift_labels: causal-LM label shift for the default loss (None: shift iff the model is a causal LM).
        log_clipped_fraction: also log the fraction of clipped samples (default off). It is NOT
            differentially private (computed from the private data without noise): a log that leaves the
            trust boundary must not carry it, which is why it is opt-in.
    """

    target_epsilon: Optional[float] = None
    target_delta: Optional[float] = None
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    style: str = "all-layer"
    clipping_fn: str = "abadi"
    block_heads: Optional[List[str]] = None
    numerical_stability_constant: Optional[float] = None
    accountant: str = "pld"
    epsilon_tolerance: float = 0.01
    secure_mode: bool = False
    per_sample_loss_fn: Optional[Callable] = field(default=None, repr=False)
    shift_labels: Optional[bool] = None
    log_clipped_fraction: bool = False

    def __post_init__(self):
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("fxdp: PrivacyArguments needs target_epsilon (σ is calibrated) or noise_multiplier.")
        if self.target_epsilon is not None:
            positive_number("target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            nonnegative_number("noise_multiplier", self.noise_multiplier)
        if self.target_delta is not None and not (0 < float(self.target_delta) < 1):
            raise ValueError(f"fxdp: target_delta must be in (0, 1), got {self.target_delta!r}.")
        if not isinstance(self.accountant, str) or self.accountant.strip().lower() not in MECHANISMS:
            raise ValueError(f"fxdp: unknown accountant {self.accountant!r}; expected one of {', '.join(MECHANISMS)}.")
        self.accountant = self.accountant.strip().lower()
        positive_number("epsilon_tolerance", self.epsilon_tolerance)
        # parse the clipping settings now, so a typo fails here and not at the first step
        self.config = make_config(style=self.style, max_grad_norm=self.max_grad_norm, clipping_fn=self.clipping_fn,
                                  numerical_stability_constant=self.numerical_stability_constant,
                                  loss_reduction="mean", block_heads=self.block_heads)

    def delta_for(self, num_examples: int) -> float:
        return float(self.target_delta) if self.target_delta is not None else 1.0 / (10.0 * num_examples)


__all__ = ["PrivacyArguments"]
