"""The embedding family: per-sample norms count repeated ids once per pair (Σ_{t,s} 1[x_t = x_s]⟨g_t, g_s⟩),
padding_idx rows get no gradient, clipped sums use index_add (never one-hot), and the cross term with a
tied linear head is exact."""
import torch
import torch.nn.functional as F

from tests.reference import assert_factor_matches, assert_inner_matches, rule_case

D = torch.float64


def test_repeated_ids_and_padding_idx():
    E = torch.randn(7, 4, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ids = torch.tensor([[1, 3, 1, 0, 1], [2, 2, 0, 0, 6], [5, 4, 3, 2, 1]])
    factors, ref = rule_case(F.embedding, (ids, E), {"E": E}, kwargs=dict(padding_idx=0))
    assert ref["E"][:, 0].abs().max() == 0
    assert_factor_matches(factors["E"], ref["E"])


def test_cross_term_with_a_tied_linear_head():
    E = torch.randn(9, 4, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ids = torch.tensor([[1, 3, 1, 8], [2, 2, 0, 5]])
    h = torch.randn(2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    fe, re = rule_case(F.embedding, (ids, E), {"E": E}, seed=2)
    fl, rl = rule_case(F.linear, (h, E), {"E": E}, seed=3)
    assert_inner_matches(fe["E"], fl["E"], re["E"], rl["E"])
    assert_inner_matches(fl["E"], fe["E"], rl["E"], re["E"])


def test_cross_term_of_two_embedding_lookups():
    E = torch.randn(6, 3, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    f1, r1 = rule_case(F.embedding, (torch.tensor([[1, 2, 2], [0, 5, 1]]), E), {"E": E}, seed=1)
    f2, r2 = rule_case(F.embedding, (torch.tensor([[2, 4], [1, 1]]), E), {"E": E}, seed=2)
    assert_inner_matches(f1["E"], f2["E"], r1["E"], r2["E"])
