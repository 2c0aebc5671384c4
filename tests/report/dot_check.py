"""A small structural check of DOT text (no graphviz needed): balanced braces,
quoted statements, every edge between declared nodes."""
from __future__ import annotations

import re

NODE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" \[(.*)\];$')
EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)";$')


def parse_dot(text: str):
    """Return (nodes: {name: attr text}, edges: [(u, v)], clusters: [label]); assert well-formed."""
    lines = text.strip().splitlines()
    assert lines[0].startswith("digraph ") and lines[0].endswith("{") and lines[-1] == "}"
    depth, nodes, edges, clusters = 0, {}, [], []
    for line in lines:
        depth += line.count("{") - line.count("}") if not NODE.match(line) else 0
        assert depth >= 0
        m = NODE.match(line)
        if m:
            nodes[m.group(1)] = m.group(2)
            continue
        m = EDGE.match(line)
        if m:
            edges.append((m.group(1), m.group(2)))
            continue
        if line.strip().startswith("label=") and "style=rounded" in line:
            clusters.append(re.match(r'\s*label="((?:[^"\\]|\\.)*)"', line).group(1))
    assert depth == 0
    assert all(u in nodes and v in nodes for u, v in edges)
    return nodes, edges, clusters
