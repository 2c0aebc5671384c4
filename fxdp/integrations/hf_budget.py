"""The privacy budget of a DPTrainer run: ε guard (stop before, refuse at) and checkpoint state.

:class:`BudgetCallback` is a ``transformers.TrainerCallback``:

- ``on_step_end``: if one more step would spend more than ``target_epsilon``, stop
  training (``control.should_training_stop``), so the Trainer ends gracefully;
- ``on_pre_optimizer_step``: if THIS step would exceed the budget (e.g. a resumed run
  with a larger ``max_steps``), raise :class:`BudgetExceededError` before the
  noised gradient is released or charged.

The check is exact: ε of the accountant's history plus one step; it is skipped
(cheaply) while the history is the calibrated (σ, q) and no longer than the
calibrated number of steps, which the calibration already proved within budget.

The checkpoint file ``fxdp_privacy.pt`` (written next to the Trainer's own files,
loadable with ``weights_only=True``) holds the accountant history, the Poisson
sampler's generator state (one per rank under a multi-process launch, gathered by
rank 0), the world size and the calibration (σ, R, q, δ), so that a resume continues
the same accounting and sampling, and refuses a different calibration or world size.
"""
from __future__ import annotations

import copy
import math
import os

import torch
from transformers import TrainerCallback

from fxdp.core.errors import PrivacyError
from fxdp.training.accounting import epsilon_spent

STATE_FILE = "fxdp_privacy.pt"
FORMAT = 1


class BudgetExceededError(PrivacyError):
    """A step would spend more than the run's ε budget."""


class Budget:
    """ε bookkeeping of one run: accountant, δ, target, and the calibrated (σ, q, steps)."""

    def __init__(self, accountant, delta: float, target_epsilon, sigma: float, sample_rate: float, steps: int):
        self.accountant, self.delta, self.target_epsilon = accountant, float(delta), target_epsilon
        self.sigma, self.sample_rate, self.steps = float(sigma), float(sample_rate), int(steps)

    def epsilon(self) -> float:
        return epsilon_spent(self.accountant, self.delta)

    def epsilon_after_next_step(self, sigma: float) -> float:
        history = list(self.accountant.history)
        if self.target_epsilon is not None and self._within_calibration(history, sigma):
            return -math.inf  # proved within budget by the calibration
        probe = copy.deepcopy(self.accountant)
        probe.step(noise_multiplier=float(sigma), sample_rate=self.sample_rate)
        return epsilon_spent(probe, self.delta)

    def _within_calibration(self, history, sigma) -> bool:
        same = all(float(s) == self.sigma and float(q) == self.sample_rate for s, q, _ in history)
        return same and float(sigma) == self.sigma and sum(int(n) for *_, n in history) + 1 <= self.steps

    def would_exceed(self, sigma: float) -> bool:
        return self.target_epsilon is not None and self.epsilon_after_next_step(sigma) > self.target_epsilon


class BudgetCallback(TrainerCallback):
    """Stops training before the budget is exceeded and refuses a step that would exceed it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _sigma(self):
        return self.trainer.dp_optimizer.noise_multiplier

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.budget.would_exceed(self._sigma()):
            control.should_training_stop = True
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        budget = self.trainer.budget
        if budget.would_exceed(self._sigma()):
            raise BudgetExceededError(
                f"fxdp: this optimizer step would spend ε = {budget.epsilon_after_next_step(self._sigma()):.4g} > "
                f"target_epsilon = {budget.target_epsilon} at δ = {budget.delta:g} (spent so far: "
                f"{budget.epsilon():.4g} over {len(budget.accountant)} steps). Lower max_steps / num_train_epochs or "
                "raise the budget knowingly.")
        return control


def save_state(trainer, folder: str, rank_sampler_states=None) -> None:
    """Write ``fxdp_privacy.pt`` into the checkpoint ``folder`` (module docstring);
    ``rank_sampler_states``: every rank's sampler generator state, under a multi-process launch."""
    b = trainer.budget
    sampler_state = None if trainer.privacy_args.secure_mode else trainer.sampler_generator.get_state()
    torch.save({"format": FORMAT, "accountant": b.accountant.state_dict(), "sampler_generator_state": sampler_state,
                "world_size": int(trainer.args.world_size), "rank_sampler_generator_states": rank_sampler_states,
                "noise_multiplier": b.sigma, "sample_rate": b.sample_rate, "delta": b.delta,
                "max_grad_norm": trainer.privacy_args.config.max_grad_norm,
                "secure_mode": trainer.privacy_args.secure_mode}, os.path.join(folder, STATE_FILE))


def load_state(trainer, folder: str) -> None:
    """Restore ``fxdp_privacy.pt`` from ``folder``; refuse a missing file or another calibration."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise PrivacyError(f"fxdp: the checkpoint {folder} has no {STATE_FILE}: resuming without the privacy "
                           "accountant's history would under-count ε. Resume only from checkpoints DPTrainer wrote.")
    state = torch.load(path, weights_only=True)
    if state.get("format") != FORMAT:
        raise PrivacyError(f"fxdp: {path} has an unknown format {state.get('format')!r}.")
    world_size = int(state.get("world_size", 1))
    if world_size != int(trainer.args.world_size):
        raise PrivacyError(f"fxdp: the checkpoint {folder} was written by {world_size} process(es), this run has "
                           f"{trainer.args.world_size}: each rank's Poisson sampling stream is saved, and they cannot "
                           "be re-split over another number of ranks without replaying earlier draws. Resume with "
                           f"the same number of processes ({world_size}).")
    b = trainer.budget
    mismatched = [f"{k}: checkpoint {state[k]} vs now {now}" for k, now in
                  (("noise_multiplier", b.sigma), ("sample_rate", b.sample_rate), ("delta", b.delta),
                   ("max_grad_norm", trainer.privacy_args.config.max_grad_norm))
                  if not math.isclose(float(state[k]), float(now), rel_tol=1e-9)]
    if mismatched:
        raise PrivacyError("fxdp: the checkpoint was trained with another privacy calibration (" +
                           "; ".join(mismatched) + "); resume with the same PrivacyArguments, batch sizes, data set "
                           "and number of steps.")
    b.accountant.load_state_dict(state["accountant"])
    if trainer.privacy_args.secure_mode:
        return
    if world_size > 1 and state.get("rank_sampler_generator_states") is not None:
        trainer.sampler_generator.set_state(state["rank_sampler_generator_states"][int(trainer.args.process_index)])
    elif world_size == 1 and state["sampler_generator_state"] is not None:
        trainer.sampler_generator.set_state(state["sampler_generator_state"])


__all__ = ["Budget", "BudgetCallback", "BudgetExceededError", "STATE_FILE", "load_state", "save_state"]
