"""Factor algebra: norms, cross terms and clipped sums equal their materialised forms."""
import pytest
import torch

from fxdp.rules import factors as F


def _lowrank(B=3, G=1, T=5, m=4, n=6):
    return F.LowRankGrad(torch.randn(B, G, T, m, dtype=torch.float64), torch.randn(B, G, T, n, dtype=torch.float64),
                         torch.Size([G * m, n]))


def _embedding(B=3, T=5, V=7, d=6):
    idx = torch.randint(0, V, (B, T))
    idx[:, 0] = idx[:, 1]  # repeated tokens exercise the cross terms
    return F.EmbeddingGrad(idx, torch.randn(B, T, d, dtype=torch.float64), torch.Size([V, d]))


@pytest.mark.parametrize("T,m,n,decision", [(1, 4, 6, "outer"), (2, 16, 12, "ghost"), (5, 4, 6, "instantiate")])
def test_lowrank_squared_norm_equals_materialised_norm_for_each_method(T, m, n, decision):
    f = _lowrank(T=T, m=m, n=n, G=2)
    f.shape = torch.Size([2 * m, n])
    expected = f.materialize().flatten(1).square().sum(1)
    torch.testing.assert_close(F.sq_norm(f), expected)
    assert f.decision == decision == F.norm_decision(T, m, n)


@pytest.mark.parametrize("T", [64, 128, 131, 300])
def test_ghost_norm_from_the_upper_block_triangle_of_the_grams_equals_the_full_gram_norm(T):
    f = _lowrank(B=2, G=2, T=T, m=5, n=3)
    expected = f.materialize().flatten(1).square().sum(1)
    torch.testing.assert_close(F._ghost_sq_norm(f.left, f.right), expected)


def test_embedding_squared_norm_counts_repeated_tokens_once_per_row():
    f = _embedding()
    torch.testing.assert_close(F.sq_norm(f), f.materialize().flatten(1).square().sum(1))


@pytest.mark.parametrize("pair", ["lowrank-lowrank", "emb-emb", "emb-lowrank", "lowrank-emb", "dense-lowrank",
                                  "emb-dense", "dense-emb"])
def test_cross_term_equals_inner_product_of_materialised_gradients(pair):
    B, V, d = 3, 7, 6
    lr = F.LowRankGrad(torch.randn(B, 1, 4, V, dtype=torch.float64), torch.randn(B, 1, 4, d, dtype=torch.float64),
                       torch.Size([V, d]))
    lr2 = F.LowRankGrad(torch.randn(B, 1, 9, V, dtype=torch.float64), torch.randn(B, 1, 9, d, dtype=torch.float64),
                        torch.Size([V, d]))
    e1, e2 = _embedding(B, 5, V, d), _embedding(B, 3, V, d)
    dense = F.DenseGrad(torch.randn(B, V, d, dtype=torch.float64))
    a, b = {"lowrank-lowrank": (lr, lr2), "emb-emb": (e1, e2), "emb-lowrank": (e1, lr),
            "lowrank-emb": (lr, e2), "dense-lowrank": (dense, lr), "emb-dense": (e1, dense),
            "dense-emb": (dense, e2)}[pair]
    expected = (a.materialize() * b.materialize()).flatten(1).sum(1)
    torch.testing.assert_close(F.inner(a, b), expected)


@pytest.mark.parametrize("T,m,n", [(2, 16, 12), (9, 4, 6)], ids=["ghost", "instantiate"])
def test_prepare_instantiates_exactly_the_factors_whose_norm_is_instantiated(T, m, n):
    f = _lowrank(B=3, G=2, T=T, m=m, n=n)
    f.shape = torch.Size([2 * m, n])
    g = F.prepare(f)
    if F.norm_decision(T, m, n) == "ghost":
        assert g is f
        return
    assert isinstance(g, F.DenseGrad) and g.decision == f.decision == "instantiate"
    torch.testing.assert_close(g.grad, f.materialize())
    coef = torch.rand(3, dtype=torch.float64)
    torch.testing.assert_close(F.clipped_sum(g, coef), F.clipped_sum(f, coef))
    torch.testing.assert_close(F.sq_norm(g), F.sq_norm(f))


@pytest.mark.parametrize("kind", ["lowrank", "lowrank-one-group-tall", "embedding", "dense"])
def test_clipped_sum_equals_weighted_sum_of_materialised_gradients(kind):
    f = {"lowrank": _lowrank(G=2), "lowrank-one-group-tall": _lowrank(G=1, m=7, n=3), "embedding": _embedding(),
         "dense": F.DenseGrad(torch.randn(3, 4, 5, dtype=torch.float64))}[kind]
    if kind == "lowrank":
        f.shape = torch.Size([8, 6])
    if kind == "lowrank-one-group-tall":
        f.shape = torch.Size([7, 3])
    coef = torch.rand(3, dtype=torch.float64)
    expected = (coef.view(-1, *[1] * len(f.shape)) * f.materialize()).sum(0)
    torch.testing.assert_close(F.clipped_sum(f, coef), expected)


def test_clipped_sum_drops_non_finite_samples_without_poisoning_the_sum():
    f = _lowrank()
    f.left[1, 0, 2, 0] = float("nan")
    keep = torch.tensor([True, False, True])
    coef = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    out = F.clipped_sum(f, coef, keep)
    assert torch.isfinite(out).all()
    good = f.materialize()[[0, 2]]
    torch.testing.assert_close(out, 0.5 * good[0] + 2.0 * good[1])


def test_norms_of_half_precision_factors_are_computed_in_float32():
    f = F.LowRankGrad(torch.randn(2, 1, 3, 4).bfloat16(), torch.randn(2, 1, 3, 5).bfloat16(), torch.Size([4, 5]))
    assert F.sq_norm(f).dtype == torch.float32
    assert F.clipped_sum(f, torch.ones(2)).dtype == torch.float32
