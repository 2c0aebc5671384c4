"""Convolutions: nn.Conv1d/2d/3d and F.conv1d/2d/3d (stride, dilation, groups,
numeric or string padding).

The weight gradient of sample b is, per group j, ``g_bj^T U_bj`` where ``U`` is
the unfolded (im2col) input: a :class:`LowRankGrad` with one factor pair per
group, so groups never mix. Bias: ``sum over positions of g_b`` (dense).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxdp.core.errors import SampleMixingError
from fxdp.core.layout import LayoutKind
from fxdp.rules.base import Binding, OpCall, Rule, trainable_roles
from fxdp.rules.factors import DenseGrad, LowRankGrad, compute_dtype


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def same_padding(kernel, dilation):
    """Left/right padding per spatial dim for padding='same' (stride 1)."""
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def unfold(x: torch.Tensor, kernel, stride, dilation, pads) -> torch.Tensor:
    """im2col for any number of spatial dims: (B, C, *S) -> (B, L, C * prod(kernel))."""
    flat = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    if any(flat):
        x = F.pad(x, flat)
    n = len(kernel)
    for i in range(n):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # x: (B, C, *L, *K)
    B, C = x.shape[:2]
    L = x.shape[2:2 + n]
    perm = [0] + list(range(2, 2 + n)) + [1] + list(range(2 + n, 2 + 2 * n))
    return x.permute(perm).reshape(B, math.prod(L), C * math.prod(kernel))


class ConvRule(Rule):
    name = "conv"
    funcs = (F.conv1d, F.conv2d, F.conv3d)

    def bind(self, call: OpCall):
        x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
        roles, params = trainable_roles(call, (("weight", w), ("bias", b)))
        if not roles:
            return None
        nd = w.dim() - 2
        kernel = tuple(w.shape[2:])
        stride = _tuple(call.arg(3, "stride", 1), nd)
        padding = call.arg(4, "padding", 0)
        dilation = _tuple(call.arg(5, "dilation", 1), nd)
        groups = call.arg(6, "groups", 1)
        if isinstance(padding, str):
            pads = [(0, 0)] * nd if padding == "valid" else same_padding(kernel, dilation)
        else:
            pads = [(p, p) for p in _tuple(padding, nd)]
        return Binding(self, roles, params, saved={"x": x} if "weight" in roles else {}, layout_source=x,
                       options=dict(kernel=kernel, stride=stride, dilation=dilation, pads=pads, groups=groups,
                                    out_channels=w.shape[0], in_per_group=w.shape[1], unbatched=x.dim() == nd + 1))

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        o = binding.options
        if o["unbatched"] or layout.kind is not LayoutKind.BATCH or layout.dim != 0:
            raise SampleMixingError(
                f"fxdp: convolution with {binding.param_names} expects the samples on dim 0 of a batched "
                f"input, found {layout.describe()}.")
        B = batch_size
        G = o["groups"]
        g = grad_output.reshape(B, G, o["out_channels"] // G, -1).transpose(-1, -2)   # (B, G, L, Cout/G)
        out = {}
        if "weight" in binding.roles:
            u = unfold(saved["x"], o["kernel"], o["stride"], o["dilation"], o["pads"])  # (B, L, Cin*K)
            K = math.prod(o["kernel"])
            u = u.reshape(B, u.shape[1], G, o["in_per_group"] * K).transpose(1, 2)    # (B, G, L, Cin/G*K)
            out["weight"] = LowRankGrad(g, u, binding.params["weight"].shape)
        if "bias" in binding.roles:
            out["bias"] = DenseGrad(g.sum(2, dtype=compute_dtype(g)).reshape(B, -1))  # float32 for half
        return out

    def shape_summary(self, binding):
        o = binding.options
        return {"m": o["out_channels"] // o["groups"], "n": o["in_per_group"] * math.prod(o["kernel"]),
                "G": o["groups"]}
