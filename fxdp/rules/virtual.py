"""Virtual parameters: a tensor ``u = f(theta)`` computed from parameters before it meets the batch.

Real models transform parameters with batch-free ops before using them on the batch: ``x @ W.t()``,
``scale.view(1, -1)``, ``(1 + w).float()``, ``wpe(arange(T))``, a relative position bias table gathered
with a fixed index, ``logit_scale.exp()``, ``weight_norm``'s ``g * v / ||v||``. The analysis finds such
calls (no input depends on the samples) and the interceptor replaces their result by a fresh leaf ``u``
that it treats as a trainable parameter: the family rule where ``u`` meets the batch (linear, conv,
broadcast, embedding, attention, fallback) gives ``u``'s per-sample gradient factors. This module turns
them into factors of ``theta``: ``grad_theta_b = J_f(theta)^T grad_u_b`` -- the vector-Jacobian product of
the batch-free ``f``, applied per sample.

- Isometries keep the factor's structure (no per-sample instantiation): reshape-like ops and casts relabel
  it with theta's shape (row-major order is unchanged); a 2-D transpose of a low-rank factor swaps its two
  sides; permutes move the dims of a dense factor.
- A gather from a table with a fixed index (``F.embedding`` with a batch-free index, ``table[index]``)
  becomes an embedding factor with that index for every sample: ghost norm, clipped sum by index_add.
- Anything else (``exp``, ``g * v / ||v||``, a parametrization) runs ``torch.func.vjp`` under ``vmap`` over
  the samples: exact per-sample gradients, dense (B x |theta|).

The factors of theta then join those of theta's other uses, so the engine's norm is the norm of the
*sum* over every use, direct and virtual, cross terms included. Chains (``u2 = g(u1)``, ``u1 = f(theta)``)
are resolved last-made first.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxdp.rules.base import OpCall, root_names, root_names_of
from fxdp.rules.factors import DenseGrad, EmbeddingGrad, LowRankGrad, compute_dtype

T = torch.Tensor
RESHAPES = (T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unsqueeze, torch.unsqueeze, T.squeeze,
            torch.squeeze, T.contiguous, T.clone, torch.clone, T.float, T.double, T.half, T.bfloat16, T.to,
            T.type_as, T.view_as, T.reshape_as, T.unflatten, torch.unflatten)
PERMUTES = (T.t, torch.t, T.transpose, torch.transpose, T.permute, torch.permute, T.swapaxes, torch.swapaxes,
            T.movedim, torch.movedim)
PROPERTIES = {"T": T.T.__get__, "mT": T.mT.__get__}


def _is_reshape(func) -> bool:
    return any(func is f for f in RESHAPES)


def _is_permute(func) -> bool:
    return any(func is f for f in PERMUTES) or func == PROPERTIES["T"] or func == PROPERTIES["mT"]


@dataclass(eq=False)
class VirtualParam:
    """``name = f(inputs)``: how a virtual parameter was made in one forward pass (see module docstring).

    ``inputs`` maps the names of f's parameter inputs (parameters or earlier virtual parameters) to their
    values (detached); ``leaves`` is f's flattened arguments with those inputs as their names
    (``_Slot``) and every other argument as is (constants, fixed indices)."""

    name: str
    op: str
    func: Callable
    spec: Any
    leaves: list
    inputs: Dict[str, torch.Tensor]
    output_index: int
    shape: torch.Size
    kind: str = "vjp"  # "reshape", "permute", "gather" or "vjp"
    options: Dict[str, Any] = field(default_factory=dict)

    def run(self, prims: Dict[str, torch.Tensor]) -> torch.Tensor:
        leaves = [prims[x.name] if isinstance(x, _Slot) else x for x in self.leaves]
        args, kwargs = tree_unflatten(leaves, self.spec)
        out = self.func(*args, **kwargs)
        return tree_flatten(out)[0][self.output_index]


@dataclass(frozen=True)
class _Slot:
    name: str


def virtual_name(roots, ordinal: int) -> str:
    """Name of the virtual parameter made at call site ``ordinal`` from parameters ``roots``."""
    return f"{'+'.join(sorted(roots))}~v{ordinal}"


def make_virtuals(call: OpCall, ordinal: int):
    """Run ``call`` on detached parameters; return [(fresh leaf u, VirtualParam)] for each differentiable
    floating-point output, or None when the call gives no differentiable tensor (then it is not virtual)."""
    flat, spec = tree_flatten((call.args, call.kwargs))
    inputs: Dict[str, torch.Tensor] = {}
    leaves, prim_leaves = [], []
    for x in flat:
        name = call.param_name(x)
        if name:
            inputs.setdefault(name, x.detach())
            leaves.append(_Slot(name))
            prim_leaves.append(x.detach().requires_grad_())
        else:
            kept = x.detach() if isinstance(x, torch.Tensor) else x
            leaves.append(kept)
            prim_leaves.append(kept)
    with torch.enable_grad():
        args, kwargs = tree_unflatten(prim_leaves, spec)
        out = call.func(*args, **kwargs)
    outs, out_spec = tree_flatten(out)
    made, results = [], []
    roots = root_names_of(inputs)
    for k, t in enumerate(outs):
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
            u = t.detach().requires_grad_()
            v = VirtualParam(virtual_name(roots, ordinal) + (f".{k}" if len(outs) > 1 else ""), call.name,
                             call.func, spec, leaves, inputs, k, u.shape)
            _classify(v, call)
            made.append((u, v))
            results.append(u)
        else:
            results.append(t.detach() if isinstance(t, torch.Tensor) else t)
    if not made:
        return None, None
    return tree_unflatten(results, out_spec), made


def _classify(v: VirtualParam, call: OpCall):
    tensors = [x for x in v.leaves if isinstance(x, torch.Tensor)]
    if len(v.inputs) != 1:
        return
    (name, src), = v.inputs.items()
    if _is_reshape(call.func) and not tensors and src.numel() == v.shape.numel():
        v.kind = "reshape"
    elif _is_permute(call.func) and not tensors and src.dim() == len(v.shape):
        dims = _permutation(v, src)
        if dims is not None:
            v.kind, v.options["dims"] = "permute", dims
    elif call.func is F.embedding and call.param_name(call.arg(1, "weight")) == name:
        idx = call.arg(0, "input")
        if isinstance(idx, torch.Tensor) and not call.param_name(idx) and call.arg(3, "max_norm") is None \
                and not call.arg(5, "scale_grad_by_freq", False):
            v.kind, v.options["index"], v.options["padding_idx"] = "gather", idx.detach(), call.arg(2, "padding_idx")
    elif call.func is T.__getitem__ and call.param_name(call.args[0]) == name and len(call.args) == 2:
        idx = call.args[1]
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.long and src.dim() == 2:
            v.kind, v.options["index"], v.options["padding_idx"] = "gather", idx.detach(), None


def _permutation(v: VirtualParam, src: torch.Tensor):
    """The dims ``d`` with ``f(x) == x.permute(d)``, found by running f on a tensor of distinct values."""
    probe = torch.arange(src.numel(), dtype=torch.float64).view(src.shape)
    got = v.run({next(iter(v.inputs)): probe})
    for dims in _perms(src.dim()):
        if tuple(probe.permute(dims).shape) == tuple(got.shape) and torch.equal(probe.permute(dims), got):
            return dims
    return None


def _perms(n):
    import itertools
    return itertools.permutations(range(n)) if n <= 6 else ()


def _dense(f, B: int, shape) -> torch.Tensor:
    return f.materialize().reshape(B, *shape)


def _move(f, v: VirtualParam, src: torch.Tensor, B: int):
    """Factor of ``u = f(src)`` -> factor of ``src`` for the isometries and gathers."""
    if v.kind == "reshape":
        if isinstance(f, LowRankGrad):
            return dataclasses.replace(f, shape=src.shape)
        if isinstance(f, EmbeddingGrad) and tuple(f.shape) == tuple(src.shape):
            return f
        return DenseGrad(_dense(f, B, v.shape).reshape(B, *src.shape), decision=getattr(f, "decision", None))
    if v.kind == "permute":
        dims = v.options["dims"]
        if isinstance(f, LowRankGrad) and f.left.shape[1] == 1 and tuple(dims) == (1, 0):
            return LowRankGrad(f.right, f.left, src.shape, f.decision)
        inverse = [0] * len(dims)
        for i, d in enumerate(dims):
            inverse[d] = i
        g = _dense(f, B, v.shape)
        return DenseGrad(g.permute(0, *[d + 1 for d in inverse]).contiguous())
    # gather: u = src[index] (rows of a (V, d) table)
    idx = v.options["index"]
    g = _dense(f, B, v.shape).reshape(B, -1, src.shape[1])
    flat = idx.reshape(1, -1).expand(B, -1)
    pad = v.options.get("padding_idx")
    if pad is not None:
        pad = pad if pad >= 0 else src.shape[0] + pad
        g = g.masked_fill((flat == pad).unsqueeze(-1), 0)
    return EmbeddingGrad(flat, g, src.shape)


def _vjp(v: VirtualParam, factors, B: int) -> Dict[str, DenseGrad]:
    names = list(v.inputs)
    dt = compute_dtype(*[f.materialize() if not isinstance(f, DenseGrad) else f.grad for f in factors[:1]])
    G = sum(_dense(f, B, v.shape).to(dt) for f in factors)
    prims = [v.inputs[n].to(dt) if v.inputs[n].is_floating_point() else v.inputs[n] for n in names]

    def one(g):
        _, pull = torch.func.vjp(lambda *ps: v.run(dict(zip(names, ps))).to(dt), *prims)
        return pull(g)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        grads = torch.func.vmap(one)(G)
    return {n: DenseGrad(g) for n, g in zip(names, grads)}


def resolve_virtuals(per_param: Dict[str, list], virtuals: List[VirtualParam], batch_size: int) -> Dict[str, list]:
    """Replace the factors of every virtual parameter by factors of the parameters it was made from
    (see module docstring); returns ``per_param`` with parameter names only."""
    B = batch_size
    for v in reversed(virtuals):
        factors = per_param.pop(v.name, None)
        if not factors:
            continue
        if v.kind in ("reshape", "permute", "gather"):
            (name, src), = v.inputs.items()
            per_param.setdefault(name, []).extend(_move(f, v, src, B) for f in factors)
            continue
        for name, f in _vjp(v, factors, B).items():
            per_param.setdefault(name, []).append(f)
    return per_param


class VirtualRule:
    """Stands for the batch-free op that made a virtual parameter, in analysis entries and reports."""

    name = "virtual"
    funcs = ()


VIRTUAL = VirtualRule()


def virtual_binding(call: OpCall):
    """A Binding naming the parameters a batch-free call uses (no rule factors: see resolve_virtuals)."""
    from fxdp.rules.base import Binding

    roles, params = {}, {}
    for t in tree_flatten((call.args, call.kwargs))[0]:
        name = call.param_name(t)
        if name and name not in roles.values():
            roles[f"p{len(roles)}"], params[f"p{len(params)}"] = name, t
    return Binding(VIRTUAL, roles, params)


def batch_free_candidate(call: OpCall) -> bool:
    """Whether a call with no batch-dependent input should make a virtual parameter: not an expand to the
    batch (the broadcast rule covers ``p.expand(B, ...)``), not a lookup with (1, T) position ids (lifted)."""
    from fxdp.rules import bind
    from fxdp.rules.broadcast import EXPANDS
    from fxdp.core.errors import PrivacyError

    if any(call.func is f for f in EXPANDS):
        return False
    try:
        b = bind(call)
    except PrivacyError:
        return True
    src = b.layout_source if b is not None else None
    return not (b is not None and b.liftable and src is not None and src.dim() >= 1 and src.shape[0] == 1)
