"""Diffusion transformers with three inputs (x, t, y) under fxdp, against the
per-sample reference (float64, R near the median norm): a self-contained
DiT-style model (adaLN-Zero, MHA, raw position table) and diffusers'
DiTTransformer2DModel (when diffusers is installed)."""
import copy

import pytest
import torch

import fxdp
from tests.models.dit import TinyDiT, diffusion_loss
from tests.models.helpers import STYLES, check_against_reference

B = 4


def batch(dtype=torch.float64, t_shape=(B,), t_float=False):
    torch.manual_seed(1)
    x = torch.randn(B, 3, 8, 8, dtype=dtype)
    t = torch.rand(t_shape, dtype=dtype) * 1000 if t_float else torch.randint(0, 1000, t_shape)
    y = torch.randint(0, 6, (B,))
    noise = torch.randn(B, 3, 8, 8, dtype=dtype)
    return x, t, y, noise


@pytest.mark.parametrize("style", STYLES)
def test_dit_with_per_sample_timesteps_and_labels_equals_reference(style):
    torch.manual_seed(0)
    model = TinyDiT().double()
    x, t, y, noise = batch()
    check_against_reference(model, (x, t, y), {}, noise, diffusion_loss, style=style)


@pytest.mark.parametrize("clipping_fn", ["automatic", "global"])
def test_dit_with_float_timesteps_and_sum_reduction_equals_reference(clipping_fn):
    torch.manual_seed(0)
    model = TinyDiT().double()
    x, t, y, noise = batch(t_float=True)

    def loss(pred, n):
        return (pred - n).square().flatten(1).mean(1).sum()

    check_against_reference(model, (x, t, y), {}, noise, loss, style="block-wise", clipping_fn=clipping_fn,
                            loss_reduction="sum")


def test_dit_timestep_shared_by_the_batch_is_not_taken_for_a_batch_dimension():
    """A 0-dim t expanded to (B,) inside the model: exact (t is not split per sample)."""
    torch.manual_seed(0)
    model = TinyDiT().double()
    x, _, y, noise = batch()
    t = torch.tensor(417)
    samples = [((x[i:i + 1], t, y[i:i + 1]), {}, noise[i:i + 1]) for i in range(B)]
    check_against_reference(model, (x, t, y), {}, noise, diffusion_loss, samples=samples)


def test_dit_broadcasting_a_shared_timestep_embedding_equals_reference():
    """The t-MLP runs on a (1, F) input and its output is broadcast over the batch: it was refused
    (per-sample gradients no longer exist after the broadcast); the t-MLP's output is now a virtual
    parameter whose per-sample gradient is taken where it meets the batch (fxdp.rules.virtual)."""
    torch.manual_seed(0)
    model = TinyDiT(broadcast_shared_t=True).double()
    x, _, y, noise = batch()
    t = torch.tensor(417)
    samples = [((x[i:i + 1], t, y[i:i + 1]), {}, noise[i:i + 1]) for i in range(B)]
    r = check_against_reference(model, (x, t, y), {}, noise, diffusion_loss, samples=samples)
    table = next(iter(r["engine"].tables.values()))
    assert any(v and "t_mlp" in "".join(names) for v, (_, names) in zip(table.virtual, table.keys))


def test_dit_with_keyword_inputs_equals_positional():
    torch.manual_seed(0)
    model = TinyDiT().double()
    x, t, y, noise = batch()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fxdp.privatize(a, max_grad_norm=0.5)
    fxdp.privatize(b, max_grad_norm=0.5)
    diffusion_loss(a(x, t, y), noise).backward()
    diffusion_loss(b(x, y=y, t=t), noise).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.private_grad, pb.private_grad, msg=n)


def diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import LabelEmbedding

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                            norm_num_groups=1).double()
    return model, LabelEmbedding


def diffusers_loss(out, noise):
    return diffusion_loss(out.sample, noise)


@pytest.mark.parametrize("style", STYLES)
def test_diffusers_dit_equals_reference(style):
    model, LabelEmbedding = diffusers_dit()
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0  # classifier-free label dropout is random per call: see the test below
    torch.manual_seed(1)
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    noise = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    check_against_reference(model, (x, t, y), {}, noise, diffusers_loss, style=style)


def set_label_dropout(model, p):
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = p


def test_diffusers_dit_with_certain_label_dropout_equals_reference():
    """Label dropout (classifier-free guidance) draws torch.rand(B) per call; with p = 1 every
    label is replaced by the null class, deterministically, so the reference can follow it."""
    model, _ = diffusers_dit()
    set_label_dropout(model, 1.0)
    torch.manual_seed(2)
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    noise = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    check_against_reference(model, (x, t, y), {}, noise, diffusers_loss, style="block-wise")


def test_diffusers_dit_with_random_label_dropout_trains_with_bounded_contributions():
    model, _ = diffusers_dit()
    set_label_dropout(model, 0.5)
    fxdp.privatize(model, max_grad_norm=0.01)
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    diffusers_loss(model(x, t, y), torch.randn(B, 4, 8, 8, dtype=torch.float64)).backward()
    stats = fxdp.get_engine(model).last_stats
    assert stats["batch_size"] == B and stats["num_nonfinite"] == 0
    total = torch.sqrt(sum(p.private_grad.square().sum() for p in model.parameters()))
    assert float(total) <= 0.01 * B * (1 + 1e-9)
