"""Batch-layout analysis: samples are located by permutation, never by size."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.analysis import PIPELINE, Analysis, run_pipeline
from fxdp.core.layout import BatchLayout, LayoutKind
from tests.reference import check_against_reference


def _analyse(model, *args, strict=True, **kwargs):
    B = args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]
    return run_pipeline(Analysis(model, args, kwargs, B, 0, strict=strict), PIPELINE)


class SeqFirst(nn.Module):
    """Works on (T, B, d) internally and flattens rows T-major, like nn.MultiheadAttention."""

    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):                       # x: (B, T, d)
        h = torch.tanh(self.a(x.transpose(0, 1)))   # (T, B, d): batch on dim 1
        T, B, d = h.shape
        h = self.b(h.reshape(T * B, d))              # rows t*B + b: sample-minor
        return self.head(h.view(T, B, d).mean(0))


def test_seq_first_and_t_major_flattened_rows_are_found():
    torch.manual_seed(0)
    analysis = _analyse(SeqFirst(), torch.randn(4, 3, 5))
    layouts = [e.layout for e in analysis.entries]
    assert layouts[0] == BatchLayout(LayoutKind.BATCH, 1)
    assert layouts[1] == BatchLayout(LayoutKind.ROWS_MINOR, 0)
    assert layouts[2] == BatchLayout(LayoutKind.BATCH, 0)


def test_seq_first_model_gradients_equal_the_reference():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        x, y = torch.randn(5, 5, 5), torch.randint(0, 2, (5,))  # B == T == d
        check_against_reference(SeqFirst(), (x,), {}, y,
                                lambda o, t: F.cross_entropy(o, t, reduction="sum"), style="layer-wise")
    finally:
        torch.set_default_dtype(torch.float32)


class PositionIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)

    def forward(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))


def test_position_ids_without_batch_dimension_are_lifted_and_verified():
    analysis = _analyse(PositionIds(), torch.randint(0, 10, (3, 6)))
    pos = analysis.entries[1]
    assert pos.lift and pos.layout == BatchLayout(LayoutKind.BATCH, 0)
    assert "lifted" in analysis.runs


class SummedPositions(nn.Module):
    """The position embedding is summed before it meets the batch: lifting would change the output."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1]).unsqueeze(0)).sum()
        return self.tok(ids) + p


def test_batch_free_use_that_cannot_be_lifted_is_refused():
    with pytest.raises(fxdp.UncoveredParameterError, match="changes the model's output"):
        _analyse(SummedPositions(), torch.randint(0, 10, (3, 6)))


class TableBias(nn.Module):
    """A parameter used on a batch-free tensor with no leading 1 (like T5's relative bias)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Embedding(8, 2)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        T = x.shape[1]
        rel = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(0, 7)
        return self.fc(x) + self.bias(rel).sum(-1)[None, :, :4]


def test_parameter_applied_to_batch_free_index_is_a_virtual_parameter_and_exact():
    """Was refused; now the lookup is a virtual parameter whose per-sample gradient is formed where it
    meets the batch (fxdp.rules.virtual)."""
    analysis = _analyse(TableBias(), torch.randn(3, 4, 4))
    assert [e.virtual for e in analysis.entries][:2] == [False, True]
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        x, y = torch.randn(5, 4, 4), torch.randn(5, 4, 4)
        check_against_reference(TableBias(), (x,), {}, y, lambda o, t: ((o - t) ** 2).sum(), loss_reduction="sum")
    finally:
        torch.set_default_dtype(torch.float32)


class ViaPython(nn.Module):
    """An id computed from all samples that reaches the lookup through Python: invisible to the dataflow."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(2, 4)

    def forward(self, x):
        k = int((x[:, 0] > 0).sum()) % 2
        return x + self.table(torch.tensor([k, k])).sum(0)


def test_parameter_on_sample_values_routed_through_python_is_refused():
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 1, 0, 0]])
    with pytest.raises(fxdp.UncoveredParameterError, match="changes with them"):
        _analyse(ViaPython(), x)


def test_identical_samples_in_flattened_rows_are_located_from_perturbed_copies():
    """A batch of one repeated sample tells nothing about the layout; the analysis perturbs its own copy."""
    x = torch.randn(1, 3, 5).expand(4, 3, 5).contiguous()
    analysis = _analyse(SeqFirst(), x)
    assert [e.layout for e in analysis.entries] == [BatchLayout(LayoutKind.BATCH, 1),
                                                    BatchLayout(LayoutKind.ROWS_MINOR, 0),
                                                    BatchLayout(LayoutKind.BATCH, 0)]
    assert any("perturbed" in line for line in analysis.log)


def test_explain_mode_collects_problems_instead_of_raising():
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 1, 0, 0]])
    analysis = _analyse(ViaPython(), x, strict=False)
    assert analysis.problems and isinstance(analysis.problems[0], fxdp.UncoveredParameterError)


def test_analysis_leaves_buffers_and_rng_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.GroupNorm(1, 4))
    model.register_buffer("counter", torch.zeros(1))
    x = torch.randn(3, 4)
    state = torch.get_rng_state()
    _analyse(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.counter.item() == 0


@pytest.mark.parametrize("model_fn,shape", [(SeqFirst, (1, 4, 5)), (lambda: __import__("tests.models_zoo", fromlist=["RawParams"]).RawParams(), (1, 4, 6))])
def test_batch_of_one_before_any_analysis_is_exact(model_fn, shape):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        x, y = torch.randn(*shape), torch.randint(0, 2, (1,))
        check_against_reference(model_fn(), (x,), {}, y, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                style="param-wise", R=1e-3)
    finally:
        torch.set_default_dtype(torch.float32)


class ExpandThenAverage(nn.Module):
    """Forward values stay per-sample, but each expanded row gets the whole batch's gradient."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4))
        self.l = nn.Linear(4, 2)

    def forward(self, x):
        pos = self.pos.expand(x.shape[0], -1)
        return self.l(x + 10 * pos.mean(0))


def test_sample_mixing_visible_only_in_gradients_is_refused():
    with pytest.raises(fxdp.SampleMixingError, match="gradients mix samples"):
        _analyse(ExpandThenAverage(), torch.randn(4, 4))
