"""The recorder's layout table matches call sites by ordinal AND by op and parameter names, so a forward
that takes another path is never given another site's batch layout; input structures are keyed by what
changes the analysis (dtype, rank, batch dim, train/eval)."""
import torch
import torch.nn as nn

from fxdp.analysis.state import Entry
from fxdp.core.layout import BatchLayout, LayoutKind
from fxdp.engine.recorder import LayoutTable, structure_key, trivial_layout


def _entry(i, op, names, dim):
    return Entry(i, op, "linear", names, None, (), (), layout=BatchLayout(LayoutKind.BATCH, dim))


def test_lookup_requires_the_same_op_and_parameters_at_the_ordinal():
    table = LayoutTable([_entry(0, "F.linear", ("a.weight",), 0), _entry(1, "F.linear", ("b.weight",), 1)])
    assert table.lookup(1, "F.linear", ("b.weight",)) == (BatchLayout(LayoutKind.BATCH, 1), False)
    assert table.lookup(1, "F.linear", ("a.weight",)) == (None, False)
    assert table.lookup(2, "F.linear", ("b.weight",)) == (None, False)
    assert table.layout_of(0, "linear", ("a.weight",)) == BatchLayout(LayoutKind.BATCH, 0)
    assert table.layout_of(0, "conv", ("a.weight",)) is None


def test_structure_key_changes_with_dtype_rank_and_mode():
    model = nn.Linear(3, 2)
    base = structure_key(model, (torch.zeros(4, 3),), {}, 4, 0)
    assert structure_key(model, (torch.zeros(7, 3),), {}, 7, 0) == base          # B is never baked in
    assert structure_key(model, (torch.zeros(4, 3).double(),), {}, 4, 0) != base
    assert structure_key(model, (torch.zeros(4, 1, 3),), {}, 4, 0) != base
    model.eval()
    assert structure_key(model, (torch.zeros(4, 3),), {}, 4, 0) != base


def test_trivial_layout_of_a_batch_of_one():
    assert trivial_layout(torch.zeros(1, 5)) == BatchLayout(LayoutKind.BATCH, 0)
    assert trivial_layout(torch.zeros(5)) == BatchLayout(LayoutKind.WHOLE, 0)
