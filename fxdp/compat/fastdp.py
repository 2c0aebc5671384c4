"""fastDP-compatible ``PrivacyEngine``: ``engine.attach(optimizer)`` makes the plain loop private.

    engine = PrivacyEngine(model, batch_size=256, sample_size=50000, epochs=3, target_epsilon=2,
                           clipping_fn="automatic", clipping_mode="MixOpt", clipping_style="all-layer")
    engine.attach(optimizer)
    ...  loss.backward(); optimizer.step(); optimizer.zero_grad()   # DP now
    engine.detach()

Semantics: each ``optimizer.step()`` releases ``(Σ_b C_b·g_b + N(0, σ²R²)) / batch_size``
(``loss_reduction="mean"``), however many ``backward()`` calls were accumulated
since the last step (fastDP's gradient accumulation); ``batch_size`` is the
logical batch size. Accounting: every step is one Poisson-subsampled Gaussian
mechanism at ``sample_rate = batch_size / sample_size``, as in fastDP -- valid
only when batches really are Poisson samples (e.g.
``opacus.data_loader.DPDataLoader(dataset, sample_rate=batch_size/sample_size)``);
``attach`` warns about this. Better: ``loader = engine.attach(optimizer, data_loader=loader)``
returns fxdp's Poisson loader over the examples ``loader`` visits (there must be
``sample_size`` of them) at that rate, and every step then checks that the samples clipped
since the last step are exactly the examples drawn from it for this step
(:mod:`fxdp.training.step_check`).

Every trainable parameter of the module must be in the optimizer (or be frozen):
one the optimizer does not own would accumulate clipped, un-noised sums.

Differences from fastDP, all deliberate:

- unknown keyword arguments raise ``TypeError`` (fastDP ignores them);
- ``clipping_fn="automatic"`` keeps your ``max_grad_norm`` (fastDP silently sets
  R = 1; with the default R = 1 the two agree);
- ``clipping_mode`` ("ghost", "MixGhostClip", "MixOpt") is accepted; fxdp always
  chooses ghost or instantiated norms per layer call from the real shapes (MixOpt);
- ``origin_params`` is accepted and checked (each name must match a parameter)
  but has no effect: fastDP uses it to skip autograd's weight-gradient GEMMs
  ("ghost differentiation"); fxdp's bookkeeping never runs those GEMMs anyway;
- ``torch_seed_is_fixed`` has no effect in one process: noise comes from a
  dedicated generator seeded from torch's global RNG; ``num_GPUs`` must be 1
  (for several processes use ``fxdp.DPDistributed``);
- a gradient written outside the privatized forward (``p.grad``) is refused,
  not silently dropped (fastDP zeroes it); parameters without a per-sample rule
  raise an error instead of being silently frozen;
- ``accounting_mode`` is "rdp" (default, as fastDP), "prv" or "gdp" (Opacus
  accountants); fastDP's "glw" is the numerical composition that "prv" implements,
  and is refused by name so that nobody reads a different number under its key.
- ``target_delta`` defaults to ``1 / (2 * sample_size)`` as in fastDP; prefer a
  δ well below ``1 / sample_size``.
"""
from __future__ import annotations

import types
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from fxdp.engine import install as api
from fxdp.core.config import make_config
from fxdp.training.accounting import (attach_accountant, create_accountant, epsilon_spent, get_noise_multiplier,
                                      steps_for_epochs)
from fxdp.training.loaders import make_poisson_loader
from fxdp.training.optimizer import DPOptimizer
from fxdp.training.step_check import bind_loader_check, refuse_unowned

CLIPPING_MODES = ("ghost", "MixGhostClip", "MixOpt")
ACCOUNTING_MODES = ("rdp", "prv", "gdp")
_ATTACHED = ("step", "zero_grad", "privacy_engine", "get_privacy_spent")


def _attached_step(optimizer, closure=None):
    return optimizer.privacy_engine.dp_optimizer.step(closure)


def _attached_zero_grad(optimizer, set_to_none: bool = True):
    optimizer.privacy_engine.dp_optimizer.zero_grad(set_to_none)


def _attached_get_privacy_spent(optimizer, **kwargs):
    return optimizer.privacy_engine.get_privacy_spent(**kwargs)


