"""The :class:`Report` that ``fxdp.explain`` returns.

One row per parameter use (``report.rows``, dicts of JSON types), the clip
groups (``report.plan`` is the very :class:`~fxdp.analysis.plan_groups.GroupPlan`
the engine clips with; ``report.groups`` and ``report.group_labels`` read it),
the problems privatize would raise, the layer / block graph, and the cost
model at any shape (``report.cost(B=..., T=...)``).

Row keys: ``key`` (ordinal of the use -- the numbering of analysis entries and
runtime taps -- or ``"refused:<k>"``), ``module`` (path of the module whose
forward made the call), ``layer`` (its type), ``op``, ``rule``, ``params``,
``roles`` (role -> parameter), ``input`` / ``output`` (shapes at the example
batch), ``batch`` (where the samples are), ``family`` / ``dims`` (cost model
inputs), ``decision`` (ghost / instantiate / outer, the engine's choice at the
example shapes), ``costs`` (of each method: its norm's ``flops`` and ``workspace`` elements, and
its whole DP overhead with the clipped sum it implies: ``extra_flops``, ``memory`` elements),
``group``, ``block``, ``path`` (tap, lifted tap, refused), ``status`` ("ok",
"uncovered", "sample-mixing", "layout", "problem"), ``reason``, ``made_by`` /
``changed_by`` (analysis passes).

``to_dict()`` is JSON-serialisable and ``Report.from_dict(d).to_dict() == d``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from tabulate import tabulate

from fxdp.core.config import DPConfig, make_config
from fxdp.analysis.plan_groups import GroupPlan
from fxdp.report.block_graph import graph_from_data, graph_to_data, to_dot, write_dot
from fxdp.report.overhead import CostTable, nbytes, si, symbolic_overhead

MAX_LISTED = 24


def _shape(s) -> str:
    return "(" + ", ".join(str(x) for x in s) + ")" if s is not None else "?"


def _config_to_json(config: DPConfig) -> Dict[str, Any]:
    """``as_kwargs`` with a per-input ``batch_dim`` dict as [input, dim] pairs (JSON keys are strings only)."""
    kw = config.as_kwargs()
    if isinstance(kw["batch_dim"], dict):
        kw["batch_dim"] = [[k, v] for k, v in kw["batch_dim"].items()]
    return kw


def _config_from_json(kw: Dict[str, Any]) -> DPConfig:
    kw = dict(kw)
    if isinstance(kw.get("batch_dim"), list):
        kw["batch_dim"] = {k: v for k, v in kw["batch_dim"]}
    return make_config(**kw)


@dataclass
class Report:
    rows: List[Dict[str, Any]]
    plan: GroupPlan
    config: DPConfig
    batch_size: int
    seq_len: int
    itemsize: int
    uncovered: List[str]
    unused: List[str]
    problems: List[Dict[str, Any]]
    num_params: int
    covered: List[str]
    param_sizes: Dict[str, int]
    blocks: Dict[str, str]
    block_graph: Any  # networkx.DiGraph
    forward_flops: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    # ------------------------------------------------------------- structure
    @property
    def groups(self) -> List[List[str]]:
        """Parameter names of each clip group, from the engine's plan."""
        return [list(g) for g in self.plan.groups]

    @property
    def group_labels(self) -> List[str]:
        return list(self.plan.labels)

    @property
    def thresholds(self) -> List[float]:
        """Threshold R_g = R / sqrt(G) of each group."""
        return [self.config.group_threshold(self.plan.num_groups)] * self.plan.num_groups

    @property
    def num_covered(self) -> int:
        """Trainable tensors used only where a rule covers them, without problems."""
        return len(self.covered)

    @property
    def sample_mixing(self) -> List[Dict[str, Any]]:
        """Problems where an op makes one sample's values depend on other samples."""
        return [p for p in self.problems if p["kind"] == "SampleMixingError"]

    @property
    def ok(self) -> bool:
        """True when privatize would accept the model as analysed."""
        return not self.problems

    def cost(self, B: Optional[int] = None, T: Optional[int] = None) -> CostTable:
        """Costs of every covered use at batch size B (default: the example's)
        and sequence length T (default: the example's ``seq_len``)."""
        return CostTable(self.rows, B if B is not None else self.batch_size, T, self.seq_len, self.itemsize)

    def overhead_expr(self) -> Dict[str, Any]:
        """DP overhead as sympy expressions in B and T (see ``symbolic_overhead``):
        ``{"extra_flops", "extra_memory_bytes", "plain_flops"}``."""
        return symbolic_overhead(self.rows, self.seq_len, self.itemsize)

    def to_dot(self) -> str:
        """Graphviz DOT text of :attr:`block_graph`."""
        return to_dot(self.block_graph, f"fxdp {self.config.style.value}")

    def write_dot(self, path) -> None:
        write_dot(self.block_graph, path, f"fxdp {self.config.style.value}")

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> Dict[str, Any]:
        return {
            "rows": self.rows, "groups": self.groups, "group_labels": self.group_labels,
            "thresholds": self.thresholds, "config": _config_to_json(self.config), "batch_size": self.batch_size,
            "seq_len": self.seq_len, "itemsize": self.itemsize, "uncovered": self.uncovered,
            "unused": self.unused, "problems": self.problems, "num_params": self.num_params,
            "covered": self.covered, "num_covered": self.num_covered, "param_sizes": self.param_sizes,
            "blocks": self.blocks, "block_graph": graph_to_data(self.block_graph), "forward_flops": self.forward_flops,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        groups = tuple(tuple(g) for g in d["groups"])
        plan = GroupPlan(groups, tuple(d["group_labels"]), {n: i for i, g in enumerate(groups) for n in g})
        return cls(rows=d["rows"], plan=plan, config=_config_from_json(d["config"]), batch_size=d["batch_size"],
                   seq_len=d["seq_len"], itemsize=d["itemsize"], uncovered=d["uncovered"], unused=d["unused"],
                   problems=d["problems"], num_params=d["num_params"], covered=d["covered"],
                   param_sizes=d["param_sizes"], blocks=d["blocks"], block_graph=graph_from_data(d["block_graph"]),
                   forward_flops=d["forward_flops"], notes=d["notes"])

    # -------------------------------------------------------------------- text
    def table(self) -> str:
        def cost(r, name):
            c = (r.get("costs") or {}).get(name)
            if not c:
                return "-"
            return f"{si(c.get('extra_flops', c['flops']))} / {nbytes(c.get('memory', c['workspace']) * self.itemsize)}"

        body = []
        for r in self.rows:
            where = (r["module"] or "(root)") + (f" ({r['layer']})" if r.get("layer") else "")
            path = r["path"] + (f": {r['reason'].splitlines()[0][:60]}" if r.get("reason") else "")
            body.append([r["key"] if isinstance(r["key"], int) else "-", where, r["op"], r["rule"] or "-",
                         f"{_shape(r['input'])} -> {_shape(r['output'])}", r["batch"], r.get("decision") or "-",
                         cost(r, "ghost"), cost(r, "instantiate"), r["group"], r["block"], path])
        return tabulate(body, headers=["#", "module", "op", "rule", "input -> output", "batch", "norm",
                                       "ghost +FLOP / mem", "instantiate +FLOP / mem", "group", "block", "path"])

    def summary(self) -> str:
        c = self.config
        covered_el = sum(self.param_sizes.get(n, 0) for n in self.covered)
        lines = [f"parameters covered: {self.num_covered}/{self.num_params} tensors "
                 f"({covered_el:,}/{sum(self.param_sizes.values()):,} elements)   style: {c.style.value}   "
                 f"R = {c.max_grad_norm:g}   clipping: {c.clipping_fn.value}   "
                 f"loss reduction: {c.loss_reduction.value}"]
        G = self.plan.num_groups
        if G:
            lines.append(f"clip groups: {G}, threshold R/sqrt(G) = {self.thresholds[0]:.4g} each")
        for label, g in list(zip(self.plan.labels, self.plan.groups))[:MAX_LISTED]:
            lines.append(f"  {label}: {len(g)} tensors, {sum(self.param_sizes.get(n, 0) for n in g):,} elements")
        if G > MAX_LISTED:
            lines.append(f"  ... {G - MAX_LISTED} more groups")
        blocks = list(dict.fromkeys(self.blocks.values()))
        if blocks:
            lines.append(f"blocks ({len(blocks)}): " + ", ".join(blocks[:MAX_LISTED])
                         + (" ..." if len(blocks) > MAX_LISTED else ""))
        table = self.cost()
        if table.rows:
            lines.append(table.summary())
            if self.forward_flops:
                plain = 3 * self.forward_flops
                lines.append(f"plain training of the whole model at the example batch: ~{si(plain, 'FLOP')} "
                             f"(3x the measured forward, {si(self.forward_flops, 'FLOP')}); DP adds "
                             f"{100.0 * table.extra_flops / plain:.1f}%")
            cross = table.crossovers()
            if cross:
                lines.append("ghost / instantiate crossover T* (the engine's norm_decision):")
                lines.extend("  " + x for x in cross)
        if self.unused:
            lines.append("unused trainable parameters (no gradient, private_grad stays zero): "
                         + ", ".join(self.unused))
        if self.uncovered:
            lines.append("UNCOVERED parameters (privatize refuses): " + ", ".join(self.uncovered))
        for p in self.problems:
            lines.append(f"problem ({p['kind']}): {p['message']}")
        lines.extend("note: " + n for n in self.notes)
        if not self.problems:
            lines.append("privatize accepts this model (on this example input).")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()
