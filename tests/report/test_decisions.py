"""The report's ghost / instantiate decision is the one the engine takes at run time.

The runtime decision is read from real factors: a privatized forward/backward
captures each nn.Linear's input and output gradient (the tensors its tap
receives), the factor is built by the same rule code the engine runs
(``rules.bind`` + ``rule.factors``) and ``factors.sq_norm`` sets its
``decision``. (Requested: engine.last_stats["decisions"], /tmp/fxdp_bugs/report-2.md.)
"""
from __future__ import annotations

import copy

import torch.nn as nn
import torch.nn.functional as F

import fxdp
from examples.models import tiny_cnn, tiny_gpt
from fxdp.rules import OpCall, bind
from fxdp.rules.factors import sq_norm
from fxdp.core.layout import BatchLayout, LayoutKind


def runtime_linear_decisions(model, args):
    """Norm decision of every nn.Linear call in one privatized training step, in call order."""
    model = fxdp.privatize(copy.deepcopy(model), max_grad_norm=1.0)
    model(*args)                     # first forward: the batch-layout analysis runs the model on probes
    records, handles = [], []

    def hook(module, inputs, out):
        rec = {"module": module, "x": inputs[0].detach()}
        out.register_hook(lambda g: rec.__setitem__("g", g.detach()))
        records.append(rec)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(hook))
    model(*args).float().square().mean().backward()
    for h in handles:
        h.remove()
    B = args[0].shape[0]
    decisions = []
    for rec in records:
        m = rec["module"]
        names = {id(m.weight): "weight"}
        if m.bias is not None:
            names[id(m.bias)] = "bias"
        binding = bind(OpCall(F.linear, (rec["x"], m.weight, m.bias), {}, names))
        factor = binding.rule.factors(binding, {"x": rec["x"]}, rec["g"], {}, BatchLayout(LayoutKind.BATCH, 0),
                                      B)["weight"]
        sq_norm(factor)
        decisions.append(factor.decision)
    assert all(p.private_grad is not None for p in model.parameters())
    return decisions


def linear_rows(report):
    return [r for r in report.rows if r["layer"] == "Linear"]


def test_report_decisions_equal_runtime_decisions_at_the_example_shapes():
    model, (idx,) = tiny_gpt(batch_size=3, seq_len=12)
    report = fxdp.explain(model, idx)
    expected = runtime_linear_decisions(model, (idx,))
    assert [r["decision"] for r in linear_rows(report)] == expected
    assert {"ghost", "instantiate"} <= set(expected)      # T = 12 sits between the layers' crossovers


def test_cost_at_other_shapes_decides_like_the_runtime_at_those_shapes():
    model, (idx,) = tiny_gpt(batch_size=3, seq_len=32)
    report = fxdp.explain(model, idx[:2, :8])                 # example: B = 2, T = 8 (all ghost)
    assert {r["decision"] for r in linear_rows(report)} == {"ghost"}
    table = report.cost(B=3, T=32)
    keys = [r["key"] for r in linear_rows(report)]
    assert [table.decisions[k] for k in keys] == runtime_linear_decisions(model, (idx,))


def test_outer_product_decision_for_one_row_per_sample():
    model, args = tiny_cnn(batch_size=3, image_size=8)
    report = fxdp.explain(model, *args)
    assert [r["decision"] for r in linear_rows(report)] == runtime_linear_decisions(model, args) == ["outer"]
