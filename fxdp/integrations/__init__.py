"""Integrations with training frameworks (optional extras).

- :class:`DPTrainer` / :class:`PrivacyArguments` (:mod:`fxdp.integrations.hf_trainer`):
  DP-SGD with the HuggingFace ``transformers.Trainer`` (``pip install 'fxdp[hf]'``).

Imported on first use, so ``import fxdp`` never needs transformers.
"""
from fxdp.core.lazy import lazy_attributes

_LAZY = {
    "DPTrainer": "fxdp.integrations.hf_trainer",
    "PrivacyArguments": "fxdp.integrations.hf_arguments",
    "BudgetExceededError": "fxdp.integrations.hf_budget",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
