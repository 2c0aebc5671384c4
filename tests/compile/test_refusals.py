"""Never non-private training that looks private: what backend "fxdp" refuses, and why."""
import pytest
import torch
import torch.nn as nn

import fxdp
from fxdp.core.errors import PrivacyError
from tests.compile.models import case


def test_compiling_an_unprivatized_model_is_refused():
    model = case("mlp")[0]
    with pytest.raises(Exception, match="not privatized"):
        torch.compile(model, backend="fxdp")(torch.randn(3, 6, dtype=torch.float64))


def test_privatized_model_compiled_with_another_backend_is_refused():
    model = fxdp.privatize(case("mlp")[0])
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(PrivacyError, match="backend other than"):
        compiled(torch.randn(3, 6, dtype=torch.float64))


class EagerIsland(nn.Module):
    """A parameter used by code dynamo does not trace (between two compiled regions)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(_untraced(self.fc1, x))


@torch._dynamo.disable
def _untraced(layer, x):
    return torch.tanh(layer(x))


def test_parameter_use_between_graph_breaks_is_refused():
    model = fxdp.privatize(EagerIsland().double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "eager"})
    with pytest.raises(Exception, match="ran outside (the|any) compiled graph"):
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
