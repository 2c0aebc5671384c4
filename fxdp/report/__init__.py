"""Reports on privatized models: ``explain`` and debug dumps."""
from .explain import Report, explain

__all__ = ["Report", "explain"]
