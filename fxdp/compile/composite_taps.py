"""Composite ops (``F.multi_head_attention_forward``) inside a compiled region.

Dynamo keeps such an op as one graph node, while fxdp covers it by running its
decomposition (:mod:`fxdp.rules.attention`), whose inner calls are the call
sites. The node is rewritten into :func:`run_composite`, which replays the
same decomposition while aot_autograd traces the graph, under
:class:`CompositeTaps`: the n-th inner call that touches a trainable
parameter runs with the parameter detached and its output captured as call
site n, reading the parameters and saved tensors at the argument positions
recorded when the region was bound. The decomposition is deterministic in the
argument structure, so replay and binding see the same calls in the same
order (checked: a replay that makes another number of calls is an error).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxdp.core.errors import PrivacyError
from fxdp.rules import OpCall, decomposition, rules_for
from fxdp.rules.base import Rule
from fxdp.compile import graph_ops as C


@dataclass(frozen=True)
class InnerSite:
    """Where one inner call site reads its tensors: positions in its flattened (args, kwargs)."""

    uid: int
    param_positions: Tuple[int, ...]
    saved_positions: Tuple[int, ...]


PLANS: Dict[int, tuple] = {}  # plan id -> (composite function, its inner sites)
_plan_ids = itertools.count(1)


def is_composite(func) -> bool:
    """A function some rule decomposes instead of binding (multi-head attention)."""
    return any(type(r).decompose is not Rule.decompose for r in rules_for(func))


def positions_of(call, tensors) -> Tuple[int, ...]:
    leaves, _ = tree_flatten((call.args, call.kwargs))
    out = []
    for t in tensors:
        pos = next((i for i, x in enumerate(leaves) if x is t), None)
        if pos is None:
            raise PrivacyError(f"fxdp backend: a tensor the {call.name} rule reads inside a composite op is not "
                               "one of its arguments; fxdp cannot tap it inside a compiled graph.")
        out.append(pos)
    return tuple(out)


def register_plan(func, sites) -> int:
    """An int for the graph to name (a function object has no source spelling in generated code)."""
    plan_id = next(_plan_ids)
    PLANS[plan_id] = (func, tuple(sites))
    return plan_id


def release_plans(plan_ids) -> None:
    """Forget the plans of a compiled graph that no longer exists."""
    for plan_id in plan_ids:
        PLANS.pop(plan_id, None)


class CompositeTaps(TorchFunctionMode):
    """Replays a decomposition, tapping each inner call that uses one of ``params``."""

    def __init__(self, params: Dict[int, str], sites, token):
        super().__init__()
        self.params, self.sites, self.token, self.count = params, sites, token, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        used = {id(t): self.params[id(t)] for t in leaves if isinstance(t, torch.Tensor) and id(t) in self.params}
        if not used or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        inner = decomposition(OpCall(func, tuple(args), dict(kwargs), used))
        if inner is not None:
            with self:
                return inner()
        if self.count >= len(self.sites):
            raise PrivacyError("fxdp backend: a composite op made more parameter uses than when it was bound.")
        site = self.sites[self.count]
        self.count += 1
        params = [leaves[i] for i in site.param_positions]
        detached = list(leaves)
        for i in site.param_positions:
            detached[i] = leaves[i].detach()
        a, k = tree_unflatten(detached, spec)
        out = func(*a, **k)
        saved = [detached[i] for i in site.saved_positions]
        return C.capture(out, self.token, site.uid, C.OUTPUT_SLOT, len(params), *params, *saved)


def run_composite(token, plan_id: int, param_positions: Tuple[int, ...], *args, **kwargs):
    """Graph target replacing a composite node (see module docstring)."""
    func, sites = PLANS[plan_id]
    leaves, _ = tree_flatten((args, kwargs))
    params = {id(leaves[i]): str(i) for i in param_positions}
    mode = CompositeTaps(params, sites, token)
    with mode:
        out = func(*args, **kwargs)
    if torch.is_grad_enabled() and mode.count != len(sites):
        raise PrivacyError(f"fxdp backend: a composite op made {mode.count} parameter uses, {len(sites)} when bound.")
    return out
