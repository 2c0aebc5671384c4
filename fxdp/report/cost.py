"""Cost model of per-sample clipping, per rule family, in sympy.

Each rule family gets symbolic costs in the symbols

    B  samples in the batch           T  positions (rows) per sample at this use
    m  left factor width (per group)  n  right factor width (per group)
    p  output features (per group)    G  groups (grouped convolution)
    V  vocabulary size (embedding)

for every way of computing the per-sample squared norm ("ghost": Gram
matrices; "instantiate": materialised per-sample gradients; "outer": the T = 1
shortcut ||a||.||g||), plus what fxdp keeps alive until the end of backward,
the extra FLOPs of the clipped sum, and the FLOPs of plain training of the op.

Counting conventions: a multiply-add is 2 FLOPs; ``gemm`` is the part of a
method's FLOPs spent in matrix products -- exactly what
``torch.utils.flop_counter.FlopCounterMode`` counts for ``fxdp.rules.factors``;
the rest are elementwise terms of lower order. Memory is in elements (times
the compute dtype's item size for bytes): ``workspace`` lives while one norm is
computed, ``held`` lives from the backward of the op until the engine's
finalize (output gradients, per-sample dense gradients, unfolded inputs).

The decision between the methods is never re-derived here: low-rank factors
use :func:`fxdp.rules.factors.norm_decision` (the function the engine runs),
embedding and dense factors use the default ``decision`` of their factor
classes, so report and runtime agree by construction. The symbolic ghost
condition is :func:`fxdp.rules.factors.use_ghost` called on sympy symbols.

sympy is imported on first use only (``import fxdp`` stays light).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Optional

from fxdp.rules.factors import DenseGrad, EmbeddingGrad, norm_decision, use_ghost

SYMBOL_NAMES = ("B", "T", "m", "n", "p", "G", "V")

METHODS = ("ghost", "instantiate", "outer")


@functools.lru_cache(maxsize=None)
def symbols() -> Dict[str, Any]:
    """The sympy symbols of the cost model, by name (positive integers)."""
    import sympy as sp

    return {name: sp.Symbol(name, positive=True, integer=True) for name in SYMBOL_NAMES}


@dataclass(frozen=True)
class MethodCost:
    """Symbolic cost of one way of computing the per-sample squared norms of one use."""

    flops: Any
    gemm: Any
    workspace: Any


@dataclass(frozen=True)
class FamilyCost:
    """Symbolic costs of one use of a rule family with the given parameter roles."""

    family: str
    roles: FrozenSet[str]
    methods: Dict[str, MethodCost]
    held: Any
    clip: Any
    plain: Any


def _factor_default(cls) -> str:
    return next(f.default for f in dataclasses.fields(cls) if f.name == "decision")


@functools.lru_cache(maxsize=None)
def family_cost(family: str, roles: FrozenSet[str]) -> FamilyCost:
    """Symbolic costs of ``family`` ("lowrank", "conv", "embedding", "norm",
    "broadcast", "expand") for a use with parameter ``roles``."""
    s = symbols()
    B, T, m, n, p, G, V = (s[k] for k in SYMBOL_NAMES)
    zero = 0 * B
    if family in ("lowrank", "conv"):
        methods = {}
        if "weight" in roles:
            methods["ghost"] = MethodCost(2 * B * G * T**2 * (m + n) + 2 * B * G * T**2,
                                          2 * B * G * T**2 * (m + n), 2 * B * G * T**2)
            methods["instantiate"] = MethodCost(2 * B * G * T * m * n + 2 * B * G * m * n,
                                                2 * B * G * T * m * n, B * G * m * n)
            methods["outer"] = MethodCost(2 * B * G * T * (m + n + 1), zero, 2 * B * G * T)
        held, clip, plain = B * G * T * p, zero, zero
        if "weight" in roles:
            clip += B * G * T * m                       # coef * left, then the same GEMM autograd skips
            plain += 6 * B * G * T * m * n              # forward, input gradient, weight gradient
            if family == "conv":
                held += B * G * T * n                   # unfolded input, built for every use before norms
        if "bias" in roles:
            bias = MethodCost(B * G * T * p + 2 * B * G * p, zero, zero)
            if not methods:
                methods["instantiate"] = bias
            else:
                methods = {k: MethodCost(v.flops + bias.flops, v.gemm, v.workspace) for k, v in methods.items()}
            held += B * G * p
            clip += 2 * B * G * p
            plain += 2 * B * G * T * p
        return FamilyCost(family, roles, methods, held, clip, plain)
    if family == "embedding":
        methods = {"ghost": MethodCost(2 * B * T**2 * n + 3 * B * T**2, 2 * B * T**2 * n, 2 * B * T**2),
                   "instantiate": MethodCost(B * T * n + 2 * B * V * n, zero, B * V * n)}
        return FamilyCost(family, roles, methods, held=B * T * n, clip=B * T * n, plain=B * T * n)
    if family == "norm":
        flops, workspace, held, clip, plain = zero, zero, B * T * n, zero, zero
        if "weight" in roles:
            flops += 5 * B * T * n + 2 * B * T * n + 2 * B * n   # recompute x-hat, g * x-hat summed, norm
            workspace += B * T * n
            held += B * n
            clip += 2 * B * n
            plain += 3 * 2 * B * T * n                         # affine scale: forward + backward
        if "bias" in roles:
            flops += B * T * n + 2 * B * n
            held += B * n
            clip += 2 * B * n
            plain += 2 * B * T * n
        return FamilyCost(family, roles, {"instantiate": MethodCost(flops, zero, workspace)}, held, clip, plain)
    if family in ("broadcast", "expand"):
        captured = 2 if family == "broadcast" else 1          # output gradient (+ gradient of the broadcast)
        return FamilyCost(family, roles, {"instantiate": MethodCost(B * T * n + 2 * B * n, zero, zero)},
                          held=captured * B * T * n + B * n, clip=2 * B * n, plain=2 * B * T * n)
    raise ValueError(f"fxdp: no cost model for rule family {family!r}.")


def ghost_condition(**dims):
    """The runtime's ghost condition as a sympy relation: ``use_ghost(T, m, n)``
    evaluated on symbols, with any of T, m, n given numerically substituted."""
    s = symbols()
    T, m, n = (dims.get(k, s[k]) for k in ("T", "m", "n"))
    return use_ghost(T, m, n)


def runtime_decision(family: str, roles, dims: Dict[str, int]) -> Optional[str]:
    """How the engine computes the norm of this use: the same functions it runs."""
    if family in ("lowrank", "conv"):
        if "weight" not in roles:
            return _factor_default(DenseGrad)
        return norm_decision(int(dims["T"]), int(dims["m"]), int(dims["n"]))
    if family == "embedding":
        return _factor_default(EmbeddingGrad)
    if family in ("norm", "broadcast", "expand"):
        return _factor_default(DenseGrad)
    return None


def crossover(dims: Dict[str, int]) -> Optional[int]:
    """Smallest T >= 2 from which :func:`norm_decision` instantiates instead of
    using ghost norms, for a low-rank use of widths m, n (the decision does not
    depend on B). Searched with the runtime's own function, which is monotone in T."""
    m, n = int(dims["m"]), int(dims["n"])
    if norm_decision(2, m, n) != "ghost":
        return 2
    hi = 4
    while norm_decision(hi, m, n) == "ghost":
        hi *= 2
    lo = hi // 2                                   # ghost at lo, instantiate at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if norm_decision(mid, m, n) == "ghost":
            lo = mid
        else:
            hi = mid
    return hi


