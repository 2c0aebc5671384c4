"""In-place ops that take a trainable parameter: ``h += self.b``, ``h.mul_(self.gamma)``, ``h.addmm_(x, W)``.

Decomposed into the out-of-place op, which the family rules (broadcast, linear, ...) bind
and tap as usual, applied to a copy of ``h`` (the op may save its input
for backward) and followed by ``h.copy_(result)``: ``h`` holds the same values as after the
in-place op, and autograd routes its gradient through the tapped op, so the parameter's
per-sample gradient is formed like for ``h = h + self.b``. An in-place op that *modifies* a
trainable parameter inside the forward pass is refused (torch would refuse it too, with a
less helpful message).
"""
from __future__ import annotations

import torch

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.base import OpCall, NoFactorsRule

T = torch.Tensor
DUNDER = {"__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div", "__idiv__": "div"}
METHODS = ("add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "addmm_", "addmv_", "baddbmm_", "addbmm_",
           "lerp_", "clamp_", "maximum_", "minimum_", "masked_fill_", "index_add_", "pow_", "where_")


def _pairs():
    out = {}
    for name, plain in DUNDER.items():
        if hasattr(T, name):
            out[getattr(T, name)] = getattr(T, plain)
    for name in METHODS:
        plain = name[:-1]
        if hasattr(T, name) and hasattr(T, plain):
            out[getattr(T, name)] = getattr(T, plain)
    return out


OUT_OF_PLACE = _pairs()


class InplaceRule(NoFactorsRule):
    """Decomposes in-place ops with a trainable argument (see module docstring); never binds a call itself."""

    name = "in-place"
    funcs = tuple(OUT_OF_PLACE)

    def bind(self, call: OpCall):
        return None


    def decompose(self, call: OpCall):
        target = call.args[0] if call.args else call.kwargs.get("self")
        name = call.param_name(target)
        if name:
            raise UncoveredParameterError(
                f"fxdp: {call.name} modifies the trainable parameter {name!r} in place during the forward pass; "
                "its gradient would not be the gradient of the parameter. Update parameters outside the forward "
                "pass (under torch.no_grad()), or write the op out of place.")
        plain = OUT_OF_PLACE[call.func]
        args, kwargs = call.args, call.kwargs

        def run():
            # the op may save its input for backward: compute from a copy, since target is overwritten
            src = target.clone()
            a = tuple(src if x is target else x for x in args)
            kw = {k: (src if v is target else v) for k, v in kwargs.items()}
            out = plain(*a, **kw)
            target.copy_(out)
            return target
        return run
