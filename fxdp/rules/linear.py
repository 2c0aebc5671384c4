"""Linear layers: nn.Linear (and subclasses), F.linear, torch.addmm with a
parameter as the weight (HuggingFace Conv1D), and ``x @ W`` with a 2-D parameter.

Per-sample weight gradient of sample b with activations a_b (T x d) and output
gradients g_b (T x p): ``g_b^T a_b`` (F.linear, weight p x d) or ``a_b^T g_b``
(addmm / matmul, weight d x p) -- a :class:`LowRankGrad`, whose norm is a ghost
norm or an instantiation by cost, and whose clipped sum is one matmul over the
whole batch. Bias: ``sum_t g_b[t]`` (dense, B x p; summed in float32 for half-precision models,
as all norms are: :mod:`fxdp.rules.factors`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxdp.core.errors import UncoveredParameterError
from fxdp.core.layout import batch_first_2d
from fxdp.rules.base import Binding, OpCall, Rule, trainable_roles
from fxdp.rules.factors import DenseGrad, LowRankGrad, compute_dtype


def _lowrank(left, right, shape):
    return LowRankGrad(left.unsqueeze(1), right.unsqueeze(1), torch.Size(shape))


def _bias(g):
    """Per-sample bias gradient ``sum_t g[b, t]``, summed in float32 also for half-precision outputs."""
    return g.sum(1, dtype=compute_dtype(g))


class LinearRule(Rule):
    """``F.linear(input, weight, bias)``."""

    name = "linear"
    funcs = (F.linear,)

    def bind(self, call: OpCall):
        x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
        if call.param_name(x):
            raise UncoveredParameterError(
                f"fxdp: parameter {call.param_name(x)!r} is used as the *input* of F.linear; "
                "no per-sample rule covers that.")
        roles, params = trainable_roles(call, (("weight", w), ("bias", b)))
        if not roles:
            return None
        saved = {"x": x} if "weight" in roles else {}
        return Binding(self, roles, params, saved=saved, layout_source=x,
                       options={"in": w.shape[-1], "out": w.shape[0]})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        out = {}
        g = batch_first_2d(grad_output, layout, batch_size)
        if "weight" in binding.roles:
            a = batch_first_2d(saved["x"], layout, batch_size)
            out["weight"] = _lowrank(g, a, binding.params["weight"].shape)
        if "bias" in binding.roles:
            out["bias"] = DenseGrad(_bias(g))
        return out

    def shape_summary(self, binding):
        return {"m": binding.options["out"], "n": binding.options["in"]}


class AddmmRule(Rule):
    """``torch.addmm(bias, x, W)`` with W of shape (in, out): HuggingFace Conv1D."""

    name = "addmm"
    funcs = (torch.addmm,)

    def bind(self, call: OpCall):
        bias, x, w = call.arg(0, "input"), call.arg(1, "mat1"), call.arg(2, "mat2")
        beta, alpha = call.kwargs.get("beta", 1), call.kwargs.get("alpha", 1)
        if call.param_name(x):
            raise UncoveredParameterError(
                f"fxdp: parameter {call.param_name(x)!r} is the left operand of torch.addmm; no rule covers that.")
        roles, params = {}, {}
        if call.param_name(w):
            roles["weight"], params["weight"] = call.param_name(w), w
        if call.param_name(bias):
            if bias.dim() != 1:
                raise UncoveredParameterError(
                    f"fxdp: parameter {call.param_name(bias)!r} is added by torch.addmm with shape "
                    f"{tuple(bias.shape)}; only a 1-D bias is covered.")
            roles["bias"], params["bias"] = call.param_name(bias), bias
        if not roles:
            return None
        return Binding(self, roles, params, saved={"x": x} if "weight" in roles else {}, layout_source=x,
                       options={"alpha": alpha, "beta": beta, "in": w.shape[0], "out": w.shape[1]})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        out = {}
        g = batch_first_2d(grad_output, layout, batch_size)
        if "weight" in binding.roles:
            a = batch_first_2d(saved["x"], layout, batch_size)
            alpha = binding.options["alpha"]
            out["weight"] = _lowrank(a * alpha if alpha != 1 else a, g, binding.params["weight"].shape)
        if "bias" in binding.roles:
            beta = binding.options["beta"]
            out["bias"] = DenseGrad(_bias(g) * beta if beta != 1 else _bias(g))
        return out

    def shape_summary(self, binding):
        return {"m": binding.options["in"], "n": binding.options["out"]}


class MatmulRule(Rule):
    """``x @ W`` / ``torch.matmul(x, W)`` / ``torch.mm(x, W)`` with a 2-D parameter W (in, out)."""

    name = "matmul"
    funcs = (torch.matmul, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm)

    def bind(self, call: OpCall):
        x, w = call.arg(0, "input"), call.arg(1, "other")
        if w is None:
            w = call.kwargs.get("mat2")
        if call.param_name(x) or not call.param_name(w):
            return None
        if w.dim() != 2 or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        return Binding(self, {"weight": call.param_name(w)}, {"weight": w}, saved={"x": x}, layout_source=x,
                       options={"in": w.shape[0], "out": w.shape[1]})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        g = batch_first_2d(grad_output, layout, batch_size)
        a = batch_first_2d(saved["x"], layout, batch_size)
        return {"weight": _lowrank(a, g, binding.params["weight"].shape)}

    def shape_summary(self, binding):
        return {"m": binding.options["in"], "n": binding.options["out"]}
