"""Spectral normalisation in training mode under torch.compile(backend="fxdp"): torch's power iteration
refines the buffers u, v from the weights alone, under torch.no_grad (fxdp.analysis.weight_buffers), so the
compiled forward trains exactly, like eager privatize, and advances u, v once per forward. A view of a
weight taken under no_grad (``weight_mat.t()``) has no gradient path to the weight and is not a parameter
use; any other buffer the forward updates from the batch is still refused."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.analysis.same_draws import check_same_draws
from tests.analysis.test_train_mode_randomness import SpectralAndTracker, _spectral

X = torch.randn(6, 5, 8, dtype=torch.float64)
Y = torch.randint(0, 3, (6,))


def _compile(model):
    return torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_spectral_norm_in_train_mode_is_exact_compiled_and_advances_u_v_once_per_forward(kind):
    # same-draw reference: one plain forward of the batch; buffers after it equal the compiled forward's
    check_same_draws(_spectral(kind), lambda m: m(X), lambda out: F.cross_entropy(out, Y, reduction="none"),
                     style="param-wise", compiled=True)
    plain, model = _spectral(kind), fxdp.privatize(_spectral(kind))
    compiled = _compile(model)
    for _ in range(2):  # the second forward reuses the graph: u, v still advance once, as without fxdp
        plain(X)
        F.cross_entropy(compiled(X), Y).backward()
    for (name, want), got in zip(plain.named_buffers(), model.buffers()):
        assert torch.equal(got, want), name


def test_buffer_updated_from_the_batch_next_to_spectral_norm_is_refused_compiled():
    torch.manual_seed(0)
    model = fxdp.privatize(SpectralAndTracker().double().train())
    with pytest.raises(fxdp.PrivacyError, match=r"buffer\(s\) mean were updated"):
        F.cross_entropy(_compile(model)(X), Y).backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())


class NoGradView(nn.Module):
    """A weight view taken under no_grad, then used on the batch in grad mode: no gradient reaches fc.weight
    through it (autograd: a no-grad view is a leaf of its own), eager and compiled alike."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            wt = self.fc.weight.t()
        return self.out(torch.tanh(x @ wt) + self.fc(x)).sum(1)


def test_weight_view_taken_under_no_grad_compiled_equals_eager():
    torch.manual_seed(0)
    base = NoGradView().double()
    grads = []
    for compiled in (False, True):
        model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.05, loss_reduction="sum")
        F.cross_entropy((_compile(model) if compiled else model)(X), Y, reduction="sum").backward()
        assert all(p.grad is None for p in model.parameters())
        grads.append({n: p.private_grad for n, p in model.named_parameters()})
    for name, want in grads[0].items():
        assert torch.allclose(grads[1][name], want, rtol=1e-10, atol=1e-12), name
