"""Layer 4 -- ``torch.compile(model, backend="fxdp")``: the engine's taps inside dynamo graphs.

- :mod:`~fxdp.compile.backend`: the backend entry point (rewrite a region, hand it to the inner compiler).
- :mod:`~fxdp.compile.region`: the region passes (run by the analysis layer's pass runner conventions).
- :mod:`~fxdp.compile.insert_taps`, :mod:`~fxdp.compile.composite_taps`: the graph rewrite.
- :mod:`~fxdp.compile.graph_ops`: the custom ops and the capture function the rewritten graphs call.
- :mod:`~fxdp.compile.graph_checks`: the eager structural sample-mixing check, run on every compiled graph.
- :mod:`~fxdp.compile.forwards`: the run-time side -- an engine's compiled forward passes, feeding the same
  records and finalize as eager taps.
- :mod:`~fxdp.compile.islands`: code dynamo runs untraced (a disabled submodule, a root forward dynamo gave
  up on) tapped by the eager interceptor.
"""
from fxdp.compile import forwards as _forwards  # noqa: F401  (installs the engine's compiled-forward handler)
from fxdp.compile import graph_checks as _graph_checks  # noqa: F401  (registers the graph captures as taps)
from fxdp.compile.backend import fxdp_backend, register

__all__ = ["fxdp_backend", "register"]
