"""Raw parameters used elementwise or broadcast over the batch.

Covers ``x + p``, ``x * p``, ``p - x``, ``x / p`` (and the torch.* / Tensor.*
spellings), ``torch.where(cond, p, x)``, ``torch.addcmul``, and
``p.expand(...)`` / ``p.expand_as(...)`` / ``torch.broadcast_to(p, ...)``:
ViT cls_token and position embeddings, layer-scale gamma, a hand-written
RMSNorm's weight. Also copies of ``p`` tiled to the batch --
``p.repeat(B, 1, 1)``, ``torch.tile``, ``p.repeat_interleave(B, 0)`` -- with ``p``
usually a virtual parameter (DeBERTa-v2's relative position projection
``(H, S, dh)`` repeated to ``(B*H, S, dh)`` next to the queries).

Inside the call the parameter is broadcast to the full shape *before* the op,
and the engine captures the gradient G of that broadcast tensor -- which still
has the batch dimension. Per-sample gradient: G for sample b summed over every
dimension the parameter was broadcast along (dense, B x |p|). A broadcast
whose result has no batch dimension cannot give per-sample gradients at this
call and is refused by the analysis.

Tiles: every element of the tiled result is one element of ``p``; running the
same call on ``arange(p.numel())`` gives that element's index, so sample b's
gradient is G over sample b's elements (the result's batch layout, found by the
analysis from the values and checked on gradients by the gradient-mixing pass)
scatter-added onto ``p`` -- exact for any repeats and any layout, dense
(B x |p|).
"""
from __future__ import annotations

import operator

import torch

from fxdp.core.errors import UncoveredParameterError
from fxdp.core.layout import LayoutKind
from fxdp.rules.base import Binding, OpCall, Rule
from fxdp.rules.factors import DenseGrad, compute_dtype

T = torch.Tensor
ELEMENTWISE = (
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.where, torch.addcmul, torch.maximum, torch.minimum,
    T.add, T.sub, T.subtract, T.mul, T.multiply, T.div, T.divide, T.true_divide,
    T.__add__, T.__radd__, T.__sub__, T.__rsub__, T.__mul__, T.__rmul__, T.__truediv__, T.__rtruediv__,
    T.where, T.addcmul, operator.add, operator.mul,
)
EXPANDS = (T.expand, T.expand_as, torch.broadcast_to, T.broadcast_to)
TILES = (T.repeat, T.tile, torch.tile, T.repeat_interleave, torch.repeat_interleave)


def _tensors(call):
    out = [a for a in call.args if isinstance(a, torch.Tensor)]
    out += [v for v in call.kwargs.values() if isinstance(v, torch.Tensor)]
    return out


def per_sample_broadcast_grad(G: torch.Tensor, shape: torch.Size, layout, batch_size: int, name: str):
    """Gradient G of ``p`` broadcast to G.shape -> per-sample gradients (B, *p.shape)."""
    N = G.dim()
    aligned = (1,) * (N - len(shape)) + tuple(shape)
    if layout.kind is LayoutKind.WHOLE:
        dims = [j for j in range(N) if aligned[j] == 1 and G.shape[j] != 1]
        return (G.sum(dims, keepdim=True) if dims else G).reshape(1, *shape)
    k = layout.dim
    if aligned[k] != 1:
        raise UncoveredParameterError(
            f"fxdp: parameter {name!r} of shape {tuple(shape)} spans the batch dimension {k} of the "
            f"broadcast result {tuple(G.shape)}; its per-sample gradient is not defined.")
    dims = [j for j in range(N) if j != k and aligned[j] == 1 and G.shape[j] != 1]
    if dims:
        G = G.sum(dims, keepdim=True)
    Gb = layout.to_batch_first(G, batch_size)
    if layout.kind is not LayoutKind.BATCH:
        Gb = Gb.sum(1)
    return Gb.reshape(batch_size, *shape)


