"""``loss.backward(inputs=...)`` trains exactly the parameters it names, virtual parameters included.

``inputs`` naming every parameter (what some training loops pass) gives the reference clipped sums; naming a
subset clips each sample's gradient with respect to that subset (the reference's per-sample gradients with the
other parameters' parts zeroed, the plan's groups) and gives the others zeros. A parameter transformed before
it meets the batch (``weight_norm``, ``W + A @ B``, a gathered relative position bias, an IA3 scale) counts as
the parameters it was made from. (A review found its uses silently dropped in eager mode: it was a fresh leaf,
in no ``inputs``, so autograd skipped the taps where it met the batch -- the sources got zeros, or nothing at
all when no ordinary parameter was named, and the other parameters were clipped with a wrong norm.)"""
import copy

import pytest
import torch

import fxdp
from fxdp import PrivacyError
from tests.models_zoo import ce_sum
from tests.privacy.virtual_models import IA3, LowRankSum, RelativeBias, WeightNorm, data
from tests.reference import median_threshold, per_sample_gradients, reference_private_grads, split_batch

MODELS = [pytest.param(lambda: WeightNorm(bias=False), id="weight_norm"), pytest.param(LowRankSum, id="W+AB"),
          pytest.param(RelativeBias, id="relative_bias"), pytest.param(IA3, id="IA3"),
          pytest.param(WeightNorm, id="weight_norm+bias")]  # a virtual and an ordinary parameter in one use
COMPILED = [pytest.param(False, id="eager"), pytest.param(True, id="compiled")]
SUBSETS = {
    "sources": lambda n: not n.startswith("head"),  # the virtual parameters' sources (and fc.bias)
    "head": lambda n: n.startswith("head"),  # ordinary parameters only
    "one source": lambda n: n in ("fc.parametrizations.weight.original1", "w", "table", "s"),
}


def _run(make, keep, compiled=False):
    """One backward(inputs=[the parameters ``keep`` names]); returns (model, expected, x, y)."""
    torch.manual_seed(0)
    template = make().double()
    x, y = data(template)
    per_sample = per_sample_gradients(copy.deepcopy(template), split_batch((x,), {}, y), ce_sum)
    per_sample = [{n: g if keep(n) else torch.zeros_like(g) for n, g in s.items()} for s in per_sample]
    groups = [list(g) for g in fxdp.get_engine(fxdp.privatize(copy.deepcopy(template))).plan.groups]
    R = median_threshold(per_sample, groups)
    expected, _ = reference_private_grads(per_sample, groups, R)
    model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=R, loss_reduction="sum")
    run = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}) if compiled else model
    ce_sum(run(x), y).backward(inputs=[p for n, p in model.named_parameters() if p.requires_grad and keep(n)])
    return model, expected, x, y


def _check(model, expected):
    assert fxdp.get_engine(model).ledger.batch_sizes == [8]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is None, name
        assert torch.allclose(p.private_grad, expected[name], rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("make", MODELS)
def test_backward_with_inputs_naming_every_parameter_gives_the_reference_clipped_sums(make):
    _check(*_run(make, lambda n: True)[:2])


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("make", MODELS[:2] + MODELS[4:])
def test_backward_with_inputs_naming_a_subset_clips_the_gradient_with_respect_to_that_subset(make, subset, compiled):
    model, expected, _, _ = _run(make, SUBSETS[subset], compiled)
    assert any(float(e.abs().max()) > 0 for e in expected.values())
    _check(model, expected)


@pytest.mark.parametrize("make", MODELS[2:4])
def test_backward_with_inputs_naming_one_virtual_source_gives_its_reference_clipped_sum(make):
    _check(*_run(make, SUBSETS["one source"])[:2])


@pytest.mark.parametrize("make", MODELS)
def test_backward_with_inputs_restricted_to_the_data_contributes_nothing_through_virtual_parameters(make):
    torch.manual_seed(0)
    model = fxdp.privatize(make().double(), max_grad_norm=1.0, loss_reduction="sum")
    x, y = data(model)
    probe = x.clone().requires_grad_()
    ce_sum(model(probe), y).backward(inputs=[probe])
    assert probe.grad is not None
    assert fxdp.get_engine(model).ledger.batch_sizes == []
    assert all(getattr(p, "private_grad", None) is None for p in model.parameters())


@pytest.mark.parametrize("make", MODELS)
def test_autograd_grad_with_respect_to_a_virtual_parameters_source_is_refused(make):
    torch.manual_seed(0)
    model = fxdp.privatize(make().double(), max_grad_norm=1.0, loss_reduction="sum")
    x, y = data(model)
    source = [p for n, p in model.named_parameters() if SUBSETS["one source"](n)]
    with pytest.raises(PrivacyError, match="autograd.grad"):
        torch.autograd.grad(ce_sum(model(x), y), source)


def _micro_batches(subsets, size):
    """A step of micro-batches of ``size`` rows, micro-batch k calling backward(inputs=...) with subsets[k % len]."""
    from tests.privacy.loops import ce

    def body(model, opt, x, y):
        opt.zero_grad()
        for k, i in enumerate(range(0, len(x), size)):
            keep = subsets[k % len(subsets)]
            ce(model, x[i:i + size], y[i:i + size]).backward(
                inputs=[p for n, p in model.named_parameters() if keep(n)])
        opt.step()
    return body


def test_micro_batches_of_one_step_training_different_subsets_are_refused():
    """Alternating subsets clip each example over the subset of the micro-batch it falls in, which depends on
    the other examples: removing one shifts the rest (7 R measured without the check)."""
    from tests.privacy.loops import loop_data, mlp_template, one_step
    template = mlp_template()
    first = next(iter(dict(template.named_parameters()))).split(".")[0]
    x, y = loop_data(4)
    with pytest.raises(PrivacyError, match="train different parameters"):
        one_step(template, x, y, 0.05, "all-layer", "abadi",
                 _micro_batches([lambda n: n.startswith(first), lambda n: not n.startswith(first)], 1))


def test_micro_batches_of_one_step_training_the_same_subset_move_the_step_at_most_R():
    from tests.privacy.loops import loop_data, max_move, mlp_template
    template = mlp_template()
    first = next(iter(dict(template.named_parameters()))).split(".")[0]
    x, y = loop_data(4)
    move, full, _ = max_move(template, x, y, 0.05, "all-layer", "abadi",
                             _micro_batches([lambda n: n.startswith(first)], 1))
    assert move > 0.1 * 0.05  # the step moved: the bound is not met by a step that trains nothing
    assert all(float(v.abs().max()) == 0.0 for n, v in full.items() if not n.startswith(first))
