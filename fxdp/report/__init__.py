"""Reports on privatized models: ``explain`` (table, cost model, block graph)
and debug dumps of the analysis (see :mod:`fxdp.report.debug`)."""
from fxdp.report.explain import explain
from fxdp.report.result import Report

__all__ = ["Report", "explain"]
