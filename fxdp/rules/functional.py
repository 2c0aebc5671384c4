"""Fallback: exact per-sample gradients with torch.func for ops no family rule covers.

A trainable parameter used by an op without a dedicated rule (``torch.einsum``,
``torch.bmm``/``baddbmm``, ``F.bilinear``, ``F.conv_transpose2d``, ``F.prelu``,
``F.embedding_bag``, a custom op, ...) is handled by re-running the op *per
sample*: each sample's slice of every batched input (as a batch of one), the
same parameters, and that sample's slice of the output gradient go through
``torch.func.vjp`` under ``vmap``, giving the per-sample gradients themselves
(dense, B x |p|) -- exact, at the memory cost of instantiation.

Valid because the analysis has checked that the op's output rows of a sample
depend on that sample only (value and gradient mixing passes) and where the
samples sit in every tensor input (``input_layouts``); inputs without a batch
dimension are shared by all samples.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxdp.core.errors import BatchLayoutError
from fxdp.core.layout import LayoutKind
from fxdp.rules.base import Binding, OpCall, Rule
from fxdp.rules.factors import DenseGrad


def _per_sample_view(t, layout, B):
    """(B, ...) with each slice shaped like the op's input for a batch of one."""
    if layout is None or layout.kind is LayoutKind.NONE:
        return None
    tb = layout.to_batch_first(t, B)
    if layout.kind is LayoutKind.BATCH:
        return tb.unsqueeze(layout.dim + 1)
    return tb  # rows layouts keep the sample's m rows in place; WHOLE is the sample itself


class PerSampleFallbackRule(Rule):
    """Binds any call with trainable parameters that no other rule binds (see module docstring)."""

    name = "per-sample (torch.func)"
    funcs = ()

    def bind(self, call: OpCall):
        leaves, spec = tree_flatten((call.args, call.kwargs))
        roles, params, saved = {}, {}, {}
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor):
                continue
            name = call.param_name(t)
            if name:
                if name not in roles.values():
                    role = f"p{len(roles)}"
                    roles[role], params[role] = name, t
            else:
                saved[f"in{i}"] = t
        if not roles:
            return None
        return Binding(self, roles, params, saved=saved, layout_source=None,
                       options={"func": call.func, "spec": spec, "n_leaves": len(leaves),
                                "consts": {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)},
                                "param_slots": {i: next(r for r, p in params.items() if p is x)
                                                for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)
                                                and call.param_name(x)},
                                "input_layouts": {}})

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        o = binding.options
        B = batch_size
        in_layouts = o["input_layouts"]
        batched, shared = {}, {}
        for key, t in saved.items():
            view = _per_sample_view(t, in_layouts.get(key), B)
            (batched.__setitem__(key, view) if view is not None else shared.__setitem__(key, t))
        g = _per_sample_view(grad_output, layout, B)
        if g is None:
            raise BatchLayoutError(f"fxdp: the output of {o['func']} has no batch dimension; no per-sample gradient.")
        roles = list(binding.params)
        base = [binding.params[r].detach() for r in roles]

        def run(ps, xs):
            leaves = []
            for i in range(o["n_leaves"]):
                if i in o["consts"]:
                    leaves.append(o["consts"][i])
                elif i in o["param_slots"]:
                    leaves.append(ps[roles.index(o["param_slots"][i])])
                else:
                    key = f"in{i}"
                    leaves.append(xs[key] if key in xs else shared[key])
            args, kwargs = tree_unflatten(leaves, o["spec"])
            return o["func"](*args, **kwargs)

        def one(xs, gb):
            _, pullback = torch.func.vjp(lambda *ps: run(ps, xs), *base)
            return pullback(gb.to(base[0].dtype) if base[0].is_floating_point() else gb)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")  # vmap's fallback notice
            grads = torch.func.vmap(one, in_dims=(0, 0))(batched, g)
        return {r: DenseGrad(gr) for r, gr in zip(roles, grads)}

    def shape_summary(self, binding):
        return {"n": int(sum(p.numel() for p in binding.params.values()))}
