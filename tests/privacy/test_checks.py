"""Issue #13, sections 4-9: the guarantee under the training loops people write.

Each class of leak has a neighbour-sensitivity test through the public API (noise off: the
update on D and on D minus one example differ by at most R) and/or the refusal that closes
it, asserting the fxdp error type and that the message names the cause.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.core.errors import PrivacyError
from tests import models_zoo as Z
from tests.privacy.neighbours import delta_norms, drop, private_sum

FNS = ["abadi", "automatic"]
STYLES = ["all-layer", "block-wise"]


def _groups(model):
    return [list(g) for g in fxdp.get_engine(model).plan.groups]


def _worst_move(model, args, target, loss_sum, indices, reduction="sum"):
    full = private_sum(model, [(args, target)], loss_sum, reduction)
    worst = 0.0
    for i in indices:
        a, t = drop(args, target, i)
        worst = max(worst, delta_norms(full, private_sum(model, [(a, t)], loss_sum, reduction), _groups(model))[0])
    return worst


# ------------------------------------------------------------------ section 4: precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fn", FNS)
def test_half_precision_clipped_sum_of_a_large_batch_stays_within_R(dtype, style, fn):
    """B = 2048 aligned examples in bf16/fp16: the clipped sum is ~B·R, so rounding it to the
    parameter dtype before the noise moved it by 3.4 R (bf16) / 1.27 R (fp16). It stays in fp32."""
    torch.manual_seed(0)
    B, R = 2048, 0.1
    model = Z.MLP(d_in=16, hidden=32).to(dtype)
    x = (1 + 0.3 * torch.randn(B, 16)).to(dtype)
    y = torch.zeros(B, dtype=torch.long)
    fxdp.privatize(model, style=style, clipping_fn=fn, max_grad_norm=R, loss_reduction="sum")

    def ce_sum(out, t):
        return F.cross_entropy(out.float(), t, reduction="sum")

    worst = _worst_move(model, (x,), y, ce_sum, [0, 7, 1500])
    assert worst <= R * (1 + 1e-3), f"{worst / R:.4f} R"
    assert worst >= 0.5 * R  # the removed example did move the sum (not a vacuous test)
    ce_sum(model(x), y).backward()
    assert all(p.private_grad.dtype == torch.float32 for p in model.parameters())
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=R,
                           loss_reduction="sum")
    opt.step()
    assert all(p.grad.dtype == dtype for p in model.parameters())  # only the released gradient is rounded


def test_half_precision_accumulation_over_micro_batches_stays_in_fp32():
    torch.manual_seed(0)
    model = fxdp.privatize(Z.MLP().to(torch.bfloat16), max_grad_norm=0.1, loss_reduction="sum")
    x, y = torch.randn(8, 6, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    for part in (slice(0, 4), slice(4, 8)):
        F.cross_entropy(model(x[part]).float(), y[part], reduction="sum").backward()
        assert all(p.private_grad.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------ section 8: wrappers
def test_privatize_refuses_data_parallel_wrappers_and_points_to_dpdistributed(tmp_path):
    import torch.distributed as dist

    with pytest.raises(ValueError, match="DataParallel.*DPDistributed"):
        fxdp.privatize(nn.DataParallel(Z.MLP()))
    holder = nn.Sequential(nn.DataParallel(Z.MLP()))
    with pytest.raises(ValueError, match="submodule '0'.*DPDistributed"):
        fxdp.privatize(holder)
    assert not fxdp.is_privatized(holder)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Z.MLP())
        with pytest.raises(ValueError, match="DistributedDataParallel.*never synchronises.*fxdp.DPDistributed"):
            fxdp.privatize(ddp)
        assert not fxdp.is_privatized(ddp) and not fxdp.is_privatized(ddp.module)
    finally:
        if started:
            dist.destroy_process_group()


# ------------------------------------------------------------------ section 5: parameter uses the engine does not see
@pytest.mark.parametrize("public_grads", ["refuse", "add"])
@pytest.mark.parametrize("model_cls, names, cause", [
    (Z.CustomFunction, "w", "custom torch.autograd.Function MatmulFunction"),
    (Z.CachedView, "fc.weight", "view cached at __init__"),
])
def test_parameter_reaching_the_output_around_the_taps_is_refused_in_eager_mode(model_cls, names, cause,
                                                                                public_grads):
    """Before: the parameter got an unclipped p.grad, and public_grads='add' released it (5.1 R)."""
    model = fxdp.privatize(model_cls(), max_grad_norm=0.1)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.1,
                           expected_batch_size=4, public_grads=public_grads)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    with pytest.raises(fxdp.UncoveredParameterError, match=rf"{names} through .*{cause}.*bypass clipping"):
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model(x)  # inference is not a training forward


def test_submodule_called_outside_the_root_forward_is_refused():
    model = fxdp.privatize(Z.MLP(), max_grad_norm=0.1)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(fxdp.UncoveredParameterError, match="Linear .*called outside the model's forward"):
        model.fc2(torch.tanh(model.fc1(x)))
    with pytest.raises(fxdp.UncoveredParameterError, match="outside the model's forward"):
        F.cross_entropy(model(x), y) + model.fc2(torch.randn(4, 8)).sum()
    with torch.no_grad():
        model.fc2(torch.randn(4, 8))  # no gradient: allowed
    F.cross_entropy(model(x), y).backward()  # the model still trains
    assert all(p.grad is None and p.private_grad.shape == p.shape for p in model.parameters())
    fxdp.unprivatize(model)
    model.fc2(torch.randn(4, 8)).sum().backward()  # hooks are gone with the engine
    assert model.fc2.weight.grad is not None


def test_regulariser_of_a_parameter_the_forward_used_is_not_added_even_under_add():
    """public_grads='add' never accepts a gradient of a parameter the forward used on data: a weight
    regulariser cannot be told from a data term there (tests/privacy/test_optimizer_api.py); the inner
    optimizer's weight_decay gives the same update."""
    torch.manual_seed(0)
    model = fxdp.privatize(Z.MLP(), max_grad_norm=0.1)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.1,
                           expected_batch_size=4, public_grads="add")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    (F.cross_entropy(model(x), y) + 0.5 * model.fc1.weight.square().sum()).backward()
    with pytest.raises(PrivacyError, match="used these parameters on data.*weight_decay="):
        opt.step()
    fxdp.clear_private_grads(model)
    groups = [{"params": [model.fc1.weight], "weight_decay": 1.0},
              {"params": [p for n, p in model.named_parameters() if n != "fc1.weight"]}]
    opt = fxdp.DPOptimizer(torch.optim.SGD(groups, lr=0.1), noise_multiplier=0.0, max_grad_norm=0.1,
                           expected_batch_size=4)
    model.fc1.weight.grad = None
    F.cross_entropy(model(x), y).backward()
    private, w = model.fc1.weight.private_grad.clone(), model.fc1.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(w - model.fc1.weight.detach(), 0.1 * (private / 4 + w))


