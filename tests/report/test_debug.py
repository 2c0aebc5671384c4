"""FXDP_DEBUG dumps: a summary line per region, one file per pass, DOT with highlights."""
from __future__ import annotations

import copy
import re

import pytest

import fxdp
from examples.models import tiny_gpt
from fxdp.analysis import PIPELINE
from fxdp.report.debug import dump_hook

from .dot_check import parse_dot


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt(batch_size=3, seq_len=8)


def run_privatized(gpt):
    model, (idx,) = gpt
    model = fxdp.privatize(copy.deepcopy(model))
    model(idx).square().mean().backward()


def pass_names():
    return ["input"] + [p.__name__ for p in PIPELINE]


def test_no_dumps_and_no_hook_when_debug_is_off(monkeypatch, tmp_path):
    monkeypatch.delenv("FXDP_DEBUG", raising=False)
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    assert dump_hook("analysis") is None
    monkeypatch.setenv("FXDP_DEBUG", "0")
    assert dump_hook("analysis") is None


def test_level_1_prints_one_summary_line_per_region_and_writes_nothing(monkeypatch, tmp_path, capfd, gpt):
    monkeypatch.setenv("FXDP_DEBUG", "1")
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    run_privatized(gpt)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fxdp[")]
    assert len(lines) == 1
    assert re.match(r"fxdp\[analysis_\d+\]: B=3, 16 parameter uses \(1 lifted\), layouts: dim 0 x16; 0 problem",
                    lines[0])
    assert list(tmp_path.iterdir()) == []


def test_level_2_writes_one_readable_file_per_pass_in_pipeline_order(monkeypatch, tmp_path, gpt):
    monkeypatch.setenv("FXDP_DEBUG", "2")
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    run_privatized(gpt)
    (region,) = list(tmp_path.iterdir())
    files = sorted(p.name for p in region.iterdir())
    assert files == [f"{i:02d}_{name}.txt" for i, name in enumerate(pass_names())]
    first = (region / "00_input.txt").read_text()
    assert "[  0]" not in first                                  # nothing captured before the first pass
    captured = (region / "01_capture_runs.txt").read_text()
    assert captured.count("<made by capture_runs>") == 16 and "layout=?" in captured
    last = (region / files[-1]).read_text()
    assert "wpe.weight" in last and " lift" in last and "changed by infer_batch_layouts, plan_lifts" in last
    assert "layout=?" not in last


def test_level_3_adds_dot_files_highlighting_what_each_pass_changed(monkeypatch, tmp_path, gpt):
    monkeypatch.setenv("FXDP_DEBUG", "3")
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    run_privatized(gpt)
    (region,) = list(tmp_path.iterdir())
    dots = sorted(p.name for p in region.glob("*.dot"))
    assert dots == [f"{i:02d}_{name}.dot" for i, name in enumerate(pass_names())]
    highlighted = {}
    for name in dots:
        nodes, edges, clusters = parse_dot((region / name).read_text())
        assert len(nodes) == 18 and len(edges) > 16 and len(clusters) == 4
        highlighted[name.split("_", 1)[1][:-4]] = sorted(k for k, a in nodes.items() if "gold" in a)
    assert highlighted["input"] == []
    assert len(highlighted["capture_runs"]) == 16 and len(highlighted["infer_batch_layouts"]) == 16
    assert highlighted["check_sample_mixing"] == []
    assert highlighted["plan_lifts"] == ["1"]                    # the position embedding gets lifted


def test_explain_regions_dump_too_and_never_overwrite(monkeypatch, tmp_path, gpt):
    monkeypatch.setenv("FXDP_DEBUG", "2")
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    model, (idx,) = gpt
    fxdp.explain(model, idx)
    fxdp.explain(model, idx)
    regions = sorted(p.name for p in tmp_path.iterdir())
    assert len(regions) == 2 and all(r.startswith("explain_") for r in regions)
