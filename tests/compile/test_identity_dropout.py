"""Dropout applied to a (virtual) parameter before it meets the batch (DeBERTa-v2's
``pos_dropout(rel_embeddings)``) under torch.compile(backend="fxdp"), as in eager privatize: inactive (p = 0,
or ``training=False``) it is the identity and the model trains exactly against the one-sample-at-a-time
reference; active, it is refused with eager's error (one mask for the whole batch, which per-sample
gradients cannot replay), before any gradient is formed."""
import pytest
import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

import fxdp
from fxdp.compile.identity_dropout import alias_source
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



def test_dropout_on_a_parameter_with_a_rate_dynamo_made_a_graph_input_is_refused():
    # dynamo makes a float attribute a graph input once it changed between calls (whether it does depends on the
    # process's compile history, so the node is built here): inactive now, it could be active when reused
    g = fx.Graph()
    w, p = g.placeholder("w"), g.placeholder("p")
    weight = torch.zeros(3)
    with pytest.raises(fxdp.UncoveredParameterError, match=r"dynamo made an input of the graph.*specialize_float"):
        alias_source(g.call_function(F.dropout, (w, p, True)), weight, {w: weight, p: 0.0}, {w})
    assert alias_source(g.call_function(F.dropout, (w, p, False)), weight, {w: weight, p: 0.3}, {w}) is w
    assert alias_source(g.call_function(F.dropout, (w, 0.0, True)), weight, {w: weight}, {w}) is w
    assert alias_source(g.call_function(F.dropout, (w, 0.0, True)), weight, {w: weight}, set()) is None