# ------------------------------------------------------------------ section 7: state released without clipping
class EMANormaliser(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        out = self.fc(x - self.mean)
        self.steps += 1
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))  # released by state_dict, unclipped: 76.6 between neighbours
        return out


class ReassignedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("last", torch.zeros(6))

    def forward(self, x):
        self.last = x.detach()[-1].clone()  # a new tensor holding an example
        return self.fc(x)


def test_buffer_updated_from_the_batch_during_a_private_forward_is_refused():
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    model = fxdp.privatize(EMANormaliser(), public_buffers=["steps"])
    with pytest.raises(PrivacyError, match=r"buffer\(s\) mean were updated during a private training forward"):
        model(x)
    model = fxdp.privatize(EMANormaliser())
    with pytest.raises(PrivacyError, match="mean, steps were updated.*public_buffers"):
        model(x)
    model = fxdp.privatize(ReassignedBuffer())
    with pytest.raises(PrivacyError, match="last were updated"):
        model(x)
    with pytest.raises(ValueError, match=r"public_buffers \['nope'\] are not buffers"):
        fxdp.privatize(EMANormaliser(), public_buffers=["nope"])


class StepCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps += 1
        return self.fc(x)


def test_buffer_declared_public_may_change():
    model = fxdp.privatize(StepCounter(), public_buffers=["steps"])
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    assert int(model.steps) >= 1 and model.fc.weight.private_grad is not None


# ------------------------------------------------------------------ section 9: losses whose normaliser depends on the batch
def _engine_setup(criterion, R, grad_sample_mode="ghost"):
    from tests.training.stack_helpers import make_loader, make_model

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fxdp.PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=make_loader(n=32, batch_size=8), noise_multiplier=0.0,
        max_grad_norm=R, grad_sample_mode=grad_sample_mode, criterion=criterion)
    return out[0], out[2]  # (module, optimizer, criterion, data_loader)


def _moves(model, loss_fn, x, y, indices):
    """Largest ||clipped sum(D) - clipped sum(D - i)|| with the loss as the user writes it (mean)."""
    def run(xx, yy):
        fxdp.clear_private_grads(model)
        loss_fn(model(xx), yy).backward()
        out = {n: p.private_grad.clone() for n, p in model.named_parameters()}
        fxdp.clear_private_grads(model)
        return out

    full = run(x, y)
    return max(delta_norms(full, run(*[t[[j for j in range(x.shape[0]) if j != i]] for t in (x, y)]),
                           _groups(model))[0] for i in indices)


