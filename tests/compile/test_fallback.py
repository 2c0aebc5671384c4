"""Code dynamo does not trace falls back to eager taps under backend "fxdp": a ``torch.compiler.disable``'d
submodule, a ``torch._dynamo.disable``'d helper inside a block, a graph break inside a block, GPT-2 with a
user graph break and a disabled block. Its parameter uses go through the same interceptor, rules and
taps as eager ``privatize``, numbered with the compiled regions' call sites in program order, and every
norm is combined across compiled and eager uses before any clipped sum: exact for every style."""
import copy
import types

import pytest
import torch
import torch.nn as nn

import fxdp
from tests import models_zoo as Z
from tests.compile.models import ScaleByParameter, assert_same_private_grads, check_compiled_against_reference, ce_sum

STYLES = ["all-layer", "layer-wise", "param-wise", "block-wise"]


class Gate(nn.Module):
    """A submodule dynamo never traces: a Linear and a raw parameter."""

    def __init__(self, d=8):
        super().__init__()
        self.fc, self.scale = nn.Linear(d, d), nn.Parameter(torch.linspace(0.5, 1.5, d))

    @torch.compiler.disable
    def forward(self, h):
        return torch.tanh(self.fc(h)) * self.scale


@torch._dynamo.disable
def _untraced_mlp(layer, h):
    return torch.tanh(layer(h))


class Block(nn.Module):
    """One block: compiled Linear, an untraced helper using a Linear, a graph break, a compiled LayerNorm."""

    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2, self.ln = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, h):
        h = h + torch.tanh(self.fc1(h))
        h = h + _untraced_mlp(self.fc2, h)
        torch._dynamo.graph_break()
        return self.ln(h)


class Islands(nn.Module):
    """Compiled regions and eager islands interleaved, the fc1 weight used in both (a tied second use)."""

    def __init__(self, d=8, block=Block):
        super().__init__()
        self.inp, self.gate = nn.Linear(6, d), Gate(d)
        self.blocks = nn.ModuleList([block(d), block(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.gate(self.inp(x))
        for block in self.blocks:
            h = block(h)
        h = h + _untraced_mlp(self.blocks[0].fc1, h)  # the second use of a weight, outside any compiled region
        return self.head(h)


def own_code(cls, tag):
    """``cls`` with a forward code object of its own: dynamo's cache (and its recompile limit, 8) is per code
    object, and every test here compiles new instances."""
    fn = cls.forward
    code = fn.__code__.replace(co_name=f"forward_{tag}")
    forward = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return type(f"{cls.__name__}_{tag}", (cls,), {"forward": forward})


def islands(tag):
    return own_code(Islands, tag)(block=own_code(Block, tag)).double()


@pytest.mark.parametrize("style", STYLES)
def test_untraced_code_between_regions_matches_the_reference(style):
    torch.manual_seed(50)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = check_compiled_against_reference(islands(style), x, y, style, "aot_eager")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow  # ~13 s cold; the islands for every style above (aot_eager), inductor in test_inplace.py
def test_untraced_code_under_inductor_matches_the_reference():
    torch.manual_seed(51)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_compiled_against_reference(islands("inductor"), x, y, "block-wise", "inductor")


def test_several_steps_and_batch_sizes_stay_exact():
    torch.manual_seed(52)
    base = islands("steps")
    eager = fxdp.privatize(copy.deepcopy(base), style="block-wise", max_grad_norm=0.3)
    model = fxdp.privatize(copy.deepcopy(base), style="block-wise", max_grad_norm=0.3)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    for B in (5, 3, 7):
        x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
        ce_sum(eager(x), y).backward()
        ce_sum(compiled(x), y).backward()
    assert_same_private_grads(model, eager)


class HiddenUse(nn.Module):
    """A parameter used in untraced code other than through a rule: as in eager mode, refused."""

    def __init__(self, how):
        super().__init__()
        self.fc, self.w, self.how = nn.Linear(6, 6), nn.Parameter(torch.ones(6)), how
        self.w_view = None

    def forward(self, x):
        return _hidden(self, self.fc(x))


@torch._dynamo.disable
def _hidden(m, h):
    return ScaleByParameter.apply(h, m.w) if m.how == "function" else h * m.w_view


@pytest.mark.parametrize("how", ["function", "cached view"])
def test_a_parameter_hidden_from_the_interceptor_in_untraced_code_is_refused(how):
    model = fxdp.privatize(HiddenUse(how).double())
    model.w_view = model.w.view(6)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(fxdp.UncoveredParameterError, match="w through"):
        compiled(torch.randn(4, 6, dtype=torch.float64))


def _gpt2_with_untraced_code(base):
    """A user graph break inside the first block's MLP, and the second block left to eager mode."""
    model = copy.deepcopy(base)
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda m, a: torch._dynamo.graph_break())
    block = model.transformer.h[1]
    block.forward = torch.compiler.disable(block.forward)
    return model


@pytest.mark.parametrize("style", ["all-layer", pytest.param("block-wise", marks=pytest.mark.slow)])
def test_gpt2_with_a_user_graph_break_and_a_disabled_block_equals_eager(style):
    torch.manual_seed(53)
    base = Z.gpt2()
    ids = torch.randint(0, 40, (4, 8))
    eager = fxdp.privatize(copy.deepcopy(base), style=style, max_grad_norm=0.1)
    Z.lm_sum(eager(ids), ids).backward()
    model = fxdp.privatize(_gpt2_with_untraced_code(base), style=style, max_grad_norm=0.1)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    Z.lm_sum(compiled(ids), ids).backward()
    assert_same_private_grads(model, eager)


def test_removing_one_example_moves_the_clipped_sum_at_most_R():
    """Neighbour sensitivity through compiled regions and eager islands together (noise off)."""
    torch.manual_seed(54)
    base, R = islands("neighbours"), 0.4
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = fxdp.privatize(copy.deepcopy(base), style="block-wise", max_grad_norm=R)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}, dynamic=True)

    def run(keep):
        fxdp.clear_private_grads(model)
        ce_sum(compiled(x[keep]), y[keep]).backward()
        return torch.cat([p.private_grad.flatten() for p in model.parameters()])

    full = run(torch.ones(6, dtype=torch.bool))
    moves = []
    for i in range(6):
        keep = torch.ones(6, dtype=torch.bool)
        keep[i] = False
        moves.append(float((full - run(keep)).norm()))
    assert max(moves) <= R * (1 + 1e-9)
    assert max(moves) > 0.5 * R  # examples are clipped: a wrong grouping or scale would show
