"""Recurrent layers under torch.compile(backend="fxdp"). Dynamo breaks the graph at nn.LSTM / nn.GRU / nn.RNN
unless ``torch._dynamo.config.allow_rnn`` is set: then the layer would run untapped, so fxdp refuses it at
compile time, saying which flag to set. With the flag, the fused op is one graph node that fxdp replays as the
recurrence of fxdp.rules.recurrent with every step tapped: exact against the one-sample-at-a-time reference
(float64, R at the median norm)."""
import copy

import pytest
import torch
import torch.nn as nn

import fxdp
from tests.compile.helpers import check_compiled_against_reference
from tests.rules.test_recurrent import Tagger, data, sum_ce


@pytest.mark.parametrize("cls,batch_first,style", [  # by default: both cells, both layouts
    pytest.param(nn.LSTM, True, "all-layer", marks=pytest.mark.slow), (nn.LSTM, False, "block-wise"),
    (nn.GRU, True, "layer-wise"), pytest.param(nn.GRU, False, "param-wise", marks=pytest.mark.slow)])
def test_multilayer_bidirectional_recurrent_layers_are_exact_compiled(cls, batch_first, style):
    torch.manual_seed(0)
    ids, y = data(B=4, T=3)
    with torch._dynamo.config.patch(allow_rnn=True):
        check_compiled_against_reference(Tagger(cls, batch_first=batch_first).double(), (ids,), {}, y, sum_ce,
                                         style=style, fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", [(nn.LSTM, {"proj_size": 2}), (nn.RNN, {"nonlinearity": "relu"})])
def test_projected_lstm_and_relu_rnn_are_exact_compiled_with_inductor(cls, kw):
    torch.manual_seed(1)
    ids, y = data(B=4, T=3)
    with torch._dynamo.config.patch(allow_rnn=True):
        check_compiled_against_reference(Tagger(cls, **kw).double(), (ids,), {}, y, sum_ce, compiler="inductor",
                                         rtol=1e-6)


class ReusedTagger(Tagger):
    """A class of its own: the graphs below are the only ones compiled for it."""


def test_graph_compiled_with_allow_rnn_is_reused_exactly_after_the_flag_is_turned_off():
    # the flag is read when dynamo compiles: the graph made with it (the layer inside, every step tapped) keeps
    # training exactly once it is off (a new compile with it off is refused: the tests above)
    torch.manual_seed(0)
    base = ReusedTagger(nn.GRU).double()
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3, loss_reduction="sum")
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    ids, y = data(B=4, T=3)
    with torch._dynamo.config.patch(allow_rnn=True):
        sum_ce(compiled(ids), y).backward()
    for p in model.parameters():
        p.private_grad = None
    with torch._dynamo.config.patch(allow_rnn=False):
        sum_ce(compiled(ids), y).backward()
        eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3, loss_reduction="sum")
        sum_ce(eager(ids), y).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.allclose(p.private_grad, q.private_grad, rtol=1e-10, atol=1e-12), name


class UntracedTagger(Tagger):
    """A class of its own: dynamo's cache of Tagger.forward (compiled with allow_rnn) is not reused."""


def test_recurrent_layer_dynamo_does_not_trace_is_refused_with_the_flag_to_set():
    torch.manual_seed(0)
    ids, y = data()
    model = fxdp.privatize(UntracedTagger(nn.GRU).double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    with torch._dynamo.config.patch(allow_rnn=False):
        with pytest.raises(Exception, match="(?s)rnn.*allow_rnn = True"):
            compiled(ids)
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())


class RecurrentFirst(nn.Module):
    """The recurrent layer is the forward's first parameter use: with allow_rnn off, dynamo breaks the graph at
    it before compiling any region with parameters (whose compile would refuse the model)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


def test_recurrent_layer_first_in_the_forward_untraced_is_refused_with_the_flag_to_set():
    torch.manual_seed(0)
    model = fxdp.privatize(RecurrentFirst().double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with torch._dynamo.config.patch(allow_rnn=False):
        with pytest.raises(fxdp.UncoveredParameterError, match="(?s)rnn would run outside.*allow_rnn = True"):
            sum_ce(compiled(x), y).backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())

