"""Cost model: the formulas agree with the rules' real factors at example shapes,
the decision and crossover are the runtime's, and costs rescale with B and T."""
from __future__ import annotations

import itertools

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fxdp
from examples.models import tiny_gpt
from fxdp.engine.finalize import group_norms
from fxdp.report.cost import (crossover, cross_flops, evaluate, family_and_dims, family_cost, ghost_condition,
                              runtime_decision, symbols)
from fxdp.rules import OpCall, bind
from fxdp.rules.factors import clipped_sum, inner, norm_decision, prepare, sq_norm
from fxdp.core.layout import BatchLayout, LayoutKind

BATCH0 = BatchLayout(LayoutKind.BATCH, 0)


def counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rule_factor(func, args, params, grad_shape, B, layout=BATCH0):
    """Bind a call like the interceptor does, build its factors from a random output gradient."""
    binding = bind(OpCall(func, args, {}, {id(t): name for name, t in params.items()}))
    out = func(*args)
    g = torch.randn(grad_shape if grad_shape is not None else out.shape, dtype=torch.float64)
    factors = binding.rule.factors(binding, {k: v.detach() for k, v in binding.saved.items()}, g, {}, layout, B)
    return binding, out, factors


def _t(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# name -> (func, call args, roles of args[1], args[2])
CASES = {
    "linear-ghost": lambda: (F.linear, (_t(3, 5, 40), _t(24, 40), _t(24)), ("weight", "bias")),
    "linear-instantiate": lambda: (F.linear, (_t(3, 20, 6), _t(4, 6), None), ("weight",)),
    "linear-outer": lambda: (F.linear, (_t(3, 7), _t(5, 7), None), ("weight",)),
    "addmm-ghost": lambda: (torch.addmm, (_t(12), _t(3 * 4, 16), _t(16, 12)), ("bias", "weight")),
    "conv-grouped": lambda: (F.conv2d, (_t(3, 4, 9, 9), _t(6, 2, 3, 3), _t(6), 2, 1, 1, 2), ("weight", "bias")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowrank_dims_and_gemm_flops_match_the_rules_factor(case):
    func, args, roles = CASES[case]()
    B = 3
    params = {role: t for role, t in zip(roles, args[1:3]) if t is not None}
    if func is torch.addmm:
        params = {"bias": args[0], "weight": args[2]}
    layout = BatchLayout(LayoutKind.ROWS_MAJOR, 0) if func is torch.addmm else BATCH0   # (B*T, d) rows
    binding, out, factors = rule_factor(func, args, params, None, B, layout)
    family, dims = family_and_dims(binding.rule.name, binding, tuple(binding.layout_source.shape), tuple(out.shape), B)
    f = factors["weight"]
    assert tuple(f.left.shape) == (B, dims["G"], dims["T"], dims["m"])
    assert tuple(f.right.shape) == (B, dims["G"], dims["T"], dims["n"])
    ev = evaluate(family, binding.roles, dims, B)
    counted = counted_flops(lambda: sq_norm(f))
    assert f.decision == ev["decision"] == runtime_decision(family, binding.roles, dims)
    assert counted == ev["methods"][f.decision]["gemm"]
    left, right = f.left, f.right
    ghost = lambda: (torch.matmul(left, left.transpose(-1, -2)), torch.matmul(right, right.transpose(-1, -2)))
    inst = lambda: torch.matmul(left.transpose(-1, -2), right)
    assert counted_flops(ghost) == ev["methods"]["ghost"]["gemm"]     # both formulas, whichever is picked
    assert counted_flops(inst) == ev["methods"]["instantiate"]["gemm"]


def test_embedding_ghost_gemm_flops_match_the_rule():
    B, T, V, d = 3, 11, 50, 8
    idx, w = torch.randint(0, V, (B, T)), torch.randn(V, d, dtype=torch.float64)
    binding, out, factors = rule_factor(F.embedding, (idx, w), {"weight": w}, None, B)
    family, dims = family_and_dims("embedding", binding, tuple(idx.shape), tuple(out.shape), B)
    assert (family, dims) == ("embedding", {"T": T, "n": d, "V": V})
    f = factors["weight"]
    ev = evaluate(family, {"weight"}, dims, B)
    assert counted_flops(lambda: sq_norm(f)) == ev["methods"]["ghost"]["gemm"] == 2 * B * T * T * d
    assert f.decision == ev["decision"] == "ghost"


def test_norm_layer_costs_have_no_gemm_and_instantiate():
    B, T, n = 2, 5, 12
    x, w, b = torch.randn(B, T, n), torch.randn(n), torch.randn(n)
    binding = bind(OpCall(F.layer_norm, (x, (n,), w, b), {}, {id(w): "w", id(b): "b"}))
    family, dims = family_and_dims("layer_norm", binding, tuple(x.shape), tuple(x.shape), B)
    assert (family, dims) == ("norm", {"T": T, "n": n})
    g = torch.randn(B, T, n)
    factors = binding.rule.factors(binding, {"x": x}, g, {}, BATCH0, B)
    assert counted_flops(lambda: [sq_norm(f) for f in factors.values()]) == 0
    ev = evaluate(family, binding.roles, dims, B)
    assert ev["decision"] == factors["weight"].decision == "instantiate"
    assert ev["held"] == B * T * n + 2 * B * n     # output gradient + two per-sample gradients


def test_symbolic_ghost_condition_is_the_runtime_function():
    s = symbols()
    cond = ghost_condition()
    assert cond == (4 * s["m"] * s["n"] > 7 * s["T"] * (s["m"] + s["n"]))
    for T, m, n in itertools.product(range(2, 30, 3), (1, 4, 17, 64), (3, 32, 100)):
        assert bool(cond.subs({s["T"]: T, s["m"]: m, s["n"]: n})) == (norm_decision(T, m, n) == "ghost")


@pytest.mark.parametrize("m,n", [(1, 1), (4, 6), (32, 32), (96, 32), (768, 3072), (50257, 768)])
def test_crossover_is_where_the_runtime_decision_flips(m, n):
    t = crossover({"m": m, "n": n})
    assert norm_decision(t, m, n) == "instantiate"
    assert t == 2 or norm_decision(t - 1, m, n) == "ghost"
    assert all(norm_decision(T, m, n) == "instantiate" for T in (t, t + 1, 2 * t))


def test_symbolic_costs_are_polynomials_in_the_model_symbols():
    s = symbols()
    B, T, m, n, p, G = (s[k] for k in ("B", "T", "m", "n", "p", "G"))
    fc = family_cost("lowrank", frozenset({"weight", "bias"}))
    assert sp.expand(fc.methods["ghost"].gemm - 2 * B * G * T ** 2 * (m + n)) == 0
    inst = fc.methods["instantiate"]
    assert inst.workspace == 0 and inst.held == sp.Max(0, B * G * m * n - B * G * T * p)
    assert sp.expand(inst.clip - (2 * B * G * m * n - 2 * B * G * T * m * n)) == 0
    assert fc.held.free_symbols <= set(s.values())


def _weight_factor(T, d_out, d_in, B=3):
    x, w = _t(B, T, d_in), _t(d_out, d_in)
    binding, out, factors = rule_factor(F.linear, (x, w, None), {"weight": w}, None, B)
    family, dims = family_and_dims("linear", binding, tuple(x.shape), tuple(out.shape), B)
    return factors["weight"], family, dims


@pytest.mark.parametrize("T,d_out,d_in", [(20, 4, 40), (5, 24, 40), (1, 5, 7)], ids=["instantiate", "ghost", "outer"])
def test_norm_and_clipped_sum_cost_what_finalize_runs(T, d_out, d_in):
    """finalize's norm (group_norms: prepare, then sq_norm) and clipped sum of one linear weight, counted
    by FlopCounterMode, minus the weight-gradient GEMM autograd would run (the taps skip it), is the GEMM
    part of the model's extra FLOPs: an instantiated use is instantiated once and its clipped sum is a
    B m n weighted sum of those gradients (no second GEMM); ghost / outer scale one factor (elementwise)
    and run the GEMM that replaces autograd's. Held memory: what finalize keeps until the clipped sum."""
    B = 3
    f, family, dims = _weight_factor(T, d_out, d_in, B)
    ev = evaluate(family, {"weight"}, dims, B)
    decision = ev["decision"]
    assert decision == {20: "instantiate", 5: "ghost", 1: "outer"}[T]
    output_grad = f.left.numel()  # linear: left = output gradient (B, 1, T, d_out)
    per_param = {"w": [f]}
    with FlopCounterMode(display=False) as counter:
        group_norms(per_param, {"w": 0}, 1.0)
        (used,) = per_param["w"]
        clipped_sum(used, torch.rand(B, dtype=torch.float64))
    skipped = 2 * B * T * d_out * d_in
    method = ev["methods"][decision]
    if decision == "instantiate":
        assert type(used).__name__ == "DenseGrad"
        assert counter.get_total_flops() - skipped == method["gemm"] + method["clip"] == 2 * B * d_out * d_in
        assert ev["held"] == max(output_grad, used.grad.numel()) and ev["workspace"] == 0
    else:
        assert used is f
        assert counter.get_total_flops() - skipped == method["gemm"]
        assert method["clip"] == min(f.left.numel(), f.right.numel())   # coef times the smaller factor
        assert ev["held"] == output_grad
    assert ev["extra_flops"] == method["flops"] + method["clip"] == method["extra_flops"]


@pytest.mark.parametrize("T1,T2", [(20, 30), (3, 20), (3, 5)], ids=["both-instantiated", "one-instantiated", "ghost"])
def test_cross_term_cost_is_that_of_the_prepared_factors(T1, T2):
    """Two uses of one 40x40 weight: the cross term finalize computes (inner of the prepared factors)
    spends in GEMMs what cross_flops counts beyond the final per-sample products: nothing for two
    instantiated uses (their dense gradients are reused), the materialisation of a ghost use paired with
    an instantiated one, the Gram or materialised form of two ghost uses."""
    B, d = 3, 40
    (a, _, da), (b, _, db) = _weight_factor(T1, d, d, B), _weight_factor(T2, d, d, B)
    decisions = [norm_decision(T, d, d) for T in (T1, T2)]
    pa, pb = prepare(a), prepare(b)
    gemm = counted_flops(lambda: inner(pa, pb))
    model = cross_flops({"family": "lowrank", "dims": da, "role": "weight"},
                        {"family": "lowrank", "dims": db, "role": "weight"}, B)
    if decisions == ["instantiate", "instantiate"]:
        assert gemm == 0 and model == 2 * B * d * d
    elif "instantiate" in decisions:
        T_ghost = T1 if decisions[0] == "ghost" else T2
        assert gemm == 2 * B * T_ghost * d * d and model == gemm + 2 * B * d * d
    else:
        assert decisions == ["ghost", "ghost"]
        assert gemm == 2 * B * T1 * T2 * 2 * d and model == gemm + 2 * B * T1 * T2   # the Gram form


@pytest.fixture(scope="module")
def report():
    model, (idx,) = tiny_gpt(batch_size=4, seq_len=16)
    return fxdp.explain(model, idx)


def test_cost_at_the_example_shapes_equals_the_rows(report):
    table = report.cost()
    assert table.batch_size == report.batch_size == 4 and table.seq_len == report.seq_len == 16
    by_key = {r["key"]: r for r in report.rows}
    for r in table.rows:
        row = by_key[r["key"]]
        assert r["decision"] == row["decision"] and r["dims"] == row["dims"]
        assert {k: v["flops"] for k, v in r["methods"].items()} == {k: v["flops"] for k, v in row["costs"].items()}


def test_cost_is_linear_in_B_and_rescales_T(report):
    small, big = report.cost(B=4), report.cost(B=12)
    assert big.extra_flops == 3 * small.extra_flops and big.extra_memory == 3 * small.extra_memory
    long = report.cost(T=64)
    for r in long.rows:
        assert r["dims"]["T"] == (64 if r["rule"] in ("linear", "embedding", "layer_norm") else r["dims"]["T"])
    assert long.extra_flops > small.extra_flops
    text = str(report.cost(B=64, T=1024))
    assert "DP overhead at B=64, T=1024" in text and "instantiate from T = 15" in text


def test_symbolic_overhead_equals_the_numeric_table_at_other_shapes(report):
    s = symbols()
    expr = report.overhead_expr()
    assert expr["extra_flops"].free_symbols == {s["B"], s["T"]}
    for B, T in ((2, 16), (7, 32), (64, 1024)):
        table = report.cost(B=B, T=T)
        at = {s["B"]: B, s["T"]: T}
        assert int(expr["extra_flops"].subs(at)) == table.extra_flops - sum(table.cross.values())
        assert int(expr["extra_memory_bytes"].subs(at)) == table.extra_memory
        assert int(expr["plain_flops"].subs(at)) == table.plain_flops
