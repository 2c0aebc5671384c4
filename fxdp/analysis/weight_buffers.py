"""Buffers a training forward updates from the weights alone: spectral normalisation's power iteration.

``torch.nn.utils.parametrizations.spectral_norm`` (buffers ``..parametrizations.<name>.<k>._u`` / ``._v``)
and the older hook-based ``torch.nn.utils.spectral_norm`` (buffers ``<name>_u`` / ``<name>_v``) refine, in
training mode, the singular-vector estimates u, v with a power iteration on the weight matrix: torch's code
reads only the weight and u, v themselves, under ``torch.no_grad``, never an activation. Their new values
are a function of the weights (released anyway: the weights are the trained, noised output), so they carry
nothing of the batch and need no clipping or noise -- *if* they are the power iteration's values: a forward
may write anything into those buffers (``u.copy_(x.mean(0))``), so the name alone proves nothing.

:class:`PowerIterations` snapshots, at the start of a forward, u, v and the weight of every such layer; after
it, :meth:`PowerIterations.unexplained` re-runs torch's own code (``_SpectralNorm._power_method``,
``SpectralNorm.compute_weight(..., do_power_iteration=True)``) on copies of the snapshot and names every
buffer whose new value is not, bit for bit, what 0 to :data:`MAX_CALLS` runs of the layer's power iteration
give. The forward's buffer check (:class:`fxdp.engine.forward_checks.BufferWatch`) refuses those exactly like
any other buffer update. (The number of runs, 0 to 4 -- how often the forward used the layer -- is what the
released u, v can tell beyond the weights.) Cost per forward and layer: a copy of the weight, u and v, and
one power-iteration step on them.

Only torch's own classes are recognised, where the power iteration provably reads the weight only:

- a ``_SpectralNorm`` that is the *first* parametrization of its tensor, so its input is the stored
  original itself (a user parametrization before it could compute anything);
- a ``SpectralNorm`` forward pre-hook, whose weight is the module's ``<name>_orig``.

Anything else updating a buffer in a private forward is still refused (a subclass, a copy of the code, an
EMA of activations). fxdp's analysis runs restore every buffer afterwards (:func:`fxdp.analysis.capture.
quiet_state`), so u and v advance once per training forward, as without fxdp.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, List

import torch
import torch.nn as nn

MAX_CALLS = 4  # power-iteration runs per forward accepted (a spectral-norm layer used up to 4 times)


class _Layer:
    """One spectral-norm layer's buffers u, v at the start of a forward, the weight its iteration reads, and
    ``step(state)``: torch's power iteration, run in place on ``state`` (copies)."""

    def __init__(self, owner: nn.Module, names, keys, weight: torch.Tensor, make_state: Callable, step: Callable):
        self.owner, self.names, self.keys = owner, names, keys
        with torch.no_grad():
            self.state = make_state(weight.detach().clone(), *(owner._buffers[k].clone() for k in keys))
        self.step = step

    def explained(self, read: Callable) -> bool:
        now = [self.owner._buffers.get(k) for k in self.keys]
        if any(not isinstance(t, torch.Tensor) for t in now):
            return False
        state = self.state
        with torch.no_grad():
            for calls in range(MAX_CALLS + 1):
                if calls:
                    self.step(state)
                got = read(state)
                if all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, now)):
                    return True
        return False


def _parametrization_layers(model: nn.Module) -> List:
    try:
        from torch.nn.utils.parametrizations import _SpectralNorm
        from torch.nn.utils.parametrize import ParametrizationList
    except ImportError:  # pragma: no cover - torch without parametrizations
        return []
    out = []
    for path, m in model.named_modules():
        if not (isinstance(m, ParametrizationList) and len(m) and type(m[0]) is _SpectralNorm):
            continue
        sn, original = m[0], getattr(m, "original", None)
        if not ("_u" in sn._buffers and "_v" in sn._buffers and isinstance(original, torch.Tensor)):
            continue

        def make(w, u, v, sn=sn):
            state = SimpleNamespace(_u=u, _v=v, eps=sn.eps, dim=sn.dim)
            state.mat = _SpectralNorm._reshape_weight_to_matrix(state, w)
            return state

        def step(state, sn=sn):
            _SpectralNorm._power_method(state, state.mat, sn.n_power_iterations)

        out.append((_Layer(sn, (f"{path}.0._u", f"{path}.0._v"), ("_u", "_v"), original, make, step),
                    lambda state: (state._u, state._v)))
    return out


def _hook_layers(model: nn.Module) -> List:
    from torch.nn.utils.spectral_norm import SpectralNorm

    out = []
    for path, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            name = getattr(hook, "name", None)
            if type(hook) is not SpectralNorm or not isinstance(getattr(m, name + "_orig", None), nn.Parameter) \
                    or not (name + "_u" in m._buffers and name + "_v" in m._buffers):
                continue
            prefix = f"{path}." if path else ""

            def make(w, u, v, name=name):
                return SimpleNamespace(**{name + "_orig": w, name + "_u": u, name + "_v": v})

            def step(state, hook=hook):
                hook.compute_weight(state, do_power_iteration=True)

            def read(state, name=name):
                return getattr(state, name + "_u"), getattr(state, name + "_v")

            keys = (name + "_u", name + "_v")
            out.append((_Layer(m, tuple(prefix + k for k in keys), keys, getattr(m, name + "_orig"), make, step),
                        read))
    return out


class PowerIterations:
    """The spectral-norm layers of a model at the start of a forward (see module docstring)."""

    def __init__(self, model: nn.Module):
        self.layers = _parametrization_layers(model) + _hook_layers(model)
        self.names = frozenset(n for layer, _ in self.layers for n in layer.names)

    def unexplained(self) -> List[str]:
        """Names of the u, v buffers whose values now are not torch's power iteration from the snapshot."""
        return sorted(n for layer, read in self.layers if not layer.explained(read) for n in layer.names)
