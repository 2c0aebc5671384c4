"""Pass ``check_virtuals``: a virtual parameter must really be the same for every sample.

The capture made the result of each batch-free call a virtual parameter (``entry.virtual``, see
:mod:`fxdp.analysis.taint` and :mod:`fxdp.rules.virtual`). Its per-sample gradients are then the
vector-Jacobian product of a function of the parameters alone, which is only right if the value does
not depend on the samples. The roll and replace runs check it: the value must be the same when the
samples are reordered or one is replaced (a batch-sized dimension taken from a shape is allowed: the
value is compared on the runs with the same number of samples). Otherwise the use is refused.
"""
from __future__ import annotations

from fxdp.core.errors import UncoveredParameterError
from fxdp.core.layout import BatchLayout, LayoutKind
from fxdp.analysis.batch_layout import close
from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis


def check_virtuals(analysis: Analysis) -> PassResult:
    runs = analysis.runs
    modified = False
    for entry in analysis.entries:
        if not entry.virtual:
            continue
        i = entry.ordinal
        base = runs["base"].records[i].source
        same = all(name in runs and i < len(runs[name].records) and runs[name].records[i].virtual
                   and close(base, runs[name].records[i].source) for name in ("roll", "replace"))
        if not same:
            entry.reason = "batch-free result depends on the samples"
            analysis.problem(UncoveredParameterError(
                f"fxdp: {entry.op} uses {', '.join(entry.param_names)} on inputs that fxdp does not see depend on "
                "the samples, yet its result changes with them (a value passed through Python, e.g. .tolist() "
                "or .item()?). Per-sample gradients cannot be formed there; compute it with torch ops on the "
                "batch, or freeze the parameter."))
            continue
        entry.layout = BatchLayout(LayoutKind.NONE, 0)
        modified = True
    return PassResult(analysis, modified)
