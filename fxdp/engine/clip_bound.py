"""The clipping bound R of one privatized model: the one value its clip factors and its noise read.

Every :class:`~fxdp.engine.engine.Engine` owns one :class:`ClipBound`. Each backward pass clips with
``bound.value`` (per group ``R / sqrt(G)``) and records, for the release of its step, the R it clipped
with and how many of its samples were *unclipped* (a finite norm ``<= R_g`` in every clip group).
:class:`fxdp.DPOptimizer` calibrates its noise to the same ``bound.value`` and refuses to release private
gradients clipped with any other R (clipping at one bound while the noise is calibrated to another is how
Opacus #664 broke its guarantee). With a fixed bound the value never changes; with adaptive clipping
(:mod:`fxdp.training.adaptive`) the optimizer's release updates it after a step, so the new R is used
from the next step on -- by the clip factors and the noise alike, since both read this object.

The pending record (unclipped count, samples, R values of the passes since the last release) has the
lifecycle of the private gradients: it accumulates over backward passes (the micro-batches of one
logical batch), is cleared with them (``optimizer.zero_grad()``, ``fxdp.clear_private_grads``) and is
consumed by the step (:meth:`take_pending`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Set

import torch

from fxdp.core.config import positive_number


@dataclass
class Pending:
    """What the backward passes since the last release recorded (see the module docstring)."""

    unclipped: Optional[torch.Tensor] = None   # scalar int64 tensor on the engine's device, or None
    samples: int = 0
    passes: int = 0
    values: Set[float] = field(default_factory=set)


class ClipBound:
    """The current clipping bound of one engine (module docstring).

    Attributes:
        value: the current R (read-only; :meth:`update` changes it).
        initial: the R given to ``privatize``.
        updates: how many times the release changed R.
        last_unclipped_fraction: the noised unclipped fraction released with the last update (None before).
        owner: the adaptive mechanism allowed to update it (None for a fixed bound).
    """

    def __init__(self, value: float):
        self.initial = positive_number("max_grad_norm", value)
        self._value = self.initial
        self.updates = 0
        self.last_unclipped_fraction: Optional[float] = None
        self.owner = None
        self.pending = Pending()

    @property
    def value(self) -> float:
        return self._value

    def __repr__(self):
        extra = "" if self.owner is None else f", adaptive, {self.updates} updates"
        return f"ClipBound(R={self._value:.6g}{extra})"

    def describe(self) -> str:
        """One line for reports and progress output."""
        if self.owner is None:
            return f"R = {self._value:.6g} (fixed)"
        frac = "-" if self.last_unclipped_fraction is None else f"{self.last_unclipped_fraction:.4f}"
        return (f"R = {self._value:.6g} (adaptive: initial {self.initial:.6g}, {self.updates} updates, "
                f"last noised unclipped fraction {frac}; {self.owner!r})")

    # ------------------------------------------------------------ backward side
    def record(self, unclipped: torch.Tensor, used: float) -> None:
        """Add one backward pass: ``unclipped`` is its (B,) bool mask, ``used`` the R it clipped with."""
        n = unclipped.sum()
        p = self.pending
        p.unclipped = n if p.unclipped is None else p.unclipped + n.to(p.unclipped.device)
        p.samples += int(unclipped.numel())
        p.passes += 1
        p.values.add(float(used))

    def clear_pending(self) -> None:
        self.pending = Pending()

    def take_pending(self) -> Pending:
        out, self.pending = self.pending, Pending()
        return out

    # ------------------------------------------------------------ release side
    def update(self, value: float, unclipped_fraction: float, owner) -> None:
        """Set the next step's R (adaptive clipping's release only; ``owner`` must be, or become, the claimant)."""
        self.claim(owner)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"fxdp: adaptive clipping produced R = {value!r}; set min_clipbound > 0.")
        self._value = float(value)
        self.updates += 1
        self.last_unclipped_fraction = float(unclipped_fraction)

    def set_fixed(self, value: float) -> None:
        """A new fixed R, from the next backward pass on (``DPOptimizer.max_grad_norm = R`` between steps;
        the noise reads the same value, so the noise multiplier and the accounting are unchanged). Refused
        under adaptive clipping and while backward passes clipped with the current R await their step."""
        value = positive_number("max_grad_norm", value)
        if self.owner is not None:
            raise ValueError("fxdp: this model's clipping bound is learned by adaptive clipping; it cannot be set.")
        if self.pending.passes:
            raise ValueError(f"fxdp: {self.pending.passes} backward pass(es) since the last step clipped with "
                             f"R = {self._value:g}; change max_grad_norm between steps (after step() or zero_grad()).")
        self._value = value

    def claim(self, owner) -> None:
        """Let ``owner`` (one adaptive mechanism) update this bound; a second claimant is refused."""
        if self.owner is not None and self.owner is not owner:
            raise ValueError("fxdp: this model's clipping bound is already learned by another adaptive clipping "
                             "mechanism (another optimizer); two would each update R. Use one optimizer per model.")
        self.owner = owner

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"value": self._value, "initial": self.initial, "updates": self.updates,
                "last_unclipped_fraction": self.last_unclipped_fraction}

    def load_state_dict(self, state: dict) -> None:
        if not math.isclose(float(state["initial"]), self.initial, rel_tol=1e-12):
            raise ValueError(f"fxdp: the checkpoint's clipping bound started at R = {state['initial']}, this model's "
                             f"at R = {self.initial}; privatize with the same initial max_grad_norm to resume.")
        self._value = positive_number("max_grad_norm", state["value"])
        self.updates = int(state["updates"])
        frac = state["last_unclipped_fraction"]
        self.last_unclipped_fraction = None if frac is None else float(frac)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["owner"] = None  # a copy of the model is learned by whichever mechanism claims the copy
        return state
