"""Backend "fxdp" gives the clipped sums of eager privatize (itself checked against the
one-sample-at-a-time reference), in one graph, for every style and clipping function."""
import copy

import pytest
import torch

import fxdp
from tests import reference as ref
from tests.compile.models import assert_same_private_grads, case, compiled_and_eager


@pytest.mark.parametrize("name", [  # GPT-2 in one graph by default: test_gpt2_in_one_graph_matches_... below
    "mlp", "cnn", "seq", "raw", pytest.param("gpt2", marks=pytest.mark.slow), "bert", "encoder"])
def test_fullgraph_compile_equals_eager_privatize(name):
    torch.manual_seed(0)
    base, args, target, loss_fn, kw = case(name)
    model, eager = compiled_and_eager(base, args, target, loss_fn, max_grad_norm=0.05, **kw)
    assert_same_private_grads(model, eager)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise", "param-wise", "block-wise"])
@pytest.mark.parametrize("clipping_fn", ["abadi", "automatic", "global"])
def test_every_style_and_clipping_function_equals_eager(style, clipping_fn):
    torch.manual_seed(1)
    base, args, target, loss_fn, kw = case("seq", B=6)
    model, eager = compiled_and_eager(base, args, target, loss_fn, style=style, clipping_fn=clipping_fn,
                                      max_grad_norm=0.3, **kw)
    assert_same_private_grads(model, eager)


@pytest.mark.parametrize("compiler", [  # inductor end to end by default: test_inplace_methods_under_inductor
    "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])  # inductor: ~10 s warm, ~40 s cold (kernels)
def test_gpt2_in_one_graph_matches_the_per_sample_reference(compiler):
    """Against brute force directly: R at the median per-sample norm, so some samples are clipped."""
    torch.manual_seed(2)
    base, (ids,), target, loss_fn, _ = case("gpt2", B=4)
    samples = ref.split_batch((ids,), {}, target)
    per_sample = ref.per_sample_gradients(copy.deepcopy(base), samples, loss_fn)
    names = [n for n, _ in base.named_parameters()]
    R = ref.median_threshold(per_sample, [names])
    expected, norms = ref.reference_private_grads(per_sample, [names], R)
    clipped = sum(float(n[0]) > R for n in norms)
    assert 0 < clipped < len(norms)
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=R, loss_reduction="sum")
    compiled = torch.compile(model, backend="fxdp", options={"compiler": compiler}, fullgraph=True)
    loss_fn(compiled(ids), target).backward()
    scale = max(float(e.abs().max()) for e in expected.values())
    for name, p in model.named_parameters():
        assert p.grad is None
        assert float((p.private_grad - expected[name]).abs().max()) < 1e-9 * scale, name


def test_user_graph_break_keeps_all_layer_clipping_exact():
    """Norms are combined across regions before any clipped sum is formed."""
    from tests.compile.models import BrokenMLP
    torch.manual_seed(3)
    base = BrokenMLP().double()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    model, eager = compiled_and_eager(base, (x,), y, ref_loss, fullgraph=False, max_grad_norm=0.1)
    assert_same_private_grads(model, eager)
    norms = fxdp.get_engine(model).last_stats["group_norms"]
    assert len(norms) == 1  # one all-layer group spanning both regions


def ref_loss(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="sum")


def test_varying_batch_sizes_are_exact_with_bounded_recompiles():
    torch.manual_seed(4)
    base, _, _, loss_fn, _ = case("seq")
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.2)
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.2)
    compiles = []

    def counting(gm, inputs):
        compiles.append(1)
        from fxdp.compile.backend import fxdp_backend
        return fxdp_backend(gm, inputs, {"compiler": "aot_eager"})

    compiled = torch.compile(model, backend=counting)
    for B in (5, 3, 7, 6, 2, 4, 9, 1):
        ids, y = torch.randint(0, 20, (B, 6)), torch.randint(0, 3, (B,))
        loss_fn(eager(ids), y).backward()
        loss_fn(compiled(ids), y).backward()
    assert_same_private_grads(model, eager)
    assert len(compiles) <= 3  # static first batch, one dynamic-B graph, B = 1 (specialised by dynamo)


def test_batch_of_one_and_empty_batch():
    torch.manual_seed(5)
    base, _, _, loss_fn, _ = case("mlp")
    for B in (1, 0):
        x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
        model, eager = compiled_and_eager(base, (x,), y, loss_fn, max_grad_norm=0.2)
        assert_same_private_grads(model, eager)
        if B == 0:
            assert all(float(p.private_grad.abs().max()) == 0 for p in model.parameters())


def test_bf16_autocast_norms_and_sums_in_fp32():
    torch.manual_seed(6)
    base, args, target, loss_fn, _ = case("seq", B=6)
    base = base.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model, eager = compiled_and_eager(base, args, target, loss_fn, max_grad_norm=0.3)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.private_grad.dtype == torch.float32 and p.grad is None
        torch.testing.assert_close(p.private_grad, q.private_grad, rtol=0.05, atol=2e-3, msg=name)


def test_compiling_a_function_that_calls_the_model_stays_exact():
    """torch.compile(step_fn): dynamo traces the hooks, so the taps run eagerly between compiled
    regions (graph breaks, still exact); only torch.compile(model) gives one graph."""
    torch.manual_seed(7)
    base, args, target, loss_fn, _ = case("mlp")
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.05)
    loss_fn(eager(*args), target).backward()
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.05)

    @torch.compile(backend="fxdp", options={"compiler": "aot_eager"})
    def step(x, y):
        return loss_fn(model(x), y)

    step(*args, target).backward()
    assert_same_private_grads(model, eager)
