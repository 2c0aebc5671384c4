"""Every trainable parameter the engine clips is in the optimizer, and every private gradient is stepped or
cleared: a parameter outside the optimizer, or unfrozen after make_private, is refused
(:mod:`tests.privacy.loops`)."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp import PrivacyError
from tests.privacy.loops import N, ce, loop_data, make_private_loop, mlp_template

def test_a_trainable_parameter_outside_the_optimizer_is_refused():
    template = mlp_template()
    x, y = loop_data()
    model = copy.deepcopy(template)
    with pytest.raises(PrivacyError, match="fc2.weight, fc2.bias"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.fc1.parameters(), lr=0.1),
                                          data_loader=DataLoader(TensorDataset(x, y), batch_size=2),
                                          noise_multiplier=1.0, max_grad_norm=1.0)
    model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=1.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.fc1.parameters(), lr=0.1), 0.0, 1.0, expected_batch_size=N)
    ce(model, x, y).backward()
    with pytest.raises(PrivacyError, match="not in the optimizer"):
        opt.step()


def test_zero_grad_and_step_clear_every_private_gradient_of_the_model():
    """Every parameter the engine clipped is stepped or cleared: nothing survives a step or zero_grad."""
    template = mlp_template()
    x, y = loop_data()
    model, opt, loader = make_private_loop(template, x, y, 1.0, "all-layer", "abadi")
    engine = fxdp.get_engine(model)
    for xb, yb in loader:
        ce(model, xb, yb).backward()
        assert engine.ledger.samples == N
        opt.zero_grad()
        assert engine.ledger.samples == 0 and all(not hasattr(p, "private_grad") for p in model.parameters())
        ce(model, xb, yb).backward()
        opt.step()
    assert engine.ledger.samples == 0 and all(not hasattr(p, "private_grad") for p in model.parameters())


def test_a_parameter_unfrozen_after_make_private_is_refused():
    """The way to add_param_group a parameter later: it must not be trainable (and clipped) before."""
    template = mlp_template()
    x, y = loop_data()
    model = copy.deepcopy(template)
    model.fc2.requires_grad_(False)
    model, opt, loader = fxdp.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.fc1.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=N), noise_multiplier=0.0, max_grad_norm=1.0)
    model.fc2.requires_grad_(True)
    opt.add_param_group({"params": list(model.fc2.parameters())})
    xb, yb = next(iter(loader))
    with pytest.raises(PrivacyError, match="became trainable"):
        ce(model, xb, yb).backward()
