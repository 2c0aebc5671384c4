"""In-place changes of a tapped layer's output under backend "fxdp": ``nn.ReLU(inplace=True)`` after a
Linear or conv, ``h += residual`` after a norm (the torchvision / HuggingFace ResNet pattern), and Tensor
in-place *methods* (``h.relu_()``, ``h.add_(r)``, ``h[:, :k].mul_(c)``), whose result dynamo leaves unused:
the next layer must be tapped with the value it really reads, the mutated one. Checked against the
one-sample-at-a-time reference for every style."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests import reference as ref
from tests.compile.models import assert_same_private_grads, check_compiled_against_reference, compiled_and_eager


class InplaceBlock(nn.Module):
    """A ResNet basic block with in-place activations and an in-place residual add."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.act = nn.ReLU(inplace=True)
        self.fc, self.out = nn.Linear(c, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.n1(self.conv1(x)))
        h = self.n2(self.conv2(h))
        h += x
        h = self.act(h)
        h = self.act(self.fc(h.mean((2, 3))))  # in place on a Linear's output
        return self.out(h)


def _sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("compiler", [  # inductor on in-place outputs by default: test_inplace_methods_under_inductor
    "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])  # ~15-25 s cold (conv and norm kernels)
def test_inplace_block_matches_the_per_sample_reference(compiler):
    torch.manual_seed(20)
    base = InplaceBlock().double()
    x, y = torch.randn(6, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    samples = ref.split_batch((x,), {}, y)
    per_sample = ref.per_sample_gradients(copy.deepcopy(base), samples, _sum_ce)
    names = [n for n, _ in base.named_parameters()]
    R = ref.median_threshold(per_sample, [names])
    expected, norms = ref.reference_private_grads(per_sample, [names], R)
    assert 0 < sum(float(n[0]) > R for n in norms) < len(norms)
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=R, loss_reduction="sum")
    _sum_ce(torch.compile(model, backend="fxdp", options={"compiler": compiler})(x), y).backward()
    scale = max(float(e.abs().max()) for e in expected.values())
    for name, p in model.named_parameters():
        assert p.grad is None
        assert float((p.private_grad - expected[name]).abs().max()) < 1e-9 * scale, name


@pytest.mark.parametrize("style", ["layer-wise", "block-wise"])
def test_inplace_block_equals_eager_for_other_styles(style):
    torch.manual_seed(21)
    base = InplaceBlock().double()
    x, y = torch.randn(5, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    model, eager = compiled_and_eager(base, (x,), y, _sum_ce, style=style, max_grad_norm=0.05)
    assert_same_private_grads(model, eager)


@pytest.mark.slow  # ~10 s; the in-place patterns are covered by InplaceBlock above
def test_huggingface_resnet_with_fixed_batchnorm():
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(22)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=3)
    base = fxdp.fix_batchnorm(ResNetForImageClassification(cfg)).double()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 3, (4,))
    model, eager = compiled_and_eager(base, (x,), y, lambda o, t: _sum_ce(o.logits, t), fullgraph=False,
                                      max_grad_norm=0.1)
    assert_same_private_grads(model, eager)


class InplaceMethods(nn.Module):
    """In-place methods on the outputs of Linear and LayerNorm: the graph's later readers read the
    original node (dynamo records ``h.relu_()`` as a call whose result is unused)."""

    def __init__(self, broken=False):
        super().__init__()
        self.fc1, self.ln = nn.Linear(6, 8), nn.LayerNorm(8)
        self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 3)
        self.broken = broken

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        r = self.ln(h)
        r.add_(h)
        g = self.fc2(r)
        if self.broken:  # the mutations below happen in the next compiled region
            torch._dynamo.graph_break()
        g[:, :4].mul_(0.5)
        g.tanh_()
        return self.fc3(g)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise", "param-wise", "block-wise"])
def test_inplace_methods_on_tapped_outputs_match_the_reference(style):
    torch.manual_seed(40)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    kw = {"block_heads": ["fc1", "fc2"]} if style == "block-wise" else {}
    check_compiled_against_reference(InplaceMethods().double(), x, y, style, "aot_eager", **kw)


def test_inplace_methods_under_inductor():
    torch.manual_seed(41)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_compiled_against_reference(InplaceMethods().double(), x, y, "all-layer", "inductor")


def test_inplace_methods_in_the_region_after_a_graph_break():
    torch.manual_seed(42)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_compiled_against_reference(InplaceMethods(broken=True).double(), x, y, "all-layer", "aot_eager")


class ReadThenModified(nn.Module):
    """A layer's input modified in place after the layer read it: the tap keeps the value it read. (Plain
    eager autograd refuses this model, torch.compile's functionalised graph trains it.)"""

    def __init__(self, inplace=True):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.inplace = inplace

    def forward(self, x):
        h = self.fc1(x)
        z = self.fc2(h)
        if self.inplace:
            h.relu_()
        else:
            h = h.relu()
        return z + self.fc3(h)


def test_input_modified_after_the_layer_read_it_matches_the_reference():
    torch.manual_seed(43)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    base = ReadThenModified().double()
    same = ReadThenModified(inplace=False).double()
    same.load_state_dict(base.state_dict())
    check_compiled_against_reference(base, x, y, "all-layer", "aot_eager", reference_model=same)
