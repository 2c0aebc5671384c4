"""fxdp: differentially private training (DP-SGD) for PyTorch, as a compiler pass.

``fxdp.privatize(model, ...)`` makes one backward pass produce per-sample
clipped gradient sums (bookkeeping ghost clipping) in ``p.private_grad``.
"""
from fxdp.engine.install import (clear_private_grads, engine_of, get_engine, is_privatized, privacy_units, privatize,
                                 unprivatize)
from fxdp.core.config import ClippingFn, ClippingStyle, DPConfig, LossReduction, make_config
from fxdp.core.version import VERSION
from fxdp.core.lazy import lazy_attributes
from fxdp.core.errors import BatchLayoutError, PrivacyError, SampleMixingError, UncoveredParameterError
from fxdp.report import Report, explain
from fxdp.analysis.side_effects import in_analysis

from fxdp.compile.backend import register as _register_backend

_register_backend()

__version__ = VERSION

# Names provided by modules of later pipeline stages, imported on first use.
_LAZY = {
    "DPOptimizer": "fxdp.training.optimizer",
    "PrivacyEngine": "fxdp.training.privacy_engine",
    "BatchMemoryManager": "fxdp.training.loaders",
    "AdaptiveClipping": "fxdp.training.adaptive",
    "audit": "fxdp.auditing.canary",
    "AuditResult": "fxdp.auditing.canary",
    "fix_batchnorm": "fxdp.fix",
    "validate": "fxdp.fix",
    "per_sample_loss": "fxdp.training.losses",
    "per_sample_criterion": "fxdp.training.criterion",
    "DPDistributed": "fxdp.distributed",
    "privacy_calculator": "fxdp.report.privacy_calculator",
}


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "privatize", "unprivatize", "privacy_units", "explain", "in_analysis", "is_privatized", "get_engine",
    "engine_of", "clear_private_grads",
    "DPConfig", "ClippingStyle", "ClippingFn", "LossReduction", "make_config", "Report",
    "PrivacyError", "UncoveredParameterError", "SampleMixingError", "BatchLayoutError",
]
