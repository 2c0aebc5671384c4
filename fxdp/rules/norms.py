"""Normalisation layers: LayerNorm, GroupNorm, RMSNorm (module or functional).

Their per-sample gradients are small (B x d), so they are instantiated:
``dW_b = sum g_b * xhat_b`` and ``db_b = sum g_b`` over every dimension that is
not normalised-over-and-affine, where ``xhat`` is recomputed from the saved
input after backward. The batch must be a leading dimension the layer does not
normalise over (checked by the sample-mixing analysis).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxdp.core.errors import SampleMixingError
from fxdp.core.layout import LayoutKind
from fxdp.rules.base import Binding, OpCall, Rule, trainable_roles
from fxdp.rules.factors import DenseGrad, compute_dtype


def _affine_factors(binding, xhat, g, param_ndim_tail):
    """Reduce g*xhat and g over all but the batch dim and the affine dims."""
    out = {}
    if "weight" in binding.roles:
        wg = (g * xhat)
        out["weight"] = DenseGrad(_reduce_to(wg, binding.params["weight"].shape, param_ndim_tail))
    if "bias" in binding.roles:
        out["bias"] = DenseGrad(_reduce_to(g, binding.params["bias"].shape, param_ndim_tail))
    return out


def _reduce_to(t, shape, tail):
    """(B, ..., *shape) with the affine dims last -> (B, *shape)."""
    B = t.shape[0]
    return t.reshape(B, -1, *t.shape[t.dim() - tail:]).sum(1).reshape(B, *shape)


class _TrailingDimsNormRule(Rule):
    """A norm over the trailing ``normalized_shape`` dims with an affine weight (and bias) of that
    shape: LayerNorm and RMSNorm share binding and factors, and differ only in ``xhat``."""

    affine_args = ()   # ((role, position), ...) of the affine parameters
    eps_position = 0

    def bind(self, call: OpCall):
        x, shape = call.arg(0, "input"), call.arg(1, "normalized_shape")
        roles, params = trainable_roles(call, tuple((role, call.arg(i, role)) for role, i in self.affine_args))
        if not roles:
            return None
        shape = tuple([shape] if isinstance(shape, int) else shape)
        return Binding(self, roles, params, saved={"x": x}, layout_source=x,
                       options={"normalized_shape": shape, "eps": call.arg(self.eps_position, "eps", self.default_eps)})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        shape = binding.options["normalized_shape"]
        x = layout.to_batch_first(saved["x"], batch_size)
        g = layout.to_batch_first(grad_output, batch_size)
        dt = compute_dtype(x, g)
        xhat = self.normalize(x.to(dt), shape, binding.options["eps"], saved["x"].dtype)
        return _affine_factors(binding, xhat, g.to(dt), len(shape))

    def shape_summary(self, binding):
        return {"n": int(torch.Size(binding.options["normalized_shape"]).numel())}


class LayerNormRule(_TrailingDimsNormRule):
    name = "layer_norm"
    funcs = (F.layer_norm, torch.layer_norm)  # dynamo graphs may hold the torch.* spelling
    affine_args = (("weight", 2), ("bias", 3))
    eps_position, default_eps = 4, 1e-5

    @staticmethod
    def normalize(x, shape, eps, input_dtype):
        return F.layer_norm(x, shape, eps=eps)


class RMSNormRule(_TrailingDimsNormRule):
    name = "rms_norm"
    funcs = (F.rms_norm, torch.rms_norm)
    affine_args = (("weight", 2),)
    eps_position, default_eps = 3, None

    @staticmethod
    def normalize(x, shape, eps, input_dtype):
        """eps=None means the input dtype's machine epsilon, as torch's rms_norm does."""
        return F.rms_norm(x, shape, eps=torch.finfo(input_dtype).eps if eps is None else eps)


class GroupNormRule(Rule):
    name = "group_norm"
    funcs = (F.group_norm, torch.group_norm)

    def bind(self, call: OpCall):
        x, groups = call.arg(0, "input"), call.arg(1, "num_groups")
        roles, params = trainable_roles(call, (("weight", call.arg(2, "weight")), ("bias", call.arg(3, "bias"))))
        if not roles:
            return None
        return Binding(self, roles, params, saved={"x": x}, layout_source=x,
                       options={"num_groups": groups, "eps": call.arg(4, "eps", 1e-5), "channels": x.shape[1]})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        if layout.kind is not LayoutKind.BATCH or layout.dim != 0:
            raise SampleMixingError(
                f"fxdp: group_norm on {binding.param_names} normalises over dim 0 as the batch, but the samples "
                f"sit at {layout.describe()}: groups would mix samples.")
        x = layout.to_batch_first(saved["x"], batch_size)
        g = layout.to_batch_first(grad_output, batch_size)
        dt = compute_dtype(x, g)
        xhat = F.group_norm(x.to(dt), binding.options["num_groups"], eps=binding.options["eps"])
        g = g.to(dt)
        B, C = x.shape[0], x.shape[1]
        out = {}
        if "weight" in binding.roles:
            out["weight"] = DenseGrad((g * xhat).reshape(B, C, -1).sum(-1))
        if "bias" in binding.roles:
            out["bias"] = DenseGrad(g.reshape(B, C, -1).sum(-1))
        return out

    def shape_summary(self, binding):
        return {"n": binding.options["channels"]}
