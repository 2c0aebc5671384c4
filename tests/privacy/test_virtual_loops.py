"""Input-gradient passes on models with virtual parameters (made from trainable ones before they meet the batch:
weight_norm, LoRA's ``W + A @ B``) contribute nothing, as for ordinary parameters: a PGD step's
``torch.autograd.grad(loss, x)`` is not a training pass. (A review found it counted as one: private gradients
twice the plain loop's and two batches in the ledger for one -- 2 R -- or a retained graph's
``autograd.grad`` then ``backward()`` refused.)"""
import copy

import pytest
import torch

import fxdp
from tests.models_zoo import ce_sum
from tests.privacy.virtual_models import LowRankSum, WeightNorm
from tests.reference import clipped_reference


MODELS = [pytest.param(WeightNorm, id="weight_norm"), pytest.param(LowRankSum, id="W+AB")]


def _data():
    torch.manual_seed(0)
    return torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("compiled", [pytest.param(False, id="eager"), pytest.param(True, id="compiled")])
@pytest.mark.parametrize("make", MODELS)
def test_an_input_gradient_pass_before_the_training_pass_contributes_nothing(make, compiled):
    """Compiled regions record a virtual parameter as a detached value: its sources answer (a review: 2 R)."""
    x, y = _data()
    template = make().double()

    def run(pgd_steps):
        privatized = fxdp.privatize(copy.deepcopy(template), max_grad_norm=0.1, loss_reduction="sum")
        model = torch.compile(privatized, backend="fxdp", options={"compiler": "aot_eager"}) if compiled \
            else privatized
        x_adv = x.clone()
        for _ in range(pgd_steps):
            probe = x_adv.clone().requires_grad_()
            g, = torch.autograd.grad(ce_sum(model(probe), y), probe)
            x_adv = (x_adv + 0.0 * g.sign()).detach()  # a zero step: the training batch is x itself
        ce_sum(model(x_adv), y).backward()
        return {n: p.private_grad.clone() for n, p in privatized.named_parameters()}, \
            fxdp.get_engine(privatized).ledger.batch_sizes

    plain, plain_ledger = run(0)
    adversarial, ledger = run(3)
    assert ledger == plain_ledger == [8]
    for name in plain:
        assert torch.allclose(adversarial[name], plain[name], rtol=1e-12, atol=0), name


@pytest.mark.parametrize("make", MODELS)
def test_a_retained_graph_gives_input_gradients_then_the_reference_clipped_sums(make):
    x, y = _data()
    template = make().double()
    expected, R, _, _ = clipped_reference(template, (x,), {}, y, ce_sum)
    model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=R, loss_reduction="sum")
    probe = x.clone().requires_grad_()
    loss = ce_sum(model(probe), y)
    torch.autograd.grad(loss, probe, retain_graph=True)
    loss.backward()
    assert fxdp.get_engine(model).ledger.batch_sizes == [8]
    for name, p in model.named_parameters():
        assert torch.allclose(p.private_grad, expected[name], rtol=1e-9, atol=1e-12), name
