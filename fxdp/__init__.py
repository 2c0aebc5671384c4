"""fxdp: differentially private training (DP-SGD) for PyTorch, as a compiler pass.

``fxdp.privatize(model, ...)`` makes one backward pass produce per-sample
clipped gradient sums (bookkeeping ghost clipping) in ``p.private_grad``.
"""
from .api import clear_private_grads, engine_of, get_engine, is_privatized, privatize, unprivatize
from .config import ClippingFn, ClippingStyle, DPConfig, LossReduction, make_config
from .errors import BatchLayoutError, PrivacyError, SampleMixingError, UncoveredParameterError
from .report import Report, explain

from .backend import register as _register_backend

_register_backend()

__version__ = "0.1.0"

# Names provided by modules of later pipeline stages, imported on first use.
_LAZY = {
    "DPOptimizer": "fxdp.runtime.optimizer",
    "PrivacyEngine": "fxdp.privacy_engine",
    "BatchMemoryManager": "fxdp.runtime.virtual_steps",
    "audit": "fxdp.auditing",
    "AuditResult": "fxdp.auditing",
    "fix_batchnorm": "fxdp.fix",
    "validate": "fxdp.fix",
    "per_sample_loss": "fxdp.losses",
    "DPDistributed": "fxdp.distributed",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxdp' has no attribute {name!r}")

__all__ = [
    "privatize", "unprivatize", "explain", "is_privatized", "get_engine", "engine_of", "clear_private_grads",
    "DPConfig", "ClippingStyle", "ClippingFn", "LossReduction", "make_config", "Report",
    "PrivacyError", "UncoveredParameterError", "SampleMixingError", "BatchLayoutError",
]
