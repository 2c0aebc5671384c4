"""Integrations with training frameworks (optional extras).

- :class:`DPTrainer` / :class:`PrivacyArguments` (:mod:`fxdp.integrations.hf_trainer`):
  DP-SGD with the HuggingFace ``transformers.Trainer`` (``pip install 'fxdp[hf]'``).

Imported on first use, so ``import fxdp`` never needs transformers.
"""

_LAZY = {
    "DPTrainer": "fxdp.integrations.hf_trainer",
    "PrivacyArguments": "fxdp.integrations.hf_arguments",
    "BudgetExceededError": "fxdp.integrations.hf_budget",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxdp.integrations' has no attribute {name!r}")


__all__ = list(_LAZY)
