"""Virtual parameters (fxdp.rules.virtual): u = f(theta) computed before it meets the batch.

Each model is checked against the one-sample-at-a-time reference (float64, R at the median norm): views,
transposes and casts (isometries: factors keep their low-rank / embedding structure), gathers with a fixed
index (embedding factors), elementwise functions and reparametrisations (per-sample VJP), chains, and
parameters reaching the batch both directly and through virtual parameters (cross terms)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.rules.base import OpCall
from fxdp.rules.factors import DenseGrad, EmbeddingGrad, LowRankGrad, inner, sq_norm
from fxdp.rules.virtual import make_virtuals, resolve_virtuals
from tests.models.helpers import STYLES, check_against_reference

B = 6


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def run(model, x, style="all-layer", **kw):
    torch.manual_seed(3)
    y = torch.randint(0, 3, (x.shape[0],))
    return check_against_reference(model.double(), (x,), {}, y, sum_ce, style=style, loss_reduction="sum", **kw)


def seq(T=4, d=5):
    torch.manual_seed(1)
    return torch.randn(B, T, d, dtype=torch.float64)


class Views(nn.Module):
    """x @ W.t() and W.T, scale.view(1, 1, -1), pos[:, :T], (1 + w).float(), W also used directly."""

    def __init__(self, d=5, h=4):
        super().__init__()
        self.W = nn.Parameter(torch.randn(h, d) / 2)
        self.scale = nn.Parameter(torch.randn(h))
        self.pos = nn.Parameter(torch.randn(1, 8, d))
        self.w = nn.Parameter(torch.randn(h) / 3)
        self.head = nn.Linear(h, 3)

    def forward(self, x):
        T = x.shape[1]
        x = x + self.pos[:, :T]
        h = x @ self.W.t() + F.linear(x, self.W) * 0.5 + torch.matmul(x, self.W.T)
        h = h * self.scale.view(1, 1, -1) * (1 + self.w).float()
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("style", STYLES)
def test_views_casts_slices_and_direct_use_equal_reference(style):
    run(Views(), seq(), style=style)


class Gathers(nn.Module):
    """nanoGPT's wpe(arange(T)) (no batch dim at all) and Swin's table[index] relative position bias."""

    def __init__(self, d=4, T=4, heads=2):
        super().__init__()
        self.wpe = nn.Embedding(8, d)
        self.table = nn.Parameter(torch.randn((2 * T - 1), heads))
        coords = torch.arange(T)
        self.register_buffer("index", (coords[:, None] - coords[None, :] + T - 1).reshape(-1), persistent=False)
        self.q = nn.Linear(d, d)
        self.heads = heads
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        Bx, T, d = x.shape
        x = x + self.wpe(torch.arange(T))
        bias = self.table[self.index].view(T, T, self.heads).permute(2, 0, 1)      # (H, T, T)
        q = self.q(x).view(Bx, T, self.heads, -1).transpose(1, 2)
        scores = q @ q.transpose(-1, -2) + bias.unsqueeze(0)
        y = (scores.softmax(-1) @ q).transpose(1, 2).reshape(Bx, T, d)
        return self.head(y).mean(1)


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_gathers_from_tables_with_fixed_indices_equal_reference(style):
    run(Gathers(), seq(d=4), style=style)


class Elementwise(nn.Module):
    """CLIP's logit_scale.exp(), an IA3-style vector through sigmoid, layer-scale, a conv of a parameter."""

    def __init__(self, d=5):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.7))
        self.ia3 = nn.Parameter(torch.randn(d))
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.fc(x) * torch.sigmoid(self.ia3) * self.logit_scale.exp()
        return self.head(h).mean(1) + torch.unbind(self.head.weight, 0)[0].sum() * 0.1


def test_elementwise_functions_of_parameters_equal_reference():
    run(Elementwise(), seq())


def test_weight_norm_and_orthogonal_parametrizations_equal_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 6)), nn.Tanh(),
                          nn.utils.parametrizations.orthogonal(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(B, 5, dtype=torch.float64)
    r = run(model, x, style="param-wise")
    assert "0.parametrizations.weight.original0" in r["engine"].plan.group_of


def test_conv_weight_used_on_a_parameter_and_on_the_batch_has_cross_terms():
    class ParamImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(1, 2, 5, 5))
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            return (self.conv(x) + self.conv(self.table)).flatten(1)[:, :3]

    run(ParamImage(), torch.randn(B, 2, 5, 5, dtype=torch.float64))


# ---------------------------------------------------------------- the factor maths itself
def _virtual(func, *args):
    w = args[0]
    call = OpCall(func, args, {}, {id(w): "w"})
    out, made = make_virtuals(call, 0)
    (u, v), = made
    return u, v


def _lowrank(Bn=3, T=4, m=5, n=4):
    torch.manual_seed(0)
    return LowRankGrad(torch.randn(Bn, 1, T, m, dtype=torch.float64), torch.randn(Bn, 1, T, n, dtype=torch.float64),
                       torch.Size((m, n)))


def test_transpose_keeps_a_low_rank_factor_with_its_sides_swapped():
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    u, v = _virtual(torch.Tensor.t, w)
    assert v.kind == "permute" and u.shape == (5, 4)
    f = _lowrank()
    out = resolve_virtuals({v.name: [f]}, [v], 3)["w"]
    assert len(out) == 1 and isinstance(out[0], LowRankGrad)
    torch.testing.assert_close(out[0].materialize(), f.materialize().transpose(1, 2))
    torch.testing.assert_close(sq_norm(out[0]), sq_norm(f))


def test_gather_with_a_fixed_index_becomes_an_embedding_factor():
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2], [2, 6]])
    call = OpCall(F.embedding, (idx, w), {}, {id(w): "w"})
    _, ((u, v),) = make_virtuals(call, 0)
    assert v.kind == "gather"
    g = torch.randn(3, 2, 2, 3, dtype=torch.float64)
    out, = resolve_virtuals({v.name: [DenseGrad(g)]}, [v], 3)["w"]
    assert isinstance(out, EmbeddingGrad)
    want = torch.zeros(3, 7, 3, dtype=torch.float64)
    for b in range(3):
        want[b].index_add_(0, idx.reshape(-1), g[b].reshape(-1, 3))
    torch.testing.assert_close(out.materialize(), want)
    torch.testing.assert_close(inner(out, out), want.flatten(1).square().sum(1))


def test_elementwise_function_gives_the_per_sample_vjp():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    u, v = _virtual(torch.exp, w)
    assert v.kind == "vjp"
    g = torch.randn(3, 4, dtype=torch.float64)
    out, = resolve_virtuals({v.name: [DenseGrad(g)]}, [v], 3)["w"]
    torch.testing.assert_close(out.materialize(), g * w.detach().exp())


def test_explain_shows_virtual_uses():
    report = fxdp.explain(Gathers().double(), seq(d=4))
    assert report.ok, report.problems
    rules = {r["op"]: r["rule"] for r in report.rows}
    assert rules["F.embedding"] == "virtual (gather)" and rules["Tensor.__getitem__"] == "virtual (gather)"
    assert rules["Tensor.permute"] == "virtual (permute)" and rules["Tensor.view"] == "virtual (reshape)"
