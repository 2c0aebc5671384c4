"""Level-3 debug dumps: the layer / block graph of an analysed model after each pass, as Graphviz DOT.

The text dumps and the FXDP_DEBUG levels are the pass runner's
(:mod:`fxdp.analysis.dumps`); this module draws the graph, which needs the
report's trace and block graph, and installs itself there on import.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from fxdp.analysis.dumps import (PassTracker, debug_level, describe_analysis, dump_hook, install_graph_dumper,
                                 new_dump_folder, status_of, summary_line)

__all__ = ["PassTracker", "debug_level", "describe_analysis", "dump_hook", "new_dump_folder", "status_of",
           "summary_line"]


class _DotDumper:
    """Level 3: the layer graph of the analysed model after each pass."""

    def __init__(self, analysis, plan):
        from fxdp.analysis.plan_groups import block_labels
        from fxdp.report.trace import trace_model

        base = list(range(min(analysis.batch_size, 3)))
        self.trace = trace_model(analysis.model, analysis.args, analysis.kwargs, analysis.batch_size,
                                 analysis.batch_dim, samples=base)
        names = [n for n, p in analysis.model.named_parameters() if p.requires_grad]
        engine = analysis.model.__dict__.get("_fxdp_engine")
        plan = plan if plan is not None else (engine.plan if engine is not None else None)
        heads = engine.config.block_heads if engine is not None else None
        self.blocks = block_labels(analysis.model, names, heads)
        self.group = ({n: plan.labels[g] for n, g in plan.group_of.items()} if plan is not None else {})

    def rows(self, analysis, tracker: PassTracker, touched: List[int]):
        rows = []
        by_ordinal = {e.ordinal: e for e in analysis.entries}
        for u in self.trace.uses:
            row = {"key": u.key, "block": self.blocks.get(u.param_names[0], "") if u.param_names else "",
                   "group": ", ".join(sorted({self.group[n] for n in u.param_names if n in self.group}))}
            e = by_ordinal.get(u.key) if u.covered else None
            if e is not None:
                row["rule"] = e.rule
                row["batch"] = e.layout.describe() + (" (lifted)" if e.lift else "") if e.layout else "?"
                row["status"] = tracker.status.get(e.ordinal, "ok")
                row["highlight"] = e.ordinal in touched
            rows.append(row)
        return rows

    def write(self, path: Path, title: str, analysis, tracker, touched):
        from fxdp.report.block_graph import build_block_graph, write_dot

        g = build_block_graph(self.trace, self.rows(analysis, tracker, touched), sorted(set(self.blocks.values())))
        write_dot(g, path, title)


def _write_dot(path: Path, title: str, analysis, tracker, touched, state, plan):
    try:
        if state["dot"] is None:
            state["dot"] = _DotDumper(analysis, plan)
        state["dot"].write(path, title, analysis, tracker, touched)
    except Exception as exc:  # a dump must never change what the analysis decides
        path.write_text(f"// fxdp: could not draw the layer graph: {type(exc).__name__}: {exc}\n"
                        f"digraph {{ }}\n")


install_graph_dumper(_write_dot)
