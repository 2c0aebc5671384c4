"""Half-precision models (``model.bfloat16()`` / ``.half()``): per-sample norms -- ghost Grams, instantiated
per-sample gradients, cross terms of tied weights, bias and norm-layer sums -- are computed in float32, the
same values give the clipped sum (accumulated in float32), so one example moves the clipped sum by at most
R (1 + 1e-5) before the noise. A norm computed in bf16 (relative error up to 2^-9) would clip an example to
R (1 +- 2e-3), which the bound below refuses; every removed example is clipped (norm > R), so the removal
moves the sum by R itself, not by less (the test is not vacuous)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.privacy.neighbours import delta_norms, drop, private_sum


class TokenModel(nn.Module):
    """Tied embedding / output head (cross terms), LayerNorm, two Linear layers (one instantiated, one
    ghost at T = 6), biases summed over positions."""

    def __init__(self, vocab=24, d=16, hidden=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = h + self.down(torch.tanh(self.up(h)))
        return F.linear(h, self.emb.weight).mean(1)


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_example_moves_the_clipped_sum_of_a_half_precision_model_by_at_most_R(dtype, style):
    torch.manual_seed(0)
    B, T, R = 384, 6, 1e-3
    model = TokenModel().to(dtype)
    ids = torch.randint(0, 24, (B, T))
    y = torch.randint(0, 24, (B,))
    fxdp.privatize(model, style=style, max_grad_norm=R, loss_reduction="sum")
    engine = fxdp.get_engine(model)
    groups = [list(g) for g in engine.plan.groups]

    def ce_sum(out, t):
        return F.cross_entropy(out.float(), t, reduction="sum")

    ce_sum(model(ids), y).backward()
    assert all(p.private_grad.dtype == torch.float32 for p in model.parameters())
    full = private_sum(model, [((ids,), y)], ce_sum, "sum")
    norms = engine.last_stats["group_norms"]
    assert all(n.dtype == torch.float32 and bool((n > R).all()) for n in norms.values())  # every example clipped
    decisions = set(engine.last_stats["decisions"].values())
    assert {"ghost", "instantiate"} <= decisions
    worst = 0.0
    for i in (0, 101, B - 1):
        a, t = drop((ids,), y, i)
        move = delta_norms(full, private_sum(model, [(a, t)], ce_sum, "sum"), groups)[0]
        assert move >= R * (1 - 1e-3)
        worst = max(worst, move)
    assert worst <= R * (1 + 1e-5), f"{worst / R - 1:.2e}"
