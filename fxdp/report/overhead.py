"""DP overhead of a report's parameter uses at any batch size and length.

:class:`CostTable` evaluates the cost model (:mod:`fxdp.report.cost`) for
every covered use of a report at batch size B and sequence length T:

- T rescales every use's rows per sample proportionally to the report's
  reference length (``Report.seq_len``: the most common T > 1 among linear,
  conv and embedding uses of the example); uses with T = 1 (a classifier head
  on a pooled vector) keep T = 1;
- the norm method of every use is the engine's own decision at those shapes;
- extra FLOPs = norms (decided method) + clipped-sum overhead (with that method:
  an instantiated weight's clipped sum reuses its per-sample gradients) + cross
  terms of parameters used several times; extra memory = everything held until
  the end of backward (output gradients, dense per-sample gradients, unfolded
  inputs; instantiated weights' per-sample gradients, kept from the norms to the
  clipped sums) plus the largest norm workspace (norms are computed one
  parameter at a time);
- plain = FLOPs of plain training (forward + backward) of the same parameter
  layers, the reference for the relative overhead.

All numbers are estimates of the dominant terms (see the cost model's
conventions); bytes use the compute dtype's item size (4, or 8 for float64).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional

from tabulate import tabulate

from fxdp.report.cost import crossover, cross_flops, evaluate, family_cost, runtime_decision, symbols
from fxdp.rules.factors import use_ghost


def si(x: Optional[float], unit: str = "") -> str:
    """1234567 -> '1.23M' (decimal prefixes); None -> '-'."""
    if x is None:
        return "-"
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def nbytes(x: Optional[float]) -> str:
    if x is None:
        return "-"
    for div, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}"
    return f"{int(x)} B"


def reference_length(rows: List[Dict]) -> int:
    """Most common T > 1 among linear / conv / embedding uses (ties: the largest), else 1."""
    ts = Counter(r["dims"]["T"] for r in rows
                 if r.get("family") in ("lowrank", "conv", "embedding") and r["dims"].get("T", 1) > 1)
    if not ts:
        return 1
    best = max(ts.values())
    return max(t for t, c in ts.items() if c == best)


def rescale(dims: Dict[str, int], T: Optional[int], T_ref: int) -> Dict[str, int]:
    if T is None or dims.get("T", 1) <= 1 or T_ref <= 1:
        return dict(dims)
    out = dict(dims)
    out["T"] = max(1, round(dims["T"] * T / T_ref))
    return out


class CostTable:
    """Costs of every covered use of a report at batch size ``B`` and length ``T``."""

    def __init__(self, rows: List[Dict], batch_size: int, seq_len: Optional[int], reference_len: int,
                 itemsize: int = 4):
        if batch_size < 1:
            raise ValueError(f"fxdp: batch size must be >= 1, got {batch_size}.")
        if seq_len is not None and seq_len < 1:
            raise ValueError(f"fxdp: sequence length must be >= 1, got {seq_len}.")
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len) if seq_len is not None else int(reference_len)
        self.reference_len = int(reference_len)
        self.itemsize = int(itemsize)
        self.rows: List[Dict[str, Any]] = []
        terms: Dict[str, List[Dict]] = {}
        for r in rows:
            if not r.get("family") or r.get("status", "ok") != "ok":
                continue
            dims = rescale(r["dims"], seq_len, reference_len)
            ev = evaluate(r["family"], r["roles"], dims, self.batch_size)
            ev.update(key=r["key"], module=r.get("module", ""), rule=r.get("rule", ""), dims=dims,
                      crossover=(crossover(dims) if r["family"] in ("lowrank", "conv") and "weight" in r["roles"]
                                 else None))
            self.rows.append(ev)
            for role, name in r["roles"].items():
                terms.setdefault(name, []).append({"family": r["family"], "dims": dims, "role": role})
        self.cross = {}
        for name, uses in terms.items():
            total = sum(cross_flops(uses[i], uses[j], self.batch_size)
                        for i in range(len(uses)) for j in range(i + 1, len(uses)))
            if len(uses) > 1:
                self.cross[name] = total
        self.extra_flops = sum(r["extra_flops"] for r in self.rows) + sum(self.cross.values())
        self.held = sum(r["held"] for r in self.rows)
        self.workspace = max((r["workspace"] for r in self.rows), default=0)
        self.extra_memory = (self.held + self.workspace) * self.itemsize
        self.plain_flops = sum(r["plain"] for r in self.rows)

    @property
    def decisions(self) -> Dict[Any, Optional[str]]:
        """Norm method of each use (by key) at these shapes, as the engine decides it."""
        return {r["key"]: r["decision"] for r in self.rows}

    def crossovers(self) -> List[str]:
        """One line per distinct low-rank shape: where ghost norms stop paying off."""
        lines, seen = [], set()
        for r in self.rows:
            if r["crossover"] is None:
                continue
            d = r["dims"]
            key = (r["rule"], d["m"], d["n"], d.get("G", 1))
            if key in seen:
                continue
            seen.add(key)
            shape = f"{d['m']}x{d['n']}" + (f" x{d['G']} groups" if d.get("G", 1) > 1 else "")
            lines.append(f"{r['rule']} {shape}: outer product at T = 1, ghost for 2 <= T < {r['crossover']}, "
                         f"instantiate from T = {r['crossover']} (here T = {d['T']}: {r['decision']})")
        return lines

    def summary(self) -> str:
        ratio = f" ({100.0 * self.extra_flops / self.plain_flops:.1f}% of plain training of these layers, " \
                f"{si(self.plain_flops, 'FLOP')})" if self.plain_flops else ""
        return (f"DP overhead at B={self.batch_size}, T={self.seq_len}: +{si(self.extra_flops, 'FLOP')}{ratio}; "
                f"+{nbytes(self.extra_memory)} memory (held until the end of backward "
                f"{nbytes(self.held * self.itemsize)}, largest norm workspace {nbytes(self.workspace * self.itemsize)})"
                + (f"; cross terms of shared parameters {si(sum(self.cross.values()), 'FLOP')}" if self.cross else ""))

    def table(self) -> str:
        def method(r, name):
            m = r["methods"].get(name)
            return f"{si(m['extra_flops'])} / {nbytes(m['memory'] * self.itemsize)}" if m else "-"

        body = [[r["key"], r["module"] or "(root)", r["rule"], r["dims"].get("T", ""), r["decision"],
                 method(r, "ghost"), method(r, "instantiate"), r["crossover"] or "", si(r["extra_flops"]),
                 nbytes(r["held"] * self.itemsize)] for r in self.rows]
        return tabulate(body, headers=["#", "module", "rule", "T", "norm", "ghost +FLOP / mem",
                                       "instantiate +FLOP / mem", "T*", "extra FLOP", "held"])

    def __str__(self) -> str:
        parts = [self.table(), "", self.summary()]
        cross = self.crossovers()
        if cross:
            parts.append("ghost / instantiate crossover T* (the engine's norm_decision):")
            parts.extend("  " + c for c in cross)
        return "\n".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "reference_len": self.reference_len,
                "itemsize": self.itemsize, "rows": self.rows, "cross": self.cross,
                "extra_flops": self.extra_flops, "held": self.held, "workspace": self.workspace,
                "extra_memory_bytes": self.extra_memory, "plain_flops": self.plain_flops}


def symbolic_overhead(rows: List[Dict], reference_len: int, itemsize: int = 4) -> Dict[str, Any]:
    """DP overhead of the covered uses as sympy expressions in B and T.

    Same rescaling of T and same decisions as :class:`CostTable`: a low-rank use
    whose rows scale with T gets ``Piecewise((outer, T_row = 1), (ghost,
    use_ghost(T_row, m, n)), (instantiate, True))`` -- the runtime's rule on
    symbols. Returns ``{"extra_flops", "extra_memory_bytes", "plain_flops"}``;
    cross terms of shared parameters are not included (they are in CostTable).
    """
    import sympy as sp

    s = symbols()
    T = s["T"]
    flops, held, plain, workspaces = 0, 0, 0, []
    for r in rows:
        if not r.get("family") or r.get("status", "ok") != "ok":
            continue
        d = r["dims"]
        scaled = d.get("T", 1) > 1 and reference_len > 1
        t_row = T * sp.Rational(d["T"], reference_len) if scaled else d.get("T", 1)
        subs = {s[k]: v for k, v in d.items() if k != "T"}
        subs[T] = t_row
        fc = family_cost(r["family"], frozenset(r["roles"]))
        methods = {k: tuple(sp.sympify(e).subs(subs) for e in (v.flops + v.clip, v.workspace, v.held))
                   for k, v in fc.methods.items()}
        if scaled and "outer" in methods:
            def pick(i):
                return sp.Piecewise((methods["outer"][i], sp.Eq(t_row, 1)),
                                    (methods["ghost"][i], use_ghost(t_row, d["m"], d["n"])),
                                    (methods["instantiate"][i], True))
        else:
            chosen = methods[runtime_decision(r["family"], r["roles"], d)]

            def pick(i):
                return chosen[i]
        flops += pick(0) + fc.clip.subs(subs)
        workspaces.append(pick(1))
        held += fc.held.subs(subs) + pick(2)
        plain += fc.plain.subs(subs)
    workspace = sp.Max(*workspaces) if workspaces else 0
    return {"extra_flops": sp.sympify(flops), "extra_memory_bytes": sp.sympify(itemsize * (held + workspace)),
            "plain_flops": sp.sympify(plain)}
