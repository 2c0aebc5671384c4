"""finalize packs small dense per-sample gradients of one clip group side by side: the packed norms and
clipped sums are those of the factors one by one (same groups, same masked samples)."""
import torch

from fxdp.engine import finalize
from fxdp.engine.clipping import ClipResult
from fxdp.rules import factors as F

B = 5


def _per_param(gen):
    shapes = {"a.bias": (7,), "a.weight_ln": (3, 4), "b.bias": (6,), "c.bias": (2,), "d.weight": (8, 9)}
    out = {n: [F.DenseGrad(torch.randn(B, *s, generator=gen, dtype=torch.float64))] for n, s in shapes.items()}
    big = torch.randn(B, 300, 300, generator=gen, dtype=torch.float64)  # over PACK_NUMEL: not packed
    out["e.weight"] = [F.DenseGrad(big)]
    out["d.weight"].append(F.DenseGrad(torch.randn(B, 1, 8, 9, generator=gen, dtype=torch.float64)[:, 0]))
    return out


GROUP_OF = {"a.bias": 0, "a.weight_ln": 0, "b.bias": 1, "c.bias": 0, "d.weight": 1, "e.weight": 1}


def _expected(per_param, coefs, keep):
    sq, sums = {}, {}
    for name, fs in per_param.items():
        g = sum(f.grad for f in fs)
        sq[GROUP_OF[name]] = sq.get(GROUP_OF[name], 0) + g.reshape(B, -1).square().sum(1)
        kept = torch.where(keep.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros((), dtype=g.dtype))
        sums[name] = torch.einsum("b,b...->...", coefs[GROUP_OF[name]], kept)
    return sq, sums


def test_packed_norms_and_clipped_sums_equal_the_factors_one_by_one():
    gen = torch.Generator().manual_seed(0)
    per_param = _per_param(gen)
    coefs = {0: torch.rand(B, generator=gen, dtype=torch.float64),
             1: torch.rand(B, generator=gen, dtype=torch.float64)}
    keep = torch.tensor([True, True, False, True, True])
    per_param[next(iter(per_param))][0].grad[2] = float("nan")  # a non-finite sample is removed entirely
    expected_sq, expected_sums = _expected({n: [F.DenseGrad(f.grad.clone()) for f in fs]
                                            for n, fs in per_param.items()}, coefs, keep)
    sq = finalize.group_norms(per_param, GROUP_OF, scale=1.0)
    assert isinstance(per_param["a.bias"][0], finalize.PackedGrad)
    assert per_param["a.bias"][0].pack is per_param["c.bias"][0].pack          # same group, packed together
    assert isinstance(per_param["b.bias"][0], F.DenseGrad)   # alone in its group: never packed with group 0
    assert isinstance(per_param["e.weight"][0], F.DenseGrad) and len(per_param["d.weight"]) == 2  # big / several uses
    for g in (0, 1):
        torch.testing.assert_close(sq[g][keep], expected_sq[g][keep])
    params = {n: torch.nn.Parameter(torch.zeros(t.shape, dtype=torch.float64)) for n, t in expected_sums.items()}
    result = ClipResult(coefs, keep, {}, int((~keep).sum()))
    finalize.write_private_grads(params, list(params), per_param, result, GROUP_OF, 1.0, on_write=lambda p: None)
    for name, p in params.items():
        torch.testing.assert_close(p.private_grad, expected_sums[name])
        assert p.private_grad.untyped_storage().data_ptr() != params["a.bias"].private_grad.untyped_storage().data_ptr() \
            or name == "a.bias"  # each parameter owns its private gradient
