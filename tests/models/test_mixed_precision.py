"""Mixed precision under fxdp: bf16 / fp16 autocast (CPU), half-precision
parameters, and fp16 loss scaling (GradScaler). Norms and clip factors are
computed in fp32; private grads match the per-sample reference run under the
same autocast, to the precision of the half type."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z
from tests.models.dit import TinyDiT, diffusion_loss
from tests.models.helpers import check_against_reference

B = 8


class Autocast(nn.Module):
    """Runs ``inner`` under CPU autocast (the same for the reference and for fxdp)."""

    def __init__(self, inner, dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(*args, **kwargs)


def ce(out, y):
    return F.cross_entropy(out.float(), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_autocast_mlp_and_cnn_match_reference_to_half_precision(dtype, style):
    torch.manual_seed(0)
    for model, x, y in ((Z.MLP(), torch.randn(B, 6), torch.randint(0, 3, (B,))),
                        (Z.CNN(), torch.randn(B, 3, 9, 9), torch.randint(0, 4, (B,)))):
        r = check_against_reference(Autocast(model, dtype), (x,), {}, y, ce, style=style, rtol=3e-2, atol=1e-6)
        norms = r["engine"].last_stats["group_norms"]
        assert all(n.dtype == torch.float32 for n in norms.values())
        assert all(p.private_grad.dtype == torch.float32 for p in model.parameters())


def test_autocast_bf16_dit_with_attention_matches_reference():
    torch.manual_seed(0)
    model = Autocast(TinyDiT(), torch.bfloat16)
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 6, (4,))
    noise = torch.randn(4, 3, 8, 8)

    def loss(pred, n):
        return diffusion_loss(pred.float(), n)

    check_against_reference(model, (x, t, y), {}, noise, loss, rtol=5e-2, atol=1e-5)


def test_autocast_bf16_gpt2_runs_with_fp32_norms_and_bounded_contributions():
    model = Z.gpt2().float()
    ids = torch.randint(0, 40, (4, 8))
    fxdp.privatize(model, max_grad_norm=0.05, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    fxdp.per_sample_loss(out.logits.float(), ids, shift=True, reduction="sum").backward()
    stats = fxdp.get_engine(model).last_stats
    assert stats["group_norms"]["all"].dtype == torch.float32 and stats["num_nonfinite"] == 0
    total = torch.sqrt(sum(p.private_grad.double().square().sum() for p in model.parameters()))
    assert float(total) <= 0.05 * 4 * (1 + 1e-4)


def test_bf16_parameters_get_norms_and_private_grads_in_fp32():
    torch.manual_seed(0)
    model = Z.MLP().to(torch.bfloat16)
    fxdp.privatize(model, max_grad_norm=0.1)
    x, y = torch.randn(B, 6, dtype=torch.bfloat16), torch.randint(0, 3, (B,))
    F.cross_entropy(model(x).float(), y).backward()
    stats = fxdp.get_engine(model).last_stats
    assert stats["group_norms"]["all"].dtype == torch.float32
    assert all(p.private_grad.dtype == torch.float32 for p in model.parameters())  # rounded only after the noise
    ref = copy.deepcopy(model).float()
    fxdp.unprivatize(ref)
    fxdp.privatize(ref, max_grad_norm=0.1)
    F.cross_entropy(ref(x.float()).float(), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.private_grad.float(), q.private_grad, rtol=5e-2, atol=2e-3)


def test_fp16_overflow_of_one_sample_zeroes_only_that_sample():
    """Per-sample overflow under a large loss scale (fp16 grad_output = inf) drops that sample
    (C = 0, counted, warned) and leaves the other samples' clipped sum exact."""
    torch.manual_seed(0)
    model = Autocast(Z.MLP(), torch.float16)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    weights = torch.ones(B)
    weights[3] = 8.0
    S = 2.0 ** 15

    def run(m, w, scale):
        fxdp.privatize(m, max_grad_norm=1.0, loss_reduction="sum")
        loss = (F.cross_entropy(m(x).float(), y, reduction="none") * w).sum()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (loss * scale).backward()
        return caught

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    caught = run(a, weights, S)
    assert fxdp.get_engine(a).last_stats["num_nonfinite"] == 1
    assert any("non-finite" in str(w.message) for w in caught)
    w0 = weights.clone()
    w0[3] = 0.0  # the same batch without sample 3's contribution
    run(b, w0, S)
    assert fxdp.get_engine(b).last_stats["num_nonfinite"] == 0
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.isfinite(p.private_grad).all()
        torch.testing.assert_close(p.private_grad, q.private_grad, rtol=1e-3, atol=1e-6)


