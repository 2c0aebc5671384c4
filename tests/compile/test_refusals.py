"""Never non-private training that looks private: what backend "fxdp" refuses, and why."""
import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.core.errors import PrivacyError
from tests.compile.models import ScaleByParameter, case


def test_compiling_an_unprivatized_model_is_refused():
    model = case("mlp")[0]
    with pytest.raises(Exception, match="not privatized"):
        torch.compile(model, backend="fxdp")(torch.randn(3, 6, dtype=torch.float64))


def test_privatized_model_compiled_with_another_backend_is_refused():
    model = fxdp.privatize(case("mlp")[0])
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(PrivacyError, match="backend other than"):
        compiled(torch.randn(3, 6, dtype=torch.float64))


class RootParamIsland(nn.Module):
    """A parameter of the root module used by code dynamo does not trace: no submodule hook opens an eager
    island for it (uses inside untraced submodules fall back to eager taps, tests/compile/test_fallback.py)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.w = nn.Linear(6, 6), nn.Parameter(torch.ones(6))

    def forward(self, x):
        return _untraced(self.w, self.fc1(x))


@torch._dynamo.disable
def _untraced(w, h):
    return torch.tanh(h * w)


def test_root_parameter_used_by_untraced_code_is_refused_saying_what_to_do():
    model = fxdp.privatize(RootParamIsland().double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "eager"})
    with pytest.raises(PrivacyError, match="root module"):
        compiled(torch.randn(4, 6, dtype=torch.float64))


def test_uncovered_parameter_use_is_refused_at_compile_time():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.sort(x * self.w, dim=0).values  # sorts across the batch: mixes samples

    model = fxdp.privatize(Sorts().double())
    with pytest.raises(PrivacyError):
        torch.compile(model, backend="fxdp", options={"compiler": "eager"})(torch.randn(4, 6, dtype=torch.float64))


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.w = nn.Linear(6, 6), nn.Parameter(torch.ones(6))

    def forward(self, x):
        return ScaleByParameter.apply(self.fc(x), self.w)


def test_refusals_inside_the_backend_reach_the_caller_as_fxdp_errors():
    """Not wrapped in dynamo's BackendCompilerFailed: ``except fxdp.UncoveredParameterError`` works."""
    model = fxdp.privatize(CustomFunction().double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(fxdp.UncoveredParameterError, match="no rule covers") as info:
        compiled(torch.randn(4, 6, dtype=torch.float64))
    assert "BackendCompilerFailed" not in type(info.value).__name__


class DoubleBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_double_backward_is_refused_with_an_fxdp_error(compiler):
    model = fxdp.privatize(DoubleBackward().double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": compiler})
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = compiled(x).square().sum()
    with pytest.raises(PrivacyError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


class ForwardMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_compiling_the_forward_method_is_refused_saying_to_compile_the_module():
    """torch.compile(model.forward) bypasses the module's hooks, where fxdp opens each forward pass."""
    model = fxdp.privatize(ForwardMethod().double())
    compiled = torch.compile(model.forward, backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(PrivacyError, match=r"model\.compile\(backend"):
        compiled(torch.randn(4, 6, dtype=torch.float64))
