"""The analysis runs the user's forward again: say so, and let hooks tell.

Analysing a new input structure runs the model's forward several more times on a
few samples of the example batch (order, replacement, one sample fewer,
gradient reach, lifting check). fxdp does not suppress user forward hooks in
those runs -- a pre-hook may compute what the forward needs (the old
``weight_norm``, device placement) -- so a hook with side effects (a counter,
logging, a cache) sees every run. :func:`in_analysis` is True during those runs,
so a hook can skip its side effects; the final pass :func:`report_side_effects`
warns, once per analysis, naming the modules whose hooks were re-run and how often.
"""
from __future__ import annotations

import contextlib
import warnings

import torch.nn.modules.module as _module_mod
from torch.nn.utils.spectral_norm import SpectralNorm

from fxdp.analysis.runner import PassResult
from fxdp.analysis.state import Analysis

_DEPTH = [0]


def in_analysis() -> bool:
    """True while fxdp's analysis runs the model's forward (not a training forward): a user hook can
    ``return`` early there to avoid repeating side effects."""
    return _DEPTH[0] > 0


@contextlib.contextmanager
def analysis_forward(analysis: Analysis):
    """Marks one analysis run of the user's forward (counted on ``analysis.forward_runs``)."""
    _DEPTH[0] += 1
    analysis.forward_runs += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def _is_users(fn) -> bool:
    if type(fn) is SpectralNorm:  # its one side effect, the power iteration on u, v, is restored after each run
        return False
    return not (getattr(fn, "__module__", "") or "").startswith("fxdp.")


def user_hook_owners(model):
    """Names of the modules with user forward (pre-)hooks, "<global>" for global module hooks."""
    owners = []
    if any(_is_users(f) for f in list(_module_mod._global_forward_pre_hooks.values())
           + list(_module_mod._global_forward_hooks.values())):
        owners.append("<global>")
    for name, m in model.named_modules():
        hooks = list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values())
        if any(_is_users(f) for f in hooks):
            owners.append(name or "<root>")
    return owners


def report_side_effects(analysis: Analysis) -> PassResult:
    owners = user_hook_owners(analysis.model)
    if owners and analysis.forward_runs:
        shown = ", ".join(owners[:5]) + (f" (+{len(owners) - 5} more)" if len(owners) > 5 else "")
        warnings.warn(
            f"fxdp: analysing this input structure ran the model's forward {analysis.forward_runs} more times "
            f"(on at most 3 samples of the batch); the forward hooks of {shown} ran each time. "
            "If a hook has side effects, skip them when fxdp.in_analysis() is True.", RuntimeWarning, stacklevel=2)
        analysis.log.append(f"report_side_effects: user hooks of {shown} re-run {analysis.forward_runs} times")
    return PassResult(analysis, False)
