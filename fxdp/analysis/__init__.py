"""Layer 2 -- what fxdp learns about a model before it trains it.

- :mod:`~fxdp.analysis.interceptor`: the TorchFunctionMode that sees every torch call touching a trainable
  parameter and binds it to a rule (shared by the analysis runs and the engine's training forwards).
- :mod:`~fxdp.analysis.drawn_dropout`: attention dropout drawn inside a parameter use (sdpa with a trainable
  ``attn_mask``), re-spelled by the interceptor so the mask is drawn once, outside the use.
- :mod:`~fxdp.analysis.state`: the :class:`Analysis` of one example batch and its :class:`Entry` per call site.
- :mod:`~fxdp.analysis.runner`: the one pass runner (named passes, ``[pass NAME]`` in errors, dumps after each).
- :mod:`~fxdp.analysis.dumps`: FXDP_DEBUG dumps of the passes.
- The passes, in pipeline order: capture -> batch layout -> virtual parameters are batch-free -> sample mixing (values, then gradients) ->
  lifting of batch-free position ids -> a warning when user forward hooks were re-run (``in_analysis``).
- :mod:`~fxdp.analysis.plan_groups`: clip groups and blocks from the module tree (once, at privatize time).
"""
from fxdp.analysis.runner import PassResult, run_pipeline
from fxdp.analysis.state import Analysis, Entry
from fxdp.analysis.batch_layout import infer_batch_layouts
from fxdp.analysis.capture import capture_runs
from fxdp.analysis.gradient_mixing import check_gradient_mixing
from fxdp.analysis.lift import plan_lifts, verify_lifts
from fxdp.analysis.sample_mixing import check_sample_mixing
from fxdp.analysis.virtuals import check_virtuals
from fxdp.analysis.side_effects import in_analysis, report_side_effects

PIPELINE = (capture_runs, infer_batch_layouts, check_virtuals, check_sample_mixing, check_gradient_mixing,
            plan_lifts, verify_lifts, report_side_effects)

__all__ = ["Analysis", "Entry", "PassResult", "PIPELINE", "in_analysis", "run_pipeline"]
