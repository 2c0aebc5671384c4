"""Compiled forwards get the eager per-forward checks (issue #13): sample mixing in every compiled graph,
parameter uses that skip a tap, frozen state changed by the forward, double backward."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp.core.errors import PrivacyError, SampleMixingError, UncoveredParameterError
from tests import reference as ref
from tests import models_zoo as Z
from tests.compile.models import case

F64 = torch.float64


def _compile(model, compiler="aot_eager", **kw):
    return torch.compile(model, backend="fxdp", options={"compiler": compiler}, **kw)


def _data(n=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------------------------- sample mixing
class MixupBeforeBreak(nn.Module):
    """Mixup switched on later, in a graph without parameters split off by a graph break."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.mixup = False

    def forward(self, x):
        if self.mixup:
            x = x.roll(1, 0)  # alone in its graph: the mixed value leaves it as an output
        torch._dynamo.graph_break()
        return self.fc(x)


class MixupAfterBreak(nn.Module):
    """Mixup switched on later, on an activation handed from one compiled region to the next."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)
        self.mixup = False

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        torch._dynamo.graph_break()
        if self.mixup:
            h = 0.7 * h + 0.3 * h.roll(1, 0)
        return self.fc2(h)


@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_min_max_scaling_over_the_batch_is_refused_when_compiled(compiler):
    x, y = _data()
    model = fxdp.privatize(Z.MinMaxScaled().double(), max_grad_norm=0.1)
    with pytest.raises(SampleMixingError, match="min reduces a tensor computed from the batch over all"):
        F.cross_entropy(_compile(model, compiler)(x), y).backward()


@torch._dynamo.config.patch(suppress_errors=True)
def test_refused_graph_stays_refused_when_dynamo_suppresses_errors():
    """With suppress_errors dynamo would run the refused frame uncompiled and compile the Linear it calls."""
    x, y = _data()

    class MinMaxSuppressed(Z.MinMaxScaled):  # a class of its own: no graph of MinMaxScaled's cached
        pass

    model = fxdp.privatize(MinMaxSuppressed().double(), max_grad_norm=0.1)
    compiled = _compile(model)
    for _ in range(3):
        with pytest.raises(SampleMixingError, match="min reduces"):
            F.cross_entropy(compiled(x), y).backward()
    assert getattr(model.fc.weight, "private_grad", None) is None


def test_mixing_only_for_large_batches_is_refused_when_that_branch_compiles():
    x, y = _data()
    model = fxdp.privatize(Z.MixesLargeBatches().double(), max_grad_norm=0.5)
    compiled = _compile(model)
    F.cross_entropy(compiled(x[:3]), y[:3]).backward()  # B = 3: no mixing, trains
    assert model.fc.weight.private_grad is not None
    with pytest.raises(SampleMixingError, match="mixed in the training forward: mean"):
        compiled(x)  # B = 8: the guard on x.shape[0] > 3 fails, the new graph is checked


def test_mixup_switched_on_after_the_first_step_is_refused():
    x, y = _data()
    model = fxdp.privatize(Z.LateMixup().double(), max_grad_norm=0.5)
    compiled = _compile(model)
    F.cross_entropy(compiled(x), y).backward()
    model.mixup = True
    with pytest.raises(SampleMixingError, match="mixed in the training forward: roll"):
        compiled(x)


@pytest.mark.parametrize("cls", [MixupBeforeBreak, MixupAfterBreak])
def test_mixing_in_a_region_split_off_by_a_graph_break_is_refused(cls):
    x, y = _data()
    model = fxdp.privatize(cls().double(), max_grad_norm=0.5)
    compiled = _compile(model, fullgraph=False)
    F.cross_entropy(compiled(x), y).backward()
    model.mixup = True
    with pytest.raises(SampleMixingError, match="mixed in the training forward: roll"):
        compiled(x)


# -------------------------------------------------------------------------- parameter uses skipping taps
@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_view_of_a_weight_cached_at_init_is_refused_when_compiled(compiler):
    x, y = _data()
    x[3] *= 30
    model = fxdp.privatize(Z.CachedView(torch.float64), max_grad_norm=0.1)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 0.0, 0.1, expected_batch_size=8,
                           public_grads="add")
    opt.zero_grad()
    with pytest.raises(UncoveredParameterError, match=r"fc\.weight through autograd node TBackward0") as info:
        _compile(model, compiler)(x)
    assert info.value.param_names == ("fc.weight",)
    assert model.fc.weight.grad is None  # nothing for public_grads="add" to add


# ----------------------------------------------------------------------- frozen state changed by a forward
class EMAParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.mean = nn.Parameter(torch.zeros(6), requires_grad=False)

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.fc(x) if self.training else self.fc(x - self.mean)


class EMAData(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, x):
        self.mean.data.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.fc(x)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("cls", [EMAParam, EMAData])
def test_state_updated_from_the_batch_is_refused(cls, compiled):
    """A frozen parameter is released by state_dict like a buffer; a .data write bypasses the version counter."""
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = fxdp.privatize(cls(), max_grad_norm=0.1)
    with pytest.raises(PrivacyError, match=r"buffer\(s\) mean were updated"):
        F.cross_entropy((_compile(model) if compiled else model)(x), y).backward()


class ReadsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))
        self.frozen = nn.Parameter(torch.ones(6), requires_grad=False)

    def forward(self, x):
        return self.fc(x * self.scale * self.frozen)


@pytest.mark.parametrize("compiled", [False, True])
def test_buffers_and_frozen_parameters_only_read_are_accepted(compiled):
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = fxdp.privatize(ReadsBuffer(), max_grad_norm=0.1)
    for _ in range(2):
        F.cross_entropy((_compile(model) if compiled else model)(x), y).backward()
    assert model.fc.weight.private_grad is not None


def test_frozen_parameter_declared_public_may_change():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = fxdp.privatize(EMAParam(), max_grad_norm=0.1, public_buffers=["mean"])
    F.cross_entropy(model(x), y).backward()
    assert model.mean.abs().sum() > 0 and model.fc.weight.private_grad is not None


# ------------------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_compiled_double_backward_is_refused_with_an_fxdp_error(compiler):
    """aot_autograd itself would only fail at the second backward, with a raw RuntimeError."""
    model = fxdp.privatize(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    x, y = torch.randn(8, 6, requires_grad=True), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(_compile(model, compiler)(x), y)
    with pytest.raises(PrivacyError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())


def test_input_gradient_without_create_graph_still_works_compiled():
    model = fxdp.privatize(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    x, y = torch.randn(8, 6, requires_grad=True), torch.randint(0, 3, (8,))
    g, = torch.autograd.grad(F.cross_entropy(_compile(model)(x), y), x)
    assert g.shape == x.shape and all(p.grad is None for p in model.parameters())


def test_a_compile_time_refusal_is_an_fxdp_error_not_backend_compiler_failed():
    model = fxdp.privatize(Z.CustomFunction())
    with pytest.raises(UncoveredParameterError, match="autograd_function_apply") as info:
        _compile(model)(torch.randn(8, 6))
    assert type(info.value).__module__ == "fxdp.core.errors"
    assert type(pickle.loads(pickle.dumps(info.value))) is UncoveredParameterError


# ------------------------------------------------------------------------------------ no false refusals
class ResBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.n1, self.n2 = nn.GroupNorm(2, c), nn.GroupNorm(2, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = F.relu(self.n1(self.conv1(x)))
        h = F.relu(x + self.n2(self.conv2(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _compiled_matches_reference(base, args, target, loss_fn):
    samples = ref.split_batch(args, {}, target)
    per_sample = ref.per_sample_gradients(copy.deepcopy(base), samples, loss_fn)
    names = [n for n, _ in base.named_parameters()]
    R = ref.median_threshold(per_sample, [names])
    expected, _ = ref.reference_private_grads(per_sample, [names], R)
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=R, loss_reduction="sum")
    loss_fn(_compile(model)(*args), target).backward()
    scale = max(float(e.abs().max()) for e in expected.values())
    for name, p in model.named_parameters():
        assert p.grad is None
        assert float((p.private_grad - expected[name]).abs().max()) < 1e-9 * scale, name


@pytest.mark.slow  # every compiled GPT-2 test runs these checks; by default GPT-2 vs the reference: test_exactness
def test_hf_gpt2_compiles_and_stays_exact():
    torch.manual_seed(0)
    base, args, target, loss_fn, _ = case("gpt2", B=3)
    _compiled_matches_reference(base, args, target, loss_fn)


def test_a_resnet_block_compiles_and_stays_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 4, 6, 6, dtype=F64)
    _compiled_matches_reference(ResBlock().double(), (x,), torch.randint(0, 3, (4,)),
                                lambda out, y: F.cross_entropy(out, y, reduction="sum"))


def test_compiled_training_loop_has_neighbour_sensitivity_at_most_r():
    """Noise off, lr 0: the released sums on D and on D minus one example differ by at most R."""
    R = 0.05
    x, y = _data(6)
    x[2] *= 40

    def release(xs, ys):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        m, opt, loader = fxdp.PrivacyEngine(accountant="rdp").make_private(
            module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0),
            data_loader=DataLoader(TensorDataset(xs, ys), batch_size=len(xs)), noise_multiplier=0.0, max_grad_norm=R)
        compiled = _compile(m)
        xb, yb = next(iter(loader))
        opt.zero_grad()
        F.cross_entropy(compiled(xb), yb).backward()
        opt.step()
        return torch.cat([p.grad.reshape(-1) * opt.expected_batch_size for p in m.parameters()])

    full = release(x, y)
    keep = [j for j in range(6) if j != 2]
    assert float((full - release(x[keep], y[keep])).norm()) <= R * (1 + 1e-9)
