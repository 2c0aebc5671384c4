"""fxdp: differentially private training (DP-SGD) for PyTorch, as a compiler pass.

``fxdp.privatize(model, ...)`` makes one backward pass produce per-sample
clipped gradient sums (bookkeeping ghost clipping) in ``p.private_grad``.
"""
from .api import clear_private_grads, get_engine, is_privatized, privatize, unprivatize
from .config import ClippingFn, ClippingStyle, DPConfig, LossReduction, make_config
from .errors import BatchLayoutError, PrivacyError, SampleMixingError, UncoveredParameterError
from .report import Report, explain

__version__ = "0.1.0"

__all__ = [
    "privatize", "unprivatize", "explain", "is_privatized", "get_engine", "clear_private_grads",
    "DPConfig", "ClippingStyle", "ClippingFn", "LossReduction", "make_config", "Report",
    "PrivacyError", "UncoveredParameterError", "SampleMixingError", "BatchLayoutError",
]