@functools.lru_cache(maxsize=None)
def _compiled(family: str, roles: FrozenSet[str]):
    import sympy as sp

    fc = family_cost(family, roles)
    args = [symbols()[k] for k in SYMBOL_NAMES]
    exprs = {"held": fc.held, "clip": fc.clip, "plain": fc.plain}
    for name, mc in fc.methods.items():
        exprs.update({f"{name}.flops": mc.flops, f"{name}.gemm": mc.gemm, f"{name}.workspace": mc.workspace})
    return {k: sp.lambdify(args, sp.sympify(v), modules="math") for k, v in exprs.items()}


def evaluate(family: str, roles, dims: Dict[str, int], batch_size: int) -> Dict[str, Any]:
    """Numeric costs of one use at the given dims and batch size.

    Returns ``{"methods": {name: {"flops", "gemm", "workspace"}}, "held",
    "clip", "plain", "decision", "extra_flops", "workspace"}`` where the
    ``extra_*`` entries are those of the decided method (extra FLOPs include the
    clipped-sum overhead). Values are in FLOPs and elements.
    """
    roles = frozenset(roles)
    fns = _compiled(family, roles)
    full = {k: 1 for k in SYMBOL_NAMES}
    full.update({k: int(v) for k, v in dims.items() if k in full})
    full["B"] = int(batch_size)
    args = [full[k] for k in SYMBOL_NAMES]
    val = {k: int(round(f(*args))) for k, f in fns.items()}
    methods = {}
    for name in METHODS:
        if f"{name}.flops" in val:
            methods[name] = {k: val[f"{name}.{k}"] for k in ("flops", "gemm", "workspace")}
    decision = runtime_decision(family, roles, full)
    chosen = methods.get(decision) or next(iter(methods.values()))
    return {"methods": methods, "held": val["held"], "clip": val["clip"], "plain": val["plain"],
            "decision": decision, "extra_flops": chosen["flops"] + val["clip"], "workspace": chosen["workspace"]}