class PrivacyEngine:
    """fastDP's engine over fxdp (module docstring). Arguments as in fastDP."""

    def __init__(self, module: nn.Module, *, batch_size: int, sample_size: int, max_grad_norm: float = 1.0,
                 epochs: Optional[float] = None, num_steps: Optional[int] = None,
                 noise_multiplier: Optional[float] = None, target_epsilon: Optional[float] = None,
                 target_delta: Optional[float] = None, clipping_mode: str = "MixOpt",
                 clipping_fn: str = "automatic", clipping_style: Union[str, Sequence[str]] = "all-layer",
                 origin_params: Optional[Sequence[str]] = None, numerical_stability_constant: Optional[float] = None,
                 torch_seed_is_fixed: bool = False, num_GPUs: int = 1, loss_reduction: str = "mean",
                 accounting_mode: str = "rdp"):
        if not isinstance(module, nn.Module):
            raise ValueError(f"fxdp: module must be an nn.Module, got {type(module).__name__}.")
        for name, value in (("batch_size", batch_size), ("sample_size", sample_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"fxdp: {name} must be a positive int, got {value!r}.")
        if batch_size > sample_size:
            raise ValueError(f"fxdp: batch_size {batch_size} exceeds sample_size {sample_size}.")
        if (epochs is None) == (num_steps is None):
            raise ValueError("fxdp: give exactly one of epochs= and num_steps=.")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("fxdp: give exactly one of noise_multiplier= and target_epsilon=.")
        if clipping_mode not in CLIPPING_MODES:
            raise ValueError(f"fxdp: unknown clipping_mode {clipping_mode!r}; expected one of {CLIPPING_MODES}.")
        if accounting_mode not in ACCOUNTING_MODES:
            raise ValueError(f"fxdp: accounting_mode {accounting_mode!r} is not supported; use one of "
                             f"{ACCOUNTING_MODES} ('prv' is the numerical composition fastDP calls 'glw').")
        if not isinstance(torch_seed_is_fixed, bool):
            raise ValueError(f"fxdp: torch_seed_is_fixed must be a bool, got {torch_seed_is_fixed!r}.")
        if num_GPUs != 1:
            raise ValueError(f"fxdp: num_GPUs={num_GPUs!r}: this engine runs in one process; for several "
                             "processes use fxdp.DPDistributed, which scales the noise across ranks correctly.")
        if isinstance(clipping_style, str):
            style, block_heads = clipping_style, None
        elif isinstance(clipping_style, (list, tuple)) and all(isinstance(h, str) for h in clipping_style):
            style, block_heads = "block-wise", list(clipping_style)
        else:
            raise ValueError(f"fxdp: clipping_style must be a style name or a list of block-head layer names, "
                             f"got {clipping_style!r}.")
        if not isinstance(clipping_fn, str):
            raise ValueError(f"fxdp: clipping_fn must be a string, got {clipping_fn!r}.")
        self.config = make_config(style, max_grad_norm, clipping_fn.lower(), numerical_stability_constant,
                                  loss_reduction, block_heads)
        self.origin_params = self._check_origin_params(module, origin_params)
        self.module = module
        self.batch_size, self.sample_size = batch_size, sample_size
        self.sample_rate = batch_size / sample_size
        self.num_steps = int(num_steps) if num_steps is not None else steps_for_epochs(float(epochs), self.sample_rate)
        self.epochs = float(epochs) if epochs is not None else num_steps * self.sample_rate
        self.target_delta = float(target_delta) if target_delta is not None else 1 / (2 * sample_size)
        self.target_epsilon = target_epsilon
        self.accounting_mode = accounting_mode
        self.accountant = create_accountant(accounting_mode)
        if noise_multiplier is None:
            noise_multiplier = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=self.target_delta,
                                                    sample_rate=self.sample_rate, steps=self.num_steps,
                                                    accountant=accounting_mode)
        self.noise_multiplier = float(noise_multiplier)
        self.effective_noise_multiplier = self.noise_multiplier / batch_size
        self.max_grad_norm = self.config.max_grad_norm
        self.clipping_mode, self.clipping_fn, self.clipping_style = clipping_mode, clipping_fn, clipping_style
        self.loss_reduction = self.config.loss_reduction.value
        self.torch_seed_is_fixed = torch_seed_is_fixed
        self.optimizer = None
        self.dp_optimizer: Optional[DPOptimizer] = None
        self._privatized_here = False

    @staticmethod
    def _check_origin_params(module, origin_params):
        if origin_params is None:
            return None
        if isinstance(origin_params, str) or not all(isinstance(n, str) for n in origin_params):
            raise ValueError(f"fxdp: origin_params must be a list of parameter names, got {origin_params!r}.")
        names = [n for n, _ in module.named_parameters()]
        unmatched = [o for o in origin_params if not any(o in n for n in names)]
        if unmatched:
            raise ValueError(f"fxdp: origin_params {unmatched} match no parameter name of the module.")
        return list(origin_params)

    @property
    def steps(self) -> int:
        """Optimizer steps taken since attach."""
        return 0 if self.dp_optimizer is None else self.dp_optimizer.steps_taken

    def attach(self, optimizer: torch.optim.Optimizer, data_loader=None):
        """Make ``optimizer`` (the same object) take DP steps and privatize the module.

        With ``data_loader`` (fxdp's extension), returns a Poisson loader over the examples it visits
        at rate ``batch_size / sample_size``, bound to the optimizer's step checks; without, returns
        None and the caller must feed Poisson batches (a warning says so)."""
        if self.optimizer is not None:
            raise ValueError("fxdp: this engine is already attached; detach() first.")
        if any(k in optimizer.__dict__ for k in _ATTACHED):
            raise ValueError("fxdp: this optimizer is already attached to a privacy engine (or overrides step).")
        owned = {id(p) for p in self.module.parameters()}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("fxdp: the optimizer has parameters that are not the module's parameters.")
        refuse_unowned(self.module, optimizer)
        loader = None
        if data_loader is not None:
            loader = make_poisson_loader(data_loader, sample_rate=self.sample_rate)
            if loader.batch_sampler.num_samples != self.sample_size:
                raise ValueError(f"fxdp: the data loader visits {loader.batch_sampler.num_samples} examples but "
                                 f"sample_size={self.sample_size}; the accountant's rate batch_size/sample_size "
                                 "would not be the sampling rate.")
        engine = api.get_engine(self.module)
        if engine is None:
            api.privatize(self.module, config=self.config)
            self._privatized_here = True
        elif engine.config != self.config:
            raise ValueError(f"fxdp: the module is already privatized with {engine.config}.")
        dp = DPOptimizer(optimizer, self.noise_multiplier, self.max_grad_norm, self.batch_size,
                         self.config.loss_reduction)
        attach_accountant(dp, self.accountant, self.sample_rate)
        dp.inner_class_methods = True
        self.module.zero_grad(set_to_none=True)  # gradients of earlier non-private backward passes are dropped
        dp.set_param_names(self.module)
        self.dp_optimizer, self.optimizer = dp, optimizer
        optimizer.privacy_engine = self
        optimizer.step = types.MethodType(_attached_step, optimizer)
        optimizer.zero_grad = types.MethodType(_attached_zero_grad, optimizer)
        optimizer.get_privacy_spent = types.MethodType(_attached_get_privacy_spent, optimizer)
        if loader is not None:
            bind_loader_check(dp, loader, "the data loader attach returned")
            return loader
        warnings.warn(f"fxdp: privacy is accounted as Poisson sampling at rate batch_size/sample_size = "
                      f"{self.sample_rate:.4g} (as fastDP does); this holds only if each logical batch is a Poisson "
                      "sample (opacus.data_loader.DPDataLoader). Shuffled fixed-size batches do not have this "
                      "guarantee.", UserWarning)

    def detach(self) -> None:
        """Restore the optimizer's own step/zero_grad and unprivatize the module (if attach privatized it)."""
        if self.optimizer is None:
            raise ValueError("fxdp: this engine is not attached.")
        for key in _ATTACHED:
            self.optimizer.__dict__.pop(key, None)
        if self._privatized_here and api.is_privatized(self.module):
            api.unprivatize(self.module)
        self._privatized_here = False
        self.module.zero_grad(set_to_none=True)
        self.optimizer, self.dp_optimizer = None, None

    def get_privacy_spent(self, steps: Optional[int] = None, accounting_mode: Optional[str] = None,
                          lenient: bool = False) -> dict:
        """ε at ``target_delta`` after the steps taken (or ``steps`` hypothetical ones):
        ``{"eps_rdp", "alpha_rdp"}`` for RDP (fastDP's keys), ``{"eps_prv"}`` / ``{"eps_gdp"}`` otherwise."""
        mode = accounting_mode or self.accounting_mode
        try:
            accountant = create_accountant(mode)
            if mode not in ACCOUNTING_MODES:
                raise ValueError(f"fxdp: accounting_mode must be one of {ACCOUNTING_MODES}.")
            accountant.history = (list(self.accountant.history) if steps is None else
                                  ([(self.noise_multiplier, self.sample_rate, int(steps))] if steps else []))
            eps = epsilon_spent(accountant, self.target_delta)
            if mode == "rdp":
                alpha = accountant.get_privacy_spent(delta=self.target_delta)[1] if accountant.history else None
                return {"eps_rdp": eps, "alpha_rdp": alpha}
            return {f"eps_{mode}": eps}
        except Exception:
            if lenient:
                return {}
            raise

    def __repr__(self):
        return (f"fxdp.compat.fastdp.PrivacyEngine(noise_multiplier={self.noise_multiplier:.6f}, "
                f"max_grad_norm={self.max_grad_norm}, batch_size={self.batch_size}, sample_size={self.sample_size}, "
                f"sample_rate={self.sample_rate:.6g}, epochs={self.epochs}, target_delta={self.target_delta:.3g}, "
                f"clipping_fn={self.config.clipping_fn.value!r}, style={self.config.style.value!r}, "
                f"accounting_mode={self.accounting_mode!r})")
