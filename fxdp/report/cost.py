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

The clipped sum of a low-rank weight depends on the method, as in the engine
(:func:`fxdp.rules.factors.prepare`): with ghost / outer norms it is one GEMM
over the scaled factors (B T min(m, n) multiplies, then the GEMM that takes the
place of autograd's weight gradient, which the taps skip: no extra GEMM); an
instantiated use is instantiated once, before its norm, and the same per-sample
gradients give the norm, the cross terms and the clipped sum, a B m n weighted
sum -- the instantiation's GEMM is the one that takes the place of autograd's,
so that method's clip term is ``2 B m n - 2 B T m n`` and an instantiated
weight costs ~4 B m n FLOPs over plain training (norm and clipped sum, the
instantiation's GEMM included). Cross terms see the same forms (:func:`cross_flops`).

Counting conventions: a multiply-add is 2 FLOPs; ``gemm`` is the part of a
method's FLOPs spent in matrix products -- exactly what
``torch.utils.flop_counter.FlopCounterMode`` counts for ``fxdp.rules.factors``
(for "instantiate": :func:`~fxdp.rules.factors.prepare` and the norm of what it
returns); the rest are elementwise terms of lower order. Memory is in elements
(times the compute dtype's item size for bytes): ``workspace`` lives while one
norm is computed, ``held`` lives from the backward of the op until the engine's
finalize (output gradients, per-sample dense gradients, unfolded inputs). An
instantiated weight's per-sample gradients live from the norms to the clipped
sums (all instantiated uses at once) and replace its factors, which are then
released: its method adds ``max(0, B m n - held factors)`` to ``held`` (a bound: the
engine's peak is the larger of the memory before and after the instantiations).

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

METHOD_FIELDS = ("flops", "gemm", "workspace", "held", "clip")


@functools.lru_cache(maxsize=None)
def symbols() -> Dict[str, Any]:
    """The sympy symbols of the cost model, by name (positive integers)."""
    import sympy as sp

    return {name: sp.Symbol(name, positive=True, integer=True) for name in SYMBOL_NAMES}


@dataclass(frozen=True)
class MethodCost:
    """Symbolic cost of one way of computing the per-sample squared norms of one use: the norm's
    ``flops`` (``gemm`` of them in matrix products) and ``workspace``; what the method adds to the
    family's ``held`` memory and ``clip`` FLOPs (module docstring)."""

    flops: Any
    gemm: Any
    workspace: Any
    held: Any = 0
    clip: Any = 0


@dataclass(frozen=True)
class FamilyCost:
    """Symbolic costs of one use of a rule family with the given parameter roles: per norm method, and
    what every method has (``held`` memory, ``clip`` FLOPs of the clipped sum, ``plain`` training FLOPs);
    a use costs its decided method's ``held`` and ``clip`` on top of these."""

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
    import sympy as sp

    s = symbols()
    B, T, m, n, p, G, V = (s[k] for k in SYMBOL_NAMES)
    zero = 0 * B
    if family in ("lowrank", "conv"):
        methods = {}
        held, clip, plain = B * G * T * p, zero, zero   # the output gradient
        if "weight" in roles:
            if family == "conv":
                held += B * G * T * n                   # unfolded input, built for every use before norms
            plain += 6 * B * G * T * m * n              # forward, input gradient, weight gradient
            scaled = B * G * T * sp.Min(m, n)           # coef * the smaller factor, then the GEMM autograd skips
            dense = B * G * m * n                       # instantiated once, reused by the clipped sum
            methods["ghost"] = MethodCost(2 * B * G * T**2 * (m + n) + 2 * B * G * T**2,
                                          2 * B * G * T**2 * (m + n), 2 * B * G * T**2, clip=scaled)
            methods["instantiate"] = MethodCost(2 * B * G * T * m * n + 2 * dense, 2 * B * G * T * m * n, zero,
                                                held=sp.Max(0, dense - held), clip=2 * dense - 2 * B * G * T * m * n)
            methods["outer"] = MethodCost(2 * B * G * T * (m + n + 1), zero, 2 * B * G * T, clip=scaled)
        if "bias" in roles:
            bias = MethodCost(B * G * T * p + 2 * B * G * p, zero, zero)
            if not methods:
                methods["instantiate"] = bias
            else:
                methods = {k: dataclasses.replace(v, flops=v.flops + bias.flops) for k, v in methods.items()}
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
        exprs.update({f"{name}.{k}": getattr(mc, k) for k in METHOD_FIELDS})
    return {k: sp.lambdify(args, sp.sympify(v), modules="math") for k, v in exprs.items()}


def evaluate(family: str, roles, dims: Dict[str, int], batch_size: int) -> Dict[str, Any]:
    """Numeric costs of one use at the given dims and batch size.

    Returns ``{"methods": {name: {"flops", "gemm", "workspace", "held", "clip", "extra_flops",
    "memory"}}, "held", "clip", "plain", "decision", "extra_flops", "workspace"}``. A method's
    ``extra_flops`` are its norm plus the whole clipped-sum overhead with it, its ``memory`` its
    workspace plus what it holds; the top-level ``held``, ``clip``, ``extra_flops`` and
    ``workspace`` are those of the decided method. Values are in FLOPs and elements.
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
            m = {k: val[f"{name}.{k}"] for k in METHOD_FIELDS}
            m.update(extra_flops=m["flops"] + m["clip"] + val["clip"], memory=m["workspace"] + m["held"])
            methods[name] = m
    decision = runtime_decision(family, roles, full)
    chosen = methods.get(decision) or next(iter(methods.values()))
    return {"methods": methods, "held": val["held"] + chosen["held"], "clip": val["clip"] + chosen["clip"],
            "plain": val["plain"], "decision": decision, "extra_flops": chosen["extra_flops"],
            "workspace": chosen["workspace"]}


def _dense_size(term: Dict[str, Any]) -> int:
    d = term["dims"]
    if term.get("role") == "bias":
        return d.get("G", 1) * d.get("p", 1)
    if term["family"] in ("lowrank", "conv"):
        return d.get("G", 1) * d["m"] * d["n"]
    if term["family"] == "embedding":
        return d["V"] * d["n"]
    return d.get("n", 1)


def _form(term: Dict[str, Any]) -> str:
    """The factor finalize computes a use's cross terms with, after :func:`fxdp.rules.factors.prepare`:
    "lowrank" (ghost / outer norm), "embedding", or "dense" (a bias, a dense rule, an instantiated weight)."""
    if term.get("role") == "bias":
        return "dense"
    if term["family"] in ("lowrank", "conv"):
        instantiated = runtime_decision(term["family"], {"weight"}, term["dims"]) == "instantiate"
        return "dense" if instantiated else "lowrank"
    return "embedding" if term["family"] == "embedding" else "dense"


def _materialize_flops(term: Dict[str, Any], form: str, batch_size: int) -> int:
    d = term["dims"]
    if form == "lowrank":
        return 2 * batch_size * d.get("G", 1) * d["T"] * d["m"] * d["n"]
    if form == "embedding":
        return batch_size * d["T"] * d["n"]                 # index_add of the rows
    return 0


def cross_flops(a: Dict[str, Any], b: Dict[str, Any], batch_size: int) -> int:
    """FLOPs of the per-sample inner product of two uses of one parameter
    (``fxdp.rules.factors.inner`` on the factors :func:`fxdp.rules.factors.prepare` made: an
    instantiated weight is its dense per-sample gradients, instantiated once for its norm).
    A term is ``{"family", "dims", "role"}``."""
    B = batch_size
    fa, fb = _form(a), _form(b)
    da, db = a["dims"], b["dims"]
    if fa == fb == "lowrank" and da.get("G", 1) == db.get("G", 1) and da["m"] == db["m"]:
        T1, T2, m, n, G = da["T"], db["T"], da["m"], da["n"], da.get("G", 1)
        if T1 * T2 * (m + n) < (T1 + T2) * m * n:         # the Gram form, as factors._lowrank_inner picks it
            return 2 * B * G * T1 * T2 * (m + n + 1)
        return 2 * B * G * (T1 + T2) * m * n + 2 * B * G * m * n
    if fa == fb == "embedding":
        return 2 * B * da["T"] * db["T"] * da["n"] + 3 * B * da["T"] * db["T"]
    if {fa, fb} == {"embedding", "lowrank"}:
        e, lr = (da, db) if fa == "embedding" else (db, da)
        if lr.get("G", 1) == 1 and lr["m"] == e["V"]:
            return 2 * B * lr["T"] * e["T"] * e["n"] + 2 * B * lr["T"] * e["T"]
    if {fa, fb} == {"embedding", "dense"} and _dense_size(a) == _dense_size(b):
        e = da if fa == "embedding" else db
        return 2 * B * e["T"] * e["n"]                     # the embedding's rows of the dense gradients
    # both materialised (the dense ones already are), then one elementwise product per sample
    return _materialize_flops(a, fa, B) + _materialize_flops(b, fb, B) + 2 * B * max(_dense_size(a), _dense_size(b))


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
