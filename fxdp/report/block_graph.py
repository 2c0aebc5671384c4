"""The layer / block graph of a model, as networkx and as Graphviz DOT.

Nodes are the parameter uses of one forward pass (keyed by their ordinal, the
numbering of analysis entries and runtime taps; refused uses by
``"refused:<k>"``) plus ``"input"`` and ``"output"``. An edge u -> v means a
tensor produced by use u reaches use v through ops that use no parameter (see
:mod:`fxdp.report.trace`). Node attributes: ``kind`` ("input", "output",
"use", "refused"), ``label``, ``module``, ``layer``, ``op``, ``rule``,
``params``, ``group`` (clip group label), ``block`` (block label: the default
blocks, or the ``block_heads`` blocks with style block-wise), ``batch`` (where
the samples are), ``status`` ("ok", "uncovered", "sample-mixing", "layout"),
``decision`` (norm method) and ``highlight`` (set by debug dumps for the uses
a pass made or changed). All attribute values are JSON types, so
``networkx.node_link_data`` round-trips.

:func:`to_dot` writes DOT text itself (no pygraphviz / pydot needed): one
cluster per block, refused and problematic uses coloured, highlighted uses
filled.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional

from fxdp.report.trace import INPUT, OUTPUT, Trace

if TYPE_CHECKING:  # networkx is imported on first use (``import fxdp`` stays light)
    import networkx as nx

STATUS_COLOURS = {"uncovered": ("red", "mistyrose"), "sample-mixing": ("darkorange", "papayawhip"),
                  "layout": ("purple", "lavender")}


def build_block_graph(trace: Trace, rows: Iterable[Dict], blocks: Optional[List[str]] = None) -> "nx.DiGraph":
    """Graph of ``trace``; ``rows`` (dicts with a ``key`` and any of the node
    attributes above) give the per-use attributes. ``blocks`` orders the clusters."""
    import networkx as nx

    by_key = {r["key"]: r for r in rows}
    g = nx.DiGraph()
    g.graph["blocks"] = list(blocks or [])
    g.graph["batch_size"] = trace.batch_size
    g.add_node(INPUT, kind="input", label="input")
    for u in trace.uses:
        row = by_key.get(u.key, {})
        attrs = {
            "kind": "use" if u.covered else "refused", "module": u.module, "layer": u.layer, "op": u.op,
            "params": list(u.param_names), "rule": row.get("rule", ""), "group": row.get("group", ""),
            "block": row.get("block", ""), "status": row.get("status", "ok" if u.covered else "uncovered"),
            "decision": row.get("decision") or "", "batch": row.get("batch", ""),
            "highlight": bool(row.get("highlight", False)),
        }
        attrs["label"] = node_label(u.key, attrs)
        g.add_node(u.key, **attrs)
    g.add_node(OUTPUT, kind="output", label="output")
    for u in trace.uses:
        for src in u.inputs:
            if src in g:
                g.add_edge(src, u.key)
    for src in trace.outputs:
        if src in g:
            g.add_edge(src, OUTPUT)
    return g


def node_label(key, attrs: Dict) -> str:
    head = f"#{key}" if isinstance(key, int) else str(key)
    where = attrs.get("module") or "(root)"
    kind = attrs.get("layer") or ""
    lines = [f"{head} {where}" + (f" ({kind})" if kind else ""), attrs.get("op", "")]
    extra = [x for x in (attrs.get("rule"), attrs.get("batch"), attrs.get("decision")) if x]
    if extra:
        lines.append(" / ".join(extra))
    if attrs.get("status", "ok") != "ok":
        lines.append(attrs["status"].upper())
    return "\n".join(lines)


def _q(text) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_dot(key, attrs: Dict) -> str:
    opts = {"label": attrs.get("label", str(key))}
    kind = attrs.get("kind")
    if kind in ("input", "output"):
        opts.update(shape="ellipse", style="bold")
    else:
        opts["shape"] = "box"
        styles = []
        colours = STATUS_COLOURS.get(attrs.get("status", "ok"))
        if colours is not None:
            opts["color"], opts["fillcolor"] = colours
            styles.append("filled")
        if attrs.get("highlight"):
            opts["fillcolor"] = "gold"
            opts["penwidth"] = "3"
            if "filled" not in styles:
                styles.append("filled")
        if kind == "refused":
            styles.append("dashed")
        if styles:
            opts["style"] = ",".join(styles)
    body = ", ".join(f"{k}={_q(v)}" for k, v in opts.items())
    return f"{_q(key)} [{body}];"


def to_dot(g: "nx.DiGraph", title: str = "fxdp") -> str:
    """Graphviz DOT text of a block graph: one cluster per block."""
    lines = [f"digraph {_q(title)} {{", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             f"  label={_q(title)};"]
    order = list(g.graph.get("blocks", []))
    for _, attrs in g.nodes(data=True):
        b = attrs.get("block")
        if b and b not in order:
            order.append(b)
    for i, block in enumerate(order):
        members = [(k, a) for k, a in g.nodes(data=True) if a.get("block") == block]
        if not members:
            continue
        lines.append(f"  subgraph {_q(f'cluster_{i}')} {{")
        lines.append(f"    label={_q(block)}; style=rounded; color=grey60;")
        lines.extend("    " + _node_dot(k, a) for k, a in members)
        lines.append("  }")
    lines.extend("  " + _node_dot(k, a) for k, a in g.nodes(data=True) if not a.get("block"))
    lines.extend(f"  {_q(u)} -> {_q(v)};" for u, v in g.edges())
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(g: "nx.DiGraph", path, title: str = "fxdp") -> None:
    """Write :func:`to_dot` of ``g`` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_dot(g, title))


def graph_to_data(g: "nx.DiGraph") -> Dict:
    """JSON-serialisable form (networkx node-link data)."""
    import networkx as nx

    return nx.node_link_data(g, edges="edges")


def graph_from_data(data: Dict) -> "nx.DiGraph":
    import networkx as nx

    return nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
