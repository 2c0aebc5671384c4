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
