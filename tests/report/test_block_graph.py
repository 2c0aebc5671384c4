"""The layer / block graph: uses as nodes, data flow as edges, blocks as attributes, DOT text."""
from __future__ import annotations

import networkx as nx
import pytest
import torch

import fxdp
from examples.models import tiny_gpt
from fxdp.analysis.plan_groups import block_labels

from .dot_check import parse_dot
from .models import UncoveredParam


@pytest.fixture(scope="module")
def report():
    model, (idx,) = tiny_gpt(batch_size=3, seq_len=8)
    return fxdp.explain(model, idx, style="block-wise"), model


def test_every_use_is_a_node_with_its_block_and_group(report):
    rep, model = report
    g = rep.block_graph
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {r["key"] for r in rep.rows} | {"input", "output"}
    blocks = block_labels(model, [n for n, p in model.named_parameters()], None)
    for r in rep.rows:
        attrs = g.nodes[r["key"]]
        assert attrs["block"] == blocks[r["params"][0]] == r["block"]
        assert attrs["group"] == r["group"] and attrs["rule"] == r["rule"] and attrs["kind"] == "use"
    assert g.graph["blocks"] == ["<before blocks>", "blocks.0", "blocks.1", "<after blocks>"]


def test_edges_follow_the_data_flow(report):
    rep, _ = report
    g = rep.block_graph
    key = {r["module"]: r["key"] for r in rep.rows if r["module"]}
    assert g.has_edge("input", key["wte"]) and not g.has_edge("input", key["wpe"])   # positions come from arange
    for b in ("blocks.0", "blocks.1"):
        assert g.has_edge(key[f"{b}.ln1"], key[f"{b}.attn.qkv"])
        assert g.has_edge(key[f"{b}.attn.qkv"], key[f"{b}.attn.proj"])        # through attention, no parameter
        assert g.has_edge(key[f"{b}.fc"], key[f"{b}.out"])                    # through gelu
    assert g.has_edge(key["wte"], key["blocks.0.ln1"])                        # residual stream
    lm_head = rep.rows[-1]["key"]
    assert g.has_edge(key["ln_f"], lm_head) and g.has_edge(lm_head, "output")
    assert nx.is_directed_acyclic_graph(g)


def test_dot_has_one_cluster_per_block_and_every_node_and_edge(report):
    rep, _ = report
    nodes, edges, clusters = parse_dot(rep.to_dot())
    assert clusters == ["<before blocks>", "blocks.0", "blocks.1", "<after blocks>"]
    assert set(nodes) == {str(k) for k in rep.block_graph.nodes}
    assert sorted(edges) == sorted((str(u), str(v)) for u, v in rep.block_graph.edges)


def test_refused_use_is_a_coloured_node_in_the_data_flow(tmp_path):
    torch.manual_seed(0)
    rep = fxdp.explain(UncoveredParam(), torch.randn(3, 6))
    g = rep.block_graph
    refused = [k for k, a in g.nodes(data=True) if a.get("kind") == "refused"]
    assert len(refused) == 1 and g.nodes[refused[0]]["status"] == "uncovered"
    assert list(g.predecessors(refused[0])) == [0] and list(g.successors(refused[0])) == [1]
    path = tmp_path / "g.dot"
    rep.write_dot(path)
    nodes, _, _ = parse_dot(path.read_text())
    assert 'color="red"' in nodes[refused[0]] and "dashed" in nodes[refused[0]]