def _tiled_index(binding, device) -> torch.Tensor:
    """The tiling call run on ``arange(p.numel())``: for each element of the result, the element of ``p``."""
    p, o = binding.params["param"], binding.options
    idx = torch.arange(p.numel(), device=device).view(p.shape)
    args = tuple(idx if a is _SELF else a for a in o["args"])
    kwargs = {k: (idx if v is _SELF else v) for k, v in o["kwargs"].items()}
    return o["func"](*args, **kwargs)


def per_sample_tile_grad(G: torch.Tensor, index: torch.Tensor, numel: int, layout, batch_size: int, name: str):
    """Gradient G of a tiling of ``p`` (``index``: see :func:`_tiled_index`) -> per-sample gradients (B, |p|)."""
    if layout is None or layout.kind is LayoutKind.NONE:
        raise UncoveredParameterError(
            f"fxdp: {name!r} is tiled into a tensor of shape {tuple(G.shape)} without a batch dimension; its "
            "per-sample gradient is not defined at this call.")
    if tuple(index.shape) != tuple(G.shape):
        raise UncoveredParameterError(
            f"fxdp: internal error: the tiling of {name!r} has shape {tuple(index.shape)}, its gradient "
            f"{tuple(G.shape)}.")
    Gb = layout.to_batch_first(G, batch_size).reshape(batch_size, -1)
    ib = layout.to_batch_first(index, batch_size).reshape(batch_size, -1)
    return torch.zeros(batch_size, numel, dtype=G.dtype, device=G.device).scatter_add_(1, ib, Gb)


class _Self:
    """The tiled parameter's place among the arguments of a tiling call."""


_SELF = _Self()


class BroadcastRule(Rule):
    name = "broadcast"
    funcs = ELEMENTWISE + EXPANDS + TILES

    def bind(self, call: OpCall):
        tensors = _tensors(call)
        named = [(call.param_name(t), t) for t in tensors if call.param_name(t)]
        if not named:
            return None
        if call.func in TILES:
            return self._bind_tile(call, named)
        if call.func in EXPANDS:
            name, p = named[0]
            if call.args and call.args[0] is not p:
                return None
            return Binding(self, {"param": name}, {"param": p}, layout_source=None,
                           grad_of_output={"param": True}, options={"op": "expand"})
        if len({id(t) for _, t in named}) > 1:
            raise UncoveredParameterError(
                f"fxdp: {call.name} combines several trainable parameters ({', '.join(n for n, _ in named)}) "
                "elementwise; fxdp covers one parameter per elementwise op.")
        name, p = named[0]
        shapes = [t.shape for t in tensors]
        try:
            bshape = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            return None
        return Binding(self, {"param": name}, {"param": p}, layout_source=None,
                       broadcast={"param": torch.Size(bshape)}, options={"op": "elementwise"})

    def _bind_tile(self, call: OpCall, named):
        """``p.repeat(...)`` and kin with ``p`` the tensor tiled (``torch.*`` spellings: ``input=``)."""
        name, p = named[0]
        if call.arg(0, "input") is not p or len({id(t) for _, t in named}) > 1 or not p.is_floating_point():
            return None
        args = tuple(_SELF if a is p else a for a in call.args)
        kwargs = {k: (_SELF if v is p else v) for k, v in call.kwargs.items()}
        if any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in tuple(args) + tuple(kwargs.values())):
            return None
        return Binding(self, {"param": name}, {"param": p}, layout_source=None, grad_of_output={"param": True},
                       options={"op": "tile", "func": call.func, "args": args, "kwargs": kwargs})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        G = grad_output if binding.grad_of_output.get("param") else extra_grads["param"]
        G = G.to(compute_dtype(G))  # per-sample sums over positions in float32 for half-precision models
        p = binding.params["param"]
        if binding.options.get("op") == "tile":
            index = _tiled_index(binding, G.device)
            g = per_sample_tile_grad(G, index, p.numel(), layout, batch_size, binding.roles["param"])
            return {"param": DenseGrad(g.reshape(batch_size, *p.shape))}
        return {"param": DenseGrad(per_sample_broadcast_grad(G, p.shape, layout, batch_size, binding.roles["param"]))}

    def shape_summary(self, binding):
        return {"n": int(binding.params["param"].numel())}
