"""What every engine-level entry point shares (``PrivacyEngine``, ``DPDistributed``, and others built
on them): one accountant per training run, ε spent so far, and checkpoints.

An entry point owns the run's accountant and hooks it onto the :class:`~fxdp.training.optimizer.DPOptimizer`
it builds (the optimizer itself knows nothing of accounting), so the charge always matches the sampling
the entry point set up. Subclasses set :attr:`checkpoint_io`, the module whose ``save`` / ``load``
write and read their checkpoints (single process: :mod:`fxdp.training.checkpoint`).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from fxdp.core.errors import PrivacyConfigError
from fxdp.training import checkpoint as single_process_checkpoint
from fxdp.training.accounting import create_accountant, epsilon_spent


class PrivateTrainingEngine:
    """Base of the entry points: accountant, secure mode, ε, checkpoints (module docstring)."""

    checkpoint_io = single_process_checkpoint

    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(accountant)
        self.accountant_name = self.accountant.mechanism()
        self.secure_mode = bool(secure_mode)
        self.module = None
        self.optimizer = None
        self.data_loader = None
        self.sampler_generator: Optional[torch.Generator] = None

    def claim(self, engine) -> None:
        """Make this entry point the one that accounts for ``engine``'s model. A second entry point
        (a fresh ``PrivacyEngine``) on the same model would start ε from zero although the model has
        already spent budget on the data: refused. The same entry point may call ``make_private`` again."""
        owner = getattr(engine, "accounting_owner", None)
        owner = owner() if owner is not None else None
        if owner is not None and owner is not self and len(owner.accountant) > 0:
            raise PrivacyConfigError(
                f"fxdp: this model's training is already accounted by another {type(owner).__name__} "
                f"(ε spent so far: {len(owner.accountant)} charges); a new one would report ε from zero. Call "
                "make_private again on that same engine to continue the run, or fxdp.unprivatize(model) and "
                "re-privatize a fresh copy of the model for a new, separately accounted run.")
        engine.accounting_owner = weakref.ref(self)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before the first step; inf after a step with σ = 0), for the
        adjacency of the sampling used: add/remove one example under Poisson sampling, replace-one
        under fixed-size batches (``poisson_sampling=False``; see :mod:`fxdp.training.accounting`)."""
        return epsilon_spent(self.accountant, delta)

    def warn_if_budget_spent(self) -> None:
        """σ calibrated for a target ε assumes nothing was spent yet: say so when something was."""
        if len(self.accountant) > 0:
            warnings.warn(f"fxdp: this {type(self).__name__} has already spent privacy budget; the noise multiplier "
                          "is computed from zero, so the total ε will exceed target_epsilon.", UserWarning)

    def save_checkpoint(self, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                        checkpoint_dict: Optional[dict] = None, module_state_dict_kwargs: Optional[dict] = None,
                        torch_save_kwargs: Optional[dict] = None) -> None:
        """Save model, optimizer (with the noise state), accountant, sampler generator and RNG
        state to ``path``; loadable with ``torch.load(weights_only=True)``. ``checkpoint_dict``
        adds your own entries (they must be weights_only-loadable). See :attr:`checkpoint_io`."""
        self.checkpoint_io.save(self, path=path, module=module, optimizer=optimizer, noise_scheduler=noise_scheduler,
                                checkpoint_dict=checkpoint_dict, module_state_dict_kwargs=module_state_dict_kwargs,
                                torch_save_kwargs=torch_save_kwargs)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                        module_load_dict_kwargs: Optional[dict] = None, torch_load_kwargs: Optional[dict] = None,
                        restore_rng_state: bool = True) -> dict:
        """Restore what :meth:`save_checkpoint` saved (with ``weights_only=True``) and return the
        remaining entries (your ``checkpoint_dict``). Call it after ``make_private`` with the same
        configuration; the run then continues exactly as the uninterrupted one (except in secure
        mode) and never replays earlier noise."""
        return self.checkpoint_io.load(self, path=path, module=module, optimizer=optimizer,
                                       noise_scheduler=noise_scheduler, module_load_dict_kwargs=module_load_dict_kwargs,
                                       torch_load_kwargs=torch_load_kwargs, restore_rng_state=restore_rng_state)
