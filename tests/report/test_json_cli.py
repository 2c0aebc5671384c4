"""Report.to_dict is JSON and round-trips; the command line runs on the example factories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import fxdp
from examples.models import tiny_gpt
from fxdp.report import Report

from .dot_check import parse_dot
from .models import BatchNormTrain

ROOT = Path(__file__).resolve().parents[2]


def roundtrip(report):
    data = json.loads(json.dumps(report.to_dict()))
    again = Report.from_dict(data)
    assert again.to_dict() == data
    return again


def test_json_roundtrip_keeps_rows_groups_graph_and_costs():
    model, (idx,) = tiny_gpt(batch_size=3, seq_len=8)
    report = fxdp.explain(model, idx, style="block-wise", max_grad_norm=0.5)
    again = roundtrip(report)
    assert again.groups == report.groups and again.rows == report.rows
    assert again.config == report.config
    assert sorted(map(str, again.block_graph.edges)) == sorted(map(str, report.block_graph.edges))
    assert str(again) == str(report)
    assert again.cost(B=32, T=64).to_dict() == report.cost(B=32, T=64).to_dict()


def test_json_roundtrip_of_a_refused_model():
    torch.manual_seed(0)
    report = fxdp.explain(BatchNormTrain().train(), torch.randn(4, 6))
    again = roundtrip(report)
    assert again.problems == report.problems and again.uncovered == report.uncovered
    assert again.sample_mixing


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FXDP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fxdp", "explain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_explains_the_example_factory_as_json_and_writes_dot(tmp_path):
    dot = tmp_path / "gpt.dot"
    res = run_cli("examples.models:tiny_gpt", "--batch", "3", "--style", "block-wise", "--json",
                  "--dot", str(dot), "--cost", "B=64,T=1024")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["batch_size"] == 3 and data["config"]["style"] == "block-wise"
    assert len(data["rows"]) == 16 and data["problems"] == []
    assert data["cost_at"]["batch_size"] == 64 and data["cost_at"]["seq_len"] == 1024
    assert Report.from_dict(data).to_dict() == {k: v for k, v in data.items() if k != "cost_at"}
    nodes, edges, clusters = parse_dot(dot.read_text())
    assert len(nodes) == 18 and len(clusters) == 4


def test_cli_prints_the_table_and_fails_on_a_refused_model_given_by_path():
    res = run_cli(str(Path(__file__).with_name("models.py")) + ":refused_factory", "--batch", "3")
    assert res.returncode == 1, res.stderr
    assert "torch.broadcast_tensors" in res.stdout and "UNCOVERED parameters (privatize refuses): w" in res.stdout


def test_cli_usage_errors_exit_2(capsys):
    from fxdp.cli import main

    assert main(["explain", "examples.models:no_such_factory"]) == 2
    assert "no function 'no_such_factory'" in capsys.readouterr().err
    assert main(["explain", "examples.models:tiny_gpt", "--cost", "B=x"]) == 2
    assert main(["explain", "no_such_module_fxdp:f"]) == 2


def test_json_roundtrip_keeps_a_per_input_batch_dim():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    report = fxdp.explain(enc, torch.randn(5, 3, 8), batch_dim={0: 1})
    assert report.ok, report.problems
    again = roundtrip(report)
    assert again.config.batch_dim_spec == {0: 1} == report.config.batch_dim_spec
