"""Dropout applied to a (virtual) parameter before it meets the batch (DeBERTa-v2's
``pos_dropout(rel_embeddings)``) under torch.compile(backend="fxdp"), as in eager privatize: inactive (p = 0,
or ``training=False``) it is the identity and the model trains exactly against the one-sample-at-a-time
reference; active, it is refused with eager's error (one mask for the whole batch, which per-sample
gradients cannot replay), before any gradient is formed."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

import fxdp
from fxdp.compile.identity_dropout import alias_source, remove_aliases
from tests.compile.helpers import check_compiled_against_reference

B, T, D = 5, 4, 6


class PositionDropout(nn.Module):
    """A position table dropped (``F.dropout(table, p, training)``) before it is added to the batch; ``source``
    "virtual" drops a batch-free transform of it (its transpose, a virtual parameter) instead."""

    def __init__(self, p=0.0, training=None, source="param"):
        super().__init__()
        self.p, self.drop_training, self.source = p, training, source
        self.pos = nn.Parameter(torch.randn(T, D) if source == "param" else torch.randn(D, T))
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        pos = self.pos if self.source == "param" else self.pos.t()
        pos = F.dropout(pos, self.p, self.training if self.drop_training is None else self.drop_training)
        return self.fc(torch.tanh(x + pos)).sum(1)


def _sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("kw", [{}, {"source": "virtual"}, {"p": 0.3, "training": False}],
                         ids=["p0-parameter", "p0-virtual", "training-false"])
def test_inactive_dropout_on_a_parameter_is_the_identity_and_exact_compiled(kw):
    torch.manual_seed(0)
    x, y = _data()
    m = check_compiled_against_reference(PositionDropout(**kw).double().train(), (x,), {}, y, _sum_ce)
    assert m.pos.private_grad.abs().sum() > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_active_dropout_on_a_parameter_is_refused_compiled_as_in_eager(compiled):
    torch.manual_seed(0)
    x, y = _data()
    model = fxdp.privatize(PositionDropout(p=0.3).double().train())
    run = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}) if compiled else model
    with pytest.raises(fxdp.UncoveredParameterError,
                       match=r"F.dropout with p=0.3 applied to pos directly, before it meets the batch.*Set that "
                             r"dropout's p to 0"):
        _sum_ce(run(x), y).backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())



class RateChanges(PositionDropout):
    """Its own forward (its own dynamo frame state): a dropout rate changed between calls."""

    def forward(self, x):
        return self.fc(torch.tanh(x + F.dropout(self.pos, self.p, self.training and self.drop_training))).sum(1)


def test_dropout_on_a_parameter_whose_rate_changes_between_calls_is_exact_at_p0_and_refused_when_active():
    # once p changed, dynamo makes it a graph input: the graph compiled at p = 0 drops the dropout and checks
    # the rate at run time (fxdp::inactive_dropout)
    x, y = _data()
    torch.manual_seed(0)
    base = RateChanges(p=0.3, training=False).double().train()
    model = fxdp.privatize(copy.deepcopy(base), loss_reduction="sum")
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    _sum_ce(compiled(x), y).backward()
    model.p, model.drop_training, base.p, base.drop_training = 0.0, True, 0.0, True
    for p in model.parameters():
        p.private_grad = None
    _sum_ce(compiled(x), y).backward()
    eager = fxdp.privatize(copy.deepcopy(base), loss_reduction="sum")
    _sum_ce(eager(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(p.private_grad, q.private_grad, rtol=1e-10, atol=1e-12), name
    model.p = 0.4
    with pytest.raises(fxdp.UncoveredParameterError, match=r"F.dropout with p=0.4 applied to pos directly"):
        _sum_ce(compiled(x), y).backward()


def test_erased_dropout_with_a_rate_that_is_a_graph_input_refuses_an_active_rate_at_run_time():
    # dynamo also guards p == its compile-time value today; the run-time check does not rely on that guard
    g = fx.Graph()
    w, p = g.placeholder("w"), g.placeholder("p")
    dropped = g.call_function(F.dropout, (w, p, True))
    g.output(g.call_function(torch.add, (dropped, 1.0)))
    gm = fx.GraphModule(nn.Module(), g)
    weight = torch.zeros(3)
    assert alias_source(dropped, weight, {w: weight, p: 0.0}, {w}) is w
    remove_aliases(gm, {dropped: w}, [], {w: "pos"})
    gm.recompile()
    assert not any(n.target is F.dropout for n in gm.graph.nodes)
    assert torch.equal(gm(weight, 0.0), weight + 1)
    with pytest.raises(fxdp.UncoveredParameterError, match=r"F.dropout with p=0.3 applied to pos directly"):
        gm(weight, 0.3)
    g2 = fx.Graph()
    w2, t2 = g2.placeholder("w"), g2.placeholder("training")
    with pytest.raises(fxdp.UncoveredParameterError, match="training flag that is an input of the graph"):
        alias_source(g2.call_function(F.dropout, (w2, 0.0, t2)), weight, {w2: weight, t2: True}, {w2})
