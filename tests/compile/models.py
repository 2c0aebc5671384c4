"""Small models for the compile tests, and the comparison with eager privatize."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z
from tests import reference as ref


class SeqFirstEncoder(nn.Module):
    """nn.TransformerEncoder on (T, B, d) inputs: seq-major MultiheadAttention inside."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(x).mean(0))


class ScaleByParameter(torch.autograd.Function):
    """``x * w`` as a custom autograd.Function: a parameter use no rule covers (fxdp must refuse it)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class BrokenMLP(nn.Module):
    """An MLP with a graph break of its own between its layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        torch._dynamo.graph_break()
        h = torch.tanh(self.fc2(h))
        return self.fc3(h)


def case(name, B=5):
    """(model, args, target, per-sample-sum loss, privatize kwargs) for a named model."""
    f64 = torch.float64
    if name == "mlp":
        return Z.MLP().double(), (torch.randn(B, 6, dtype=f64),), torch.randint(0, 3, (B,)), Z.ce_sum, {}
    if name == "cnn":
        return Z.CNN().double(), (torch.randn(B, 3, 8, 8, dtype=f64),), torch.randint(0, 4, (B,)), Z.ce_sum, {}
    if name == "seq":
        return Z.SeqModel().double(), (torch.randint(0, 20, (B, 6)),), torch.randint(0, 3, (B,)), Z.ce_sum, {}
    if name == "raw":
        return Z.RawParams().double(), (torch.randn(B, 4, 6, dtype=f64),), torch.randint(0, 2, (B,)), Z.ce_sum, {}
    if name == "gpt2":  # one block: the taps are per block (the GPT-2 fallback and checkpointing tests use two)
        ids = torch.randint(0, 40, (B, 8))
        return Z.gpt2(n_layer=1), (ids,), ids, Z.lm_sum, {}
    if name == "bert":
        return Z.bert(), (torch.randint(0, 30, (B, 7)),), torch.randint(0, 3, (B,)), Z.ce_sum, {}
    if name == "encoder":
        return (SeqFirstEncoder().double(), (torch.randn(6, B, 8, dtype=f64),), torch.randint(0, 3, (B,)),
                Z.ce_sum, {"batch_dim": 1})
    raise KeyError(name)


def compiled_and_eager(base, args, target, loss_fn, compiler="aot_eager", fullgraph=True, **kw):
    """Private grads of eager privatize and of backend "fxdp" on copies of ``base``."""
    eager = fxdp.privatize(copy.deepcopy(base), **kw)
    loss_fn(eager(*args), target).backward()
    model = fxdp.privatize(copy.deepcopy(base), **kw)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": compiler}, fullgraph=fullgraph)
    loss_fn(compiled(*args), target).backward()
    return model, eager


def assert_same_private_grads(model, eager, rtol=1e-10):
    scale = max(float(q.private_grad.abs().max()) for q in eager.parameters() if q.requires_grad)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is None, f"{name}: p.grad written under compile"
        if not q.requires_grad:  # frozen (LoRA base weights): no private gradient on either side
            assert getattr(p, "private_grad", None) is None and getattr(q, "private_grad", None) is None, name
            continue
        err = float((p.private_grad - q.private_grad).abs().max())
        assert err <= rtol * scale, f"{name}: {err:.3e} vs scale {scale:.3e}"


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def check_compiled_against_reference(base, x, y, style, compiler, reference_model=None, **kw):
    """Backend "fxdp" on a copy of ``base`` vs brute force (on ``reference_model`` if given: the same function
    written without in-place ops), R at the median per-sample norm. Returns the compiled model's original."""
    samples = ref.split_batch((x,), {}, y)
    per_sample = ref.per_sample_gradients(copy.deepcopy(reference_model or base), samples, ce_sum)
    probe = fxdp.privatize(copy.deepcopy(base), style=style, **kw)
    groups = [list(g) for g in fxdp.get_engine(probe).plan.groups]
    R = ref.median_threshold(per_sample, groups)
    expected, norms = ref.reference_private_grads(per_sample, groups, R)
    thr = R / len(groups) ** 0.5
    assert any(n > thr for gn in norms for n in gn)  # some clipped: a wrong scale cannot cancel out
    model = fxdp.privatize(copy.deepcopy(base), style=style, max_grad_norm=R, loss_reduction="sum", **kw)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": compiler})
    ce_sum(compiled(x), y).backward()
    scale = max(float(e.abs().max()) for e in expected.values())
    for name, p in model.named_parameters():
        assert p.grad is None
        err = float((p.private_grad - expected[name]).abs().max())
        assert err < 1e-9 * scale, f"{name}: {err:.3e} (style={style})"
    return model