def test_grad_scaler_loss_scale_does_not_change_clipping():
    torch.manual_seed(0)
    model = Autocast(Z.MLP(), torch.float16)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fxdp.privatize(a, max_grad_norm=1.3)
    fxdp.privatize(b, max_grad_norm=1.3, grad_scaler=scaler)
    F.cross_entropy(a(x).float(), y).backward()
    scaler.scale(F.cross_entropy(b(x).float(), y)).backward()
    na = fxdp.get_engine(a).last_stats["group_norms"]["all"]
    nb = fxdp.get_engine(b).last_stats["group_norms"]["all"]
    torch.testing.assert_close(na, nb, rtol=1e-2, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.private_grad, q.private_grad, rtol=1e-2, atol=1e-5)
    opt = fxdp.DPOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.3,
                           expected_batch_size=B)
    before = [p.detach().clone() for p in b.parameters()]
    scaler.step(opt)
    scaler.update()
    for p, q, p0 in zip(a.parameters(), b.parameters(), before):
        torch.testing.assert_close(p0 - q.detach(), 0.1 * p.private_grad / B, rtol=1e-2, atol=1e-6)


def test_scaled_loss_without_telling_fxdp_is_clipped_in_scaled_units():
    """What fxdp does today with a scaled loss (documented behaviour until coverage-3 lands): the
    engine sees S*g_b, so each clipped contribution is bounded by R in *scaled* units --
    privacy holds if noise is added before any unscaling, but the threshold on true gradients is R/S."""
    torch.manual_seed(0)
    model = Autocast(Z.MLP(), torch.float16)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fxdp.privatize(a, max_grad_norm=1.3)
    fxdp.privatize(b, max_grad_norm=1.3)
    F.cross_entropy(a(x).float(), y).backward()
    (F.cross_entropy(b(x).float(), y) * 1024.0).backward()
    na = fxdp.get_engine(a).last_stats["group_norms"]["all"]
    nb = fxdp.get_engine(b).last_stats["group_norms"]["all"]
    torch.testing.assert_close(nb, 1024.0 * na, rtol=1e-2, atol=0)
    assert bool((fxdp.get_engine(b).last_stats["clip_factors"]["all"] < 1).all())
    total = torch.sqrt(sum(p.private_grad.double().square().sum() for p in b.parameters()))
    assert float(total) <= 1.3 * B * (1 + 1e-4)


def test_scaler_step_with_a_model_that_does_not_know_the_scaler_is_refused():
    torch.manual_seed(0)
    model = fxdp.privatize(Autocast(Z.MLP(), torch.float16), max_grad_norm=1.0)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(F.cross_entropy(model(x).float(), y)).backward()
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=B)
    with pytest.raises(ValueError, match="grad_scaler=scaler"):
        scaler.step(opt)


def test_the_usual_amp_loop_with_unscale_and_clip_grad_norm_steps_the_clipped_sum():
    """``scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt); scaler.update()`` (the AMP recipe):
    unscale_ and clip_grad_norm_ are no-ops for fxdp (the engine undid the loss scale when it clipped per
    sample); the step is the same as without them (it raised torch's AssertionError in update before)."""
    torch.manual_seed(0)
    model = Autocast(Z.MLP(), torch.float16)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    updates = []
    for recipe in ("plain", "unscale"):
        m = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        fxdp.privatize(m, max_grad_norm=1.3, grad_scaler=scaler)
        opt = fxdp.DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.3,
                               expected_batch_size=B)
        before = [p.detach().clone() for p in m.parameters()]
        scaler.scale(F.cross_entropy(m(x).float(), y)).backward()
        if recipe == "unscale":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        updates.append([p0 - p.detach() for p0, p in zip(before, m.parameters())])
    assert any(bool(u.abs().max() > 0) for u in updates[0])
    for u, v in zip(*updates):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
