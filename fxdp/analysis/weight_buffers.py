"""Buffers a training forward updates from the weights alone: spectral normalisation's power iteration.

``torch.nn.utils.parametrizations.spectral_norm`` (buffers ``..parametrizations.<name>.<k>._u`` / ``._v``)
and the older hook-based ``torch.nn.utils.spectral_norm`` (buffers ``<name>_u`` / ``<name>_v``) refine, in
training mode, the singular-vector estimates u, v with a power iteration on the weight matrix: torch's code
reads only the weight and u, v themselves, under ``torch.no_grad``, never an activation. Their new values
are a function of the weights (released anyway: the weights are the trained, noised output), so they carry
nothing of the batch and need no clipping or noise. :func:`weight_only_buffers` names them, and the
forward's buffer check (:class:`fxdp.engine.forward_checks.BufferWatch`) lets them change.

Only torch's own classes are recognised, where the power iteration provably reads the weight only:

- a ``_SpectralNorm`` that is the *first* parametrization of its tensor, so its input is the stored
  original itself (a user parametrization before it could compute anything);
- a ``SpectralNorm`` forward pre-hook, whose weight is the module's ``<name>_orig``.

Anything else updating a buffer in a private forward is still refused (a subclass, a copy of the code, an
EMA of activations). fxdp's analysis runs restore every buffer afterwards (:func:`fxdp.analysis.capture.
quiet_state`), so u and v advance once per training forward, as without fxdp.
"""
from __future__ import annotations

from typing import FrozenSet

import torch.nn as nn


def _parametrization_buffers(model: nn.Module):
    try:
        from torch.nn.utils.parametrizations import _SpectralNorm
        from torch.nn.utils.parametrize import ParametrizationList
    except ImportError:  # pragma: no cover - torch without parametrizations
        return
    for path, m in model.named_modules():
        if isinstance(m, ParametrizationList) and len(m) and type(m[0]) is _SpectralNorm:
            for b in ("_u", "_v"):
                if b in m[0]._buffers:
                    yield f"{path}.0.{b}"


def _hook_buffers(model: nn.Module):
    from torch.nn.utils.spectral_norm import SpectralNorm

    for path, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if type(hook) is SpectralNorm and isinstance(getattr(m, hook.name + "_orig", None), nn.Parameter):
                prefix = f"{path}." if path else ""
                yield from (f"{prefix}{hook.name}{s}" for s in ("_u", "_v") if hook.name + s in m._buffers)


def weight_only_buffers(model: nn.Module) -> FrozenSet[str]:
    """Names (as in ``model.named_buffers()``) of the buffers torch's spectral normalisation updates from the
    weights alone (see module docstring)."""
    return frozenset(_parametrization_buffers(model)) | frozenset(_hook_buffers(model))