def _dense_size(term: Dict[str, Any]) -> int:
    d = term["dims"]
    if term.get("role") == "bias":
        return d.get("G", 1) * d.get("p", 1)
    if term["family"] in ("lowrank", "conv"):
        return d.get("G", 1) * d["m"] * d["n"]
    if term["family"] == "embedding":
        return d["V"] * d["n"]
    return d.get("n", 1)


def cross_flops(a: Dict[str, Any], b: Dict[str, Any], batch_size: int) -> int:
    """FLOPs of the per-sample inner product of two uses of one parameter
    (``fxdp.rules.factors.inner``). A term is ``{"family", "dims", "role"}``."""
    B = batch_size
    dense_roles = ("bias",)
    fa = "dense" if a.get("role") in dense_roles else a["family"]
    fb = "dense" if b.get("role") in dense_roles else b["family"]
    da, db = a["dims"], b["dims"]
    if fa in ("lowrank", "conv") and fb in ("lowrank", "conv") and da.get("G", 1) == db.get("G", 1) \
            and da["n"] == db["n"]:
        T1, T2, m, n, G = da["T"], db["T"], da["m"], da["n"], da.get("G", 1)
        if T1 * T2 * (m + n) < (T1 + T2) * m * n:         # the Gram form, as factors._lowrank_inner picks it
            return 2 * B * G * T1 * T2 * (m + n + 1)
        return 2 * B * G * (T1 + T2) * m * n + 2 * B * G * m * n
    if fa == "embedding" and fb == "embedding":
        return 2 * B * da["T"] * db["T"] * da["n"] + 3 * B * da["T"] * db["T"]
    if {fa, fb} == {"embedding", "lowrank"}:
        e, lr = (da, db) if fa == "embedding" else (db, da)
        return 2 * B * lr["T"] * e["T"] * e["n"] + 2 * B * lr["T"] * e["T"]
    return 2 * B * max(_dense_size(a), _dense_size(b))    # materialised per-sample gradients


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape) if shape else 1


def family_and_dims(rule: str, binding, source_shape, output_shape, batch_size: int):
    """Cost family and dims (T, m, n, p, G, V) of one bound use at the real
    shapes of a batch of ``batch_size`` samples, the way the rule reads them
    (T is the number of rows per sample after ``batch_first_2d`` & co.).
    Returns ``(None, {})`` for a rule without a cost model."""
    B = max(int(batch_size), 1)
    o = binding.options
    src, out = _numel(source_shape), _numel(output_shape)
    if rule in ("linear", "addmm", "matmul"):
        d_in, d_out = int(o["in"]), int(o["out"])
        m, n = (d_out, d_in) if rule == "linear" else (d_in, d_out)
        return "lowrank", {"T": max(1, src // (B * d_in)), "m": m, "n": n, "p": d_out, "G": 1}
    if rule == "conv":
        s = binding.rule.shape_summary(binding)
        return "conv", {"T": max(1, out // (B * int(o["out_channels"]))), "m": s["m"], "n": s["n"], "p": s["m"],
                        "G": s["G"]}
    if rule == "embedding":
        return "embedding", {"T": max(1, src // B), "n": int(o["dim"]), "V": int(o["num_embeddings"])}
    if rule in ("layer_norm", "rms_norm", "group_norm"):
        n = int(binding.rule.shape_summary(binding)["n"])
        return "norm", {"T": max(1, src // (B * n)), "n": n}
    if rule == "broadcast":
        n = max(1, int(binding.rule.shape_summary(binding)["n"]))
        family = "expand" if o.get("op") == "expand" else "broadcast"
        return family, {"T": max(1, out // (B * n)), "n": n}
    return None, {}