def test_weighted_cross_entropy_through_make_private_criterion_stays_within_R():
    """CrossEntropyLoss(weight=w)'s mean divides by Σ w[y] over the batch: removing a heavy example rescales
    every other example's contribution. The criterion make_private returns reduces per sample."""
    torch.manual_seed(0)
    w = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=g)
    y[3] = 2  # one heavy example
    R = 2.0
    model, criterion = _engine_setup(nn.CrossEntropyLoss(weight=w), R)
    raw = _moves(model, nn.CrossEntropyLoss(weight=w), x, y, [3])
    assert raw > 2 * R  # the leak is real on this batch (4.1 R)
    safe = _moves(model, criterion, x, y, range(16))
    assert 0.3 * R <= safe <= R * (1 + 1e-9), safe / R


def test_ignore_index_token_mean_through_per_sample_criterion_stays_within_R():
    """A token mean over ignore_index padding divides by the batch's count of real tokens: with one long
    example among short ones, removing it rescales all the others (1.6 R here)."""
    torch.manual_seed(0)
    B, T, V, R = 12, 12, 5, 1.0
    model = fxdp.privatize(Z.MLP(d_in=4, hidden=8, classes=V).double(), max_grad_norm=R)
    x = torch.randn(B, T, 4, dtype=torch.float64)
    y = torch.randint(0, V, (B, T))
    y[1:, 1:] = -100  # example 0 has T real tokens, the others one each

    def token_mean(out, t):
        return F.cross_entropy(out.transpose(1, 2), t, ignore_index=-100)

    criterion = fxdp.per_sample_criterion(nn.CrossEntropyLoss(ignore_index=-100))

    def per_sample(out, t):
        return criterion(out.transpose(1, 2), t)

    raw = _moves(model, token_mean, x, y, range(B))
    safe = _moves(model, per_sample, x, y, range(B))
    assert 0.9 * R <= safe <= R * (1 + 1e-9) and raw > 1.3 * R, (safe, raw)
    torch.testing.assert_close(per_sample(model(x), y), fxdp.per_sample_loss(model(x), y))


def test_criterion_with_a_batch_dependent_normaliser_is_refused_where_fxdp_sees_it():
    with pytest.raises(ValueError, match=r"weight=\.\.\.\) with reduction='mean' divides by the sum of the class "
                                         r"weights.*fxdp\.per_sample_criterion"):
        _engine_setup(nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), 1.0, grad_sample_mode="hooks")
    scalar = fxdp.per_sample_criterion(lambda out, y: F.cross_entropy(out, y))
    with pytest.raises(PrivacyError, match="returned a scalar.*reduction='none'"):
        scalar(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="does not know"):
        fxdp.per_sample_criterion(_UnknownLoss())


class _UnknownLoss(nn.modules.loss._Loss):
    def forward(self, a, b):
        return (a - b).mean()


# ------------------------------------------------------------------ section 6: sample mixing, structurally
def test_full_batch_reduction_is_refused_whatever_the_values():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    x[0] = 0.0  # sample 0 holds no extreme: the numeric probe alone missed this
    model = fxdp.privatize(Z.MinMaxScaled())
    with pytest.raises(fxdp.SampleMixingError, match="min reduces a tensor computed from the batch over all its"):
        F.cross_entropy(model(x), y).backward()
    assert all(not hasattr(p, "private_grad") for p in model.parameters())
    with torch.no_grad():
        model(x)  # inference may normalise however it likes


def test_mixing_only_in_batches_larger_than_the_probe_is_refused():
    model = fxdp.privatize(Z.MixesLargeBatches())
    with pytest.raises(fxdp.SampleMixingError, match="samples are mixed"):
        model(torch.randn(8, 6))


def test_mixing_switched_on_after_the_first_forward_is_revalidated_and_refused():
    model = fxdp.privatize(Z.LateMixup(), max_grad_norm=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    fxdp.clear_private_grads(model)
    model.mixup = True
    with pytest.raises(fxdp.SampleMixingError, match="samples are mixed"):
        model(x)
    model.mixup = False
    F.cross_entropy(model(x), y).backward()  # back on the analysed path: trains again
    assert model.fc.weight.private_grad is not None


def test_per_sample_reductions_and_mask_counts_are_not_refused():
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x, mask):
            n = mask.sum(1, keepdim=True)          # each sample's own count: not refused
            h = (x - x.amin(dim=1, keepdim=True)) / (x.amax(1, keepdim=True) - x.amin(1, keepdim=True))
            return self.fc(h * (n > 0))  # (a count over the whole batch here would gate every sample: refused)

    model = fxdp.privatize(PerSample(), max_grad_norm=0.1)
    F.cross_entropy(model(torch.randn(8, 6), torch.ones(8, 6, dtype=torch.long)), torch.randint(0, 3, (8,))).backward()
    assert model.fc.weight.private_grad is not None
