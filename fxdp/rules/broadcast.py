"""Raw parameters used elementwise or broadcast over the batch.

Covers ``x + p``, ``x * p``, ``p - x``, ``x / p`` (and the torch.* / Tensor.*
spellings), ``torch.where(cond, p, x)``, ``torch.addcmul``, and
``p.expand(...)`` / ``p.expand_as(...)`` / ``torch.broadcast_to(p, ...)``:
ViT cls_token and position embeddings, layer-scale gamma, a hand-written
RMSNorm's weight.

Inside the call the parameter is broadcast to the full shape *before* the op,
and the engine captures the gradient G of that broadcast tensor -- which still
has the batch dimension. Per-sample gradient: G for sample b summed over every
dimension the parameter was broadcast along (dense, B x |p|). A broadcast
whose result has no batch dimension cannot give per-sample gradients at this
call and is refused by the analysis.
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


class BroadcastRule(Rule):
    name = "broadcast"
    funcs = ELEMENTWISE + EXPANDS

    def bind(self, call: OpCall):
        tensors = _tensors(call)
        named = [(call.param_name(t), t) for t in tensors if call.param_name(t)]
        if not named:
            return None
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

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        G = grad_output if binding.grad_of_output.get("param") else extra_grads["param"]
        G = G.to(compute_dtype(G))  # per-sample sums over positions in float32 for half-precision models
        p = binding.params["param"]
        return {"param": DenseGrad(per_sample_broadcast_grad(G, p.shape, layout, batch_size, binding.roles["param"]))}

    def shape_summary(self, binding):
        return {"n": int(binding.params["param"].numel())}
