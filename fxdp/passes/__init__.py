"""Analysis passes, in pipeline order: capture -> batch layout -> sample mixing
(values, then gradients) -> lifting. Each pass is a small named function ``Analysis -> PassResult``.
Group planning (``plan_groups``) works on the module tree and runs once at
privatize time."""
from .base import Analysis, Entry, PassResult, run_pipeline
from .batch_layout import infer_batch_layouts
from .capture import capture_runs
from .gradient_mixing import check_gradient_mixing
from .lift import plan_lifts, verify_lifts
from .sample_mixing import check_sample_mixing

PIPELINE = (capture_runs, infer_batch_layouts, check_sample_mixing, check_gradient_mixing, plan_lifts, verify_lifts)

__all__ = ["Analysis", "Entry", "PassResult", "PIPELINE", "run_pipeline"]
