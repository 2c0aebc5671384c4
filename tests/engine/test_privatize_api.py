"""privatize keeps the model object; unprivatize restores it; bad input is refused."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z


def _step(model, x, y):
    F.cross_entropy(model(x), y).backward()


def test_privatize_returns_same_object_class_params_and_state_dict_keys():
    model = Z.MLP()
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    out = fxdp.privatize(model, style="block-wise")
    assert out is model and type(out) is Z.MLP and isinstance(out, nn.Module)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before


def test_private_grad_is_written_and_plain_grad_is_not():
    model = fxdp.privatize(Z.MLP())
    _step(model, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    for p in model.parameters():
        assert p.grad is None
        assert p.private_grad.shape == p.shape and torch.isfinite(p.private_grad).all()


def test_unprivatize_restores_forward_hooks_and_attributes():
    model = Z.MLP()
    x = torch.randn(4, 6)
    ref = model(x).detach()
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    fxdp.privatize(model)
    _step(model, x, torch.randint(0, 3, (4,)))
    fxdp.unprivatize(model)
    assert not fxdp.is_privatized(model)
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert not any(hasattr(p, "private_grad") for p in model.parameters())
    assert "_fxdp_engine" not in model.__dict__
    torch.testing.assert_close(model(x), ref)
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_deepcopy_and_pickle_of_privatized_model_stay_private():
    model = fxdp.privatize(Z.MLP(), max_grad_norm=0.5)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert fxdp.is_privatized(clone)
        assert fxdp.get_engine(clone).model is clone
        _step(clone, x, y)
        assert all(p.grad is None and hasattr(p, "private_grad") for p in clone.parameters())
        assert not any(hasattr(p, "private_grad") for p in model.parameters())


def test_two_backwards_accumulate_like_one_backward_on_the_concatenated_batch():
    torch.manual_seed(0)
    base = Z.MLP().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    a = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3)
    F.cross_entropy(a(x[:3]), y[:3]).backward()
    F.cross_entropy(a(x[3:]), y[3:]).backward()
    b = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3)
    F.cross_entropy(b(x), y).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.private_grad, pb.private_grad, rtol=1e-12, atol=1e-12)


def test_frozen_parameters_get_nothing_and_are_not_tapped():
    model = Z.MLP()
    model.fc1.weight.requires_grad_(False)
    fxdp.privatize(model)
    _step(model, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert not hasattr(model.fc1.weight, "private_grad") and model.fc1.weight.grad is None
    assert hasattr(model.fc1.bias, "private_grad")


def test_no_grad_and_inference_mode_forwards_store_nothing():
    model = fxdp.privatize(Z.MLP())
    with torch.no_grad():
        model(torch.randn(4, 6))
    with torch.inference_mode():
        model(torch.randn(4, 6))
    assert fxdp.get_engine(model).tables == {}


def test_unused_forward_is_released_with_its_graph():
    import gc
    import weakref
    model = fxdp.privatize(Z.MLP())
    out = model(torch.randn(4, 6))
    ctx_ref = weakref.ref(out.grad_fn.use.context)  # the tap's record of this forward
    assert ctx_ref() is not None
    del out
    gc.collect()
    assert ctx_ref() is None


def test_empty_batch_gives_zero_private_grads():
    model = fxdp.privatize(Z.MLP())
    out = model(torch.randn(0, 6))
    out.sum().backward()
    for p in model.parameters():
        assert torch.count_nonzero(p.private_grad) == 0


def test_batch_of_one_matches_plain_clipped_gradient():
    torch.manual_seed(1)
    base = Z.MLP().double()
    x, y = torch.randn(1, 6, dtype=torch.float64), torch.randint(0, 3, (1,))
    ref = copy.deepcopy(base)
    F.cross_entropy(ref(x), y).backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters()))
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=float(norm) / 2)
    F.cross_entropy(model(x), y).backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.private_grad, r.grad * (float(norm) / 2) / (float(norm) + 1e-6))


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,match", [
    (dict(style="row-wise"), "ClippingStyle"),
    (dict(clipping_fn="soft"), "ClippingFn"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(loss_reduction="median"), "LossReduction"),
    (dict(style="block-wise", block_heads=["nope"]), "name no module"),
    (dict(style="all-layer", block_heads=["fc1"]), "block-wise"),
    (dict(numerical_stability_constant=-1.0), "numerical_stability_constant"),
])
def test_bad_arguments_raise_value_error_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fxdp.privatize(Z.MLP(), **kwargs)


def test_privatizing_twice_is_refused():
    model = fxdp.privatize(Z.MLP())
    with pytest.raises(ValueError, match="already privatized"):
        fxdp.privatize(model)


class _BroadcastTensors(nn.Module):
    """A multi-output op taking a parameter and the batch: no rule, and the fallback needs one output.
    (A batch-free ``torch.unbind(self.w)`` is covered: a virtual parameter, tests/rules/test_virtual.py.)"""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        a, b = torch.broadcast_tensors(x, self.w)
        return a * b


def test_parameter_used_by_an_uncovered_op_is_refused_naming_it():
    model = fxdp.privatize(_BroadcastTensors())
    with pytest.raises(fxdp.UncoveredParameterError, match=r"w.*broadcast_tensors"):
        model(torch.randn(4, 3))


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_batchnorm_in_training_mode_is_refused_with_advice():
    model = fxdp.privatize(_BN())
    with pytest.raises(fxdp.SampleMixingError, match="GroupNorm"):
        model(torch.randn(4, 4))


class _BatchMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.fc(x)
        return self.out(h - h.mean(0, keepdim=True))


def test_reduction_over_the_batch_is_refused_as_sample_mixing():
    model = fxdp.privatize(_BatchMean())
    with pytest.raises(fxdp.SampleMixingError, match="mixed"):
        model(torch.randn(5, 4))


def test_one_backward_over_two_forwards_is_refused():
    model = fxdp.privatize(Z.MLP())
    x = torch.randn(4, 6)
    loss = model(x).sum() + model(x).sum()
    with pytest.raises(fxdp.PrivacyError, match="forward passes"):
        loss.backward()


def test_parameter_made_trainable_after_privatize_is_refused():
    model = Z.MLP()
    model.fc1.weight.requires_grad_(False)
    fxdp.privatize(model, style="param-wise")
    model.fc1.weight.requires_grad_(True)
    with pytest.raises(fxdp.PrivacyError, match="became trainable"):
        model(torch.randn(4, 6))


def test_model_without_trainable_parameters_is_refused():
    model = Z.MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        fxdp.privatize(model)


def test_missing_batch_dimension_is_refused():
    model = fxdp.privatize(Z.MLP(), batch_dim=3)
    with pytest.raises(fxdp.BatchLayoutError, match="batch size"):
        model(torch.randn(4, 6))


class _ParamAsInput(nn.Module):
    """A parameter as the input of a linear op whose weight is the batch. (A batch-free
    ``conv(self.table)`` is covered: a virtual parameter, tests/rules/test_virtual.py.)"""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2, 5))

    def forward(self, x):
        return F.linear(self.table, x).t()


def test_parameter_in_an_uncovered_position_of_a_covered_op_is_refused():
    model = fxdp.privatize(_ParamAsInput())
    with pytest.raises(fxdp.UncoveredParameterError, match="table"):
        model(torch.randn(3, 5))


def test_two_separately_privatized_models_in_one_loss_are_refused():
    enc = fxdp.privatize(nn.Sequential(nn.Linear(6, 8), nn.Tanh()))
    head = fxdp.privatize(nn.Linear(8, 3))
    with pytest.raises(fxdp.PrivacyError, match="two separately privatized"):
        F.cross_entropy(head(enc(torch.randn(4, 6))), torch.randint(0, 3, (4,))).backward()


def test_privatizing_a_model_whose_submodule_is_privatized_is_refused():
    model = Z.MLP()
    fxdp.privatize(model.fc1)
    with pytest.raises(ValueError, match="already privatized"):
        fxdp.privatize(model)


def test_engine_recovers_after_a_backward_that_failed_midway():
    torch.manual_seed(0)
    base = Z.MLP().double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    other = fxdp.privatize(nn.Linear(3, 3).double())
    with pytest.raises(fxdp.PrivacyError):
        F.cross_entropy(other(model(x)), y).backward()
    fxdp.clear_private_grads(model)
    F.cross_entropy(model(x), y).backward()
    ref = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.private_grad, q.private_grad)


class _InplaceAfterUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 2)

    def forward(self, x):
        h = self.l1(x)
        out = self.l2(h)
        h.mul_(2.0)  # changes l2's saved input after l2 used it (autograd itself needs none of it)
        return out + h.sum(1, keepdim=True)


def test_in_place_change_of_a_consumed_layer_input_is_refused():
    model = fxdp.privatize(_InplaceAfterUse())
    with pytest.raises(fxdp.PrivacyError, match="modified in place"):
        model(torch.randn(3, 4)).sum().backward()


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, t, x):
        return self.fc(x) * t


def test_shared_leading_input_that_would_hide_the_batch_is_refused_and_batch_dim_resolves_it():
    model = fxdp.privatize(_TwoInputs())
    t, x = torch.tensor([0.5]), torch.randn(8, 6)
    with pytest.raises(fxdp.BatchLayoutError, match="ambiguous"):
        model(t, x)
    fxdp.unprivatize(model)
    fxdp.privatize(model, batch_dim={0: None, 1: 0})
    model(t, x).sum().backward()
    assert fxdp.get_engine(model).last_stats["batch_size"] == 8


class _Branchy(nn.Module):
    """Which layer runs depends on the data (the sign of a batch-free input: a branch on the batch's own
    sum, ``x.sum() > 0``, would let one sample switch the layer of every other sample, and is refused as
    sample mixing, see tests/privacy/test_checks.py)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, gate):
        return self.h(self.a(x) if gate > 0 else self.b(x))


def test_data_dependent_control_flow_is_reanalysed_and_stays_exact():
    torch.manual_seed(0)
    base = _Branchy().double()
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3)
    for shift in (-3.0, 3.0, -3.0):
        x = torch.randn(5, 4, dtype=torch.float64)
        gate = torch.tensor(shift)
        fresh = fxdp.privatize(copy.deepcopy(model_state(base, model)), max_grad_norm=0.3)
        model(x, gate).sum().backward()
        fresh(x, gate).sum().backward()
        for p, q in zip(model.parameters(), fresh.parameters()):
            torch.testing.assert_close(p.private_grad, q.private_grad)
        fxdp.clear_private_grads(model)


def model_state(base, model):
    """A plain copy of ``base`` carrying ``model``'s current weights."""
    clone = copy.deepcopy(base)
    clone.load_state_dict(model.state_dict())
    return clone
