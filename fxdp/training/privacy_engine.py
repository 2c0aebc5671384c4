"""PrivacyEngine: Opacus's calling conventions over fxdp's bookkeeping engine.

``make_private`` privatizes the model in place (the returned module IS the
module passed in: same class, same parameters, no wrapper), wraps the
optimizer in :class:`fxdp.DPOptimizer`, and replaces the data loader with a
Poisson-sampling one (Opacus's ``DPDataLoader``). The accountant
(``opacus.accountants``) records every step at the sampler's own rate.

Switching from Opacus: change the import. Differences, all deliberate:

- no ``GradSampleModule`` wrapper; ``grad_sample_mode`` is accepted ("hooks",
  "functorch", "ew", "ghost": the last returns, as the 4th element, the criterion as a
  per-sample loss whose batch reduction fxdp applies itself -- weighted means and
  ``ignore_index`` token means converted, see :mod:`fxdp.training.criterion`) but fxdp always
  uses bookkeeping clipping in one backward pass; a criterion whose mean visibly divides by a
  batch-dependent quantity (``CrossEntropyLoss(weight=w)``) is refused in the other modes;
- ``clipping="flat"`` or ``"adaptive"`` (R learned privately, :mod:`fxdp.training.adaptive`, with
  Opacus's ``target_unclipped_quantile``, ``clipbound_learning_rate``, ``unclipped_num_std`` (or
  ``count_noise_multiplier``), ``max_clipbound``, ``min_clipbound``); other groupings are fxdp styles (``style=``);
- ``poisson_sampling=False`` keeps a shuffled/sequential loader but is
  accounted honestly (one full-batch Gaussian mechanism of sensitivity 2R per
  epoch: ε under replace-one adjacency, see :mod:`fxdp.training.accounting`), not
  as if it were Poisson sampling;
- the Poisson loader samples only the examples the given loader visits (a
  ``Subset``, or the indices of a ``SubsetRandomSampler``: a train split), at the
  rate charged for that set; a sampler whose visited set is unknown is refused;
- every step checks that the samples the model clipped since the last step are
  exactly the examples drawn from the returned loader for it, that a batch was
  drawn from it at all, and that every trainable parameter of the model is in the
  optimizer (:mod:`fxdp.training.step_check`);
- a step after more than one Poisson batch, a parameter used outside the
  privatized forward, or a plain-optimizer checkpoint without the noise state
  are refused (see :mod:`fxdp.training.optimizer`);
- checkpoints load with ``torch.load(weights_only=True)`` and carry the noise
  generator, the sampler's generator and torch's global RNG state, so a
  resumed run continues exactly as the uninterrupted one (module
  ``fxdp.training.checkpoint``).

Each optimizer step must consume exactly one batch of the returned loader
(use :class:`fxdp.BatchMemoryManager` for micro-batches). Resumption is bit-exact
for checkpoints taken at an epoch boundary (the loader's iterator finished);
after a mid-epoch checkpoint the resumed run draws fresh Poisson batches from
the saved sampler state (sound for privacy and accounting, but not the
uninterrupted run's batches).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
from opacus.data_loader import switch_generator
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fxdp.engine import install as api
from fxdp.core.errors import PrivacyConfigError, PrivacyError
from fxdp.training.entry_point import PrivateTrainingEngine
from fxdp.training.accounting import (REPLACE_ONE_SENSITIVITY, EpochCharge, PoissonCharge, get_noise_multiplier,
                                      mark_epochs, sampling_of)
from fxdp.training.criterion import SAFE_FORM, batch_dependent_normaliser, per_sample_criterion
from fxdp.training.noise import generator_from_global_rng, generator_from_os_entropy
from fxdp.training.adaptive import check_clipping_option, from_clipping_option
from fxdp.training.optimizer import DPOptimizer
from fxdp.training.loaders import make_poisson_loader
from fxdp.training.samplers import refuse_repeated_examples
from fxdp.training.step_check import bind_loader_check, refuse_unowned

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


class PrivacyEngine(PrivateTrainingEngine):
    """Differentially private training with Opacus's API (module docstring).

    Args:
        accountant: "prv" (default, tight), "rdp" or "gdp" (an approximation that can
            under-estimate ε) -- accountants from ``opacus.accountants``.
        secure_mode: noise and sampling from generators seeded with OS entropy, noise
            re-seeded every step, and the floating-point attack mitigation; see
            :mod:`fxdp.training.noise` for what it does and does not protect against.
            Checkpoints then carry no generator state (resumption is not bit-exact,
            and noise is never replayed).
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        super().__init__(accountant, secure_mode)
        self.dataset = None
        self.sampling = None

    # ------------------------------------------------------------------ setup
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm: float, poisson_sampling: bool = True,
                     batch_first: bool = True, rand_on_empty: bool = False, **kwargs):
        """Privatize ``module`` and return ``(module, optimizer, data_loader)``.

        Args (besides Opacus's): ``style``, ``clipping_fn``,
        ``numerical_stability_constant``, ``block_heads``, ``batch_dim`` as in
        :func:`fxdp.privatize`; ``public_grads`` as in :class:`fxdp.DPOptimizer`.
        Opacus's ``criterion``, ``clipping``, ``grad_sample_mode``, ``wrap_model``,
        ``noise_generator`` are accepted (see the module docstring).

        Raises:
            ValueError: bad arguments; optimizer parameters not in ``module``; a
                ``noise_generator`` in secure mode; a model already privatized
                with a different configuration.
            PrivacyError: a sampler fxdp cannot account for.
        """
        loader = self._prepare_loader(data_loader, poisson_sampling, batch_first, rand_on_empty)
        return self._make_private(module=module, optimizer=optimizer, data_loader=loader,
                                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                  batch_first=batch_first, **kwargs)

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                                  data_loader: DataLoader, target_epsilon: float, target_delta: float,
                                  epochs: float, max_grad_norm: float, epsilon_tolerance: float = 0.01,
                                  poisson_sampling: bool = True, batch_first: bool = True,
                                  rand_on_empty: bool = False, **kwargs):
        """Like :meth:`make_private`, with σ chosen by the accountant so that
        ``epochs`` epochs of the returned loader spend at most ``target_epsilon``
        at ``target_delta`` (the rate is read from the loader's actual sampler)."""
        self.warn_if_budget_spent()
        loader = self._prepare_loader(data_loader, poisson_sampling, batch_first, rand_on_empty)
        sampling = sampling_of(loader)
        mech = self.accountant.mechanism()
        if sampling.poisson:
            sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                         sample_rate=sampling.sample_rate, epochs=epochs, accountant=mech,
                                         epsilon_tolerance=epsilon_tolerance)
        else:  # one Gaussian mechanism of sensitivity 2R per epoch (replace-one): sigma/2 is what is charged
            sigma = REPLACE_ONE_SENSITIVITY * get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=1.0,
                steps=int(math.ceil(epochs - 1e-9)), accountant=mech, epsilon_tolerance=epsilon_tolerance)
        return self._make_private(module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                                  max_grad_norm=max_grad_norm, batch_first=batch_first, **kwargs)

    def _make_private(self, *, module, optimizer, data_loader, noise_multiplier, max_grad_norm, batch_first,
                      criterion=None, style="all-layer", clipping_fn="abadi", numerical_stability_constant=None,
                      block_heads=None, batch_dim=None, loss_reduction="mean", clipping="flat",
                      noise_generator=None, grad_sample_mode="hooks", wrap_model=True, public_grads="refuse",
                      **adaptive_options):
        if not isinstance(module, nn.Module):
            raise ValueError(f"fxdp: module must be an nn.Module, got {type(module).__name__}.")
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise PrivacyConfigError("fxdp: PrivacyEngine runs in one process; for DistributedDataParallel use "
                             "fxdp.DPDistributed.")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        owned = {id(p) for p in module.parameters()}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("fxdp: the optimizer has parameters that are not the module's parameters.")
        check_clipping_option(clipping, adaptive_options)
        refuse_unowned(module, optimizer)
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"fxdp: grad_sample_mode={grad_sample_mode!r} is not supported; expected one of "
                             f"{GRAD_SAMPLE_MODES} (fxdp always computes bookkeeping clipped sums).")
        if noise_generator is not None and self.secure_mode:
            raise ValueError("fxdp: secure_mode draws OS-seeded noise; passing noise_generator (a seed) is refused.")
        if not isinstance(wrap_model, bool):
            raise ValueError(f"fxdp: wrap_model must be a bool, got {wrap_model!r}.")
        if criterion is not None and "ghost" not in grad_sample_mode and batch_dependent_normaliser(criterion):
            raise PrivacyConfigError(
                f"fxdp: the criterion is not a per-sample loss: {batch_dependent_normaliser(criterion)}, "
                f"so one example could move the update by far more than R. Use {SAFE_FORM}.")
        engine = api.ensure_privatized(
            module, batch_first=batch_first, batch_dim=batch_dim, style=style, max_grad_norm=max_grad_norm,
            clipping_fn=clipping_fn, numerical_stability_constant=numerical_stability_constant,
            loss_reduction=loss_reduction, block_heads=block_heads)
        self.claim(engine)
        config = engine.config
        adaptive = from_clipping_option(clipping, module, adaptive_options)
        sampling = sampling_of(data_loader)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier, config.max_grad_norm, sampling.expected_batch_size,
                                   config.loss_reduction, generator=noise_generator, secure_mode=self.secure_mode,
                                   public_grads=public_grads, adaptive_clipping=adaptive)
        if sampling.poisson:
            dp_optimizer.attach_step_hook(PoissonCharge(self.accountant, sampling.sample_rate))
        else:
            charge = EpochCharge(self.accountant)
            data_loader = mark_epochs(data_loader, charge)
            dp_optimizer.attach_step_hook(charge)
        dp_optimizer.set_param_names(module)
        bind_loader_check(dp_optimizer, data_loader, "the data loader make_private returned")
        self.module, self.optimizer, self.data_loader, self.sampling = module, dp_optimizer, data_loader, sampling
        if "ghost" in grad_sample_mode:  # fxdp applies the batch reduction itself (fxdp.training.criterion)
            criterion = per_sample_criterion(criterion if criterion is not None else nn.CrossEntropyLoss(),
                                             config.loss_reduction.value)
            return module, dp_optimizer, criterion, data_loader
        return module, dp_optimizer, data_loader

    def _prepare_loader(self, data_loader, poisson_sampling, batch_first, rand_on_empty):
        if not isinstance(data_loader, DataLoader):
            raise ValueError(f"fxdp: data_loader must be a torch DataLoader, got {type(data_loader).__name__}.")
        if self.dataset is None:
            self.dataset = data_loader.dataset
        elif self.dataset is not data_loader.dataset:
            warnings.warn("fxdp: PrivacyEngine got a different dataset object; privacy is accounted per dataset: "
                          "use a new PrivacyEngine for a different dataset.", UserWarning)
        sampler = data_loader.batch_sampler
        if isinstance(sampler, DistributedUniformWithReplacementSampler):
            raise ValueError("fxdp: distributed Poisson sampling belongs to fxdp.DPDistributed.")
        if poisson_sampling:
            generator = generator_from_os_entropy() if self.secure_mode else (
                data_loader.generator if data_loader.generator is not None else generator_from_global_rng())
            rate = sampler.sample_rate if isinstance(sampler, UniformWithReplacementSampler) else None
            loader = make_poisson_loader(data_loader, sample_rate=rate, generator=generator, batch_first=batch_first,
                                         rand_on_empty=rand_on_empty)
            self.sampler_generator = generator
            return loader
        refuse_repeated_examples(data_loader.dataset)
        sampling = sampling_of(data_loader)
        if not sampling.poisson:
            warnings.warn(
                "fxdp: poisson_sampling=False with fixed-size batches: there is no amplification by subsampling to "
                "claim, so each epoch is accounted as one full-batch Gaussian mechanism of sensitivity 2R, and ε is "
                "for replace-one adjacency (one example substituted); a valid bound, much larger than the Poisson "
                "figure. Use poisson_sampling=True for the amplified (add/remove) ε.", UserWarning)
        inner = getattr(sampler, "sampler", sampler)
        if self.secure_mode and getattr(inner, "generator", "absent") != "absent":
            data_loader = switch_generator(data_loader=data_loader, generator=generator_from_os_entropy())
            inner = getattr(data_loader.batch_sampler, "sampler", data_loader.batch_sampler)
        self.sampler_generator = getattr(inner, "generator", None)
        return data_loader


__all__ = ["PrivacyEngine", "PrivacyError"]
