"""Setups that cannot be trained privately as given are refused before the first step, with an fxdp
error (also a ValueError) that names the cause and what to do.

Each was accepted before and measured from outside (noise off, neighbour sensitivity): a data set
that holds an example twice (2 R per Poisson step, 2.4 R per replace-one epoch), a second
PrivacyEngine on a model that already spent budget (ε restarted from zero), a token-mean criterion
that divides by the batch's non-ignored count, a lazy parameter (a raw torch error).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

import fxdp
from fxdp.core.errors import PrivacyConfigError, PrivacyError
from tests import models_zoo as Z


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _make_private(dataset, engine=None, model=None, poisson=True, **kw):
    model = model if model is not None else Z.MLP()
    engine = engine if engine is not None else fxdp.PrivacyEngine(accountant="rdp")
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=DataLoader(dataset, batch_size=4), noise_multiplier=1.0,
                               max_grad_norm=1.0, poisson_sampling=poisson, **kw)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("poisson", [True, False])
@pytest.mark.parametrize("wrap", ["concat of itself", "subset of a concat", "repeated subset"])
def test_a_data_set_holding_an_example_twice_is_refused_for_every_sampling(wrap, poisson):
    d = _data()
    dataset = {"concat of itself": lambda: ConcatDataset([d, d]),
               "subset of a concat": lambda: Subset(ConcatDataset([d, Subset(d, [3, 4])]), list(range(14))),
               "repeated subset": lambda: Subset(d, [0, 1, 0, 2, 3])}[wrap]()
    with pytest.raises(PrivacyConfigError, match="holds an example more than once"):
        _make_private(dataset, poisson=poisson)


def test_distinct_examples_across_wrappers_are_accepted():
    d, e = _data(), _data(5)
    for dataset in (ConcatDataset([d, e]), Subset(ConcatDataset([Subset(d, [0, 1]), Subset(d, [2, 3])]), [0, 1, 2, 3]),
                    ConcatDataset([Subset(d, [0, 1]), Subset(d, [5, 6])])):
        _make_private(dataset)


def test_a_second_privacy_engine_on_a_model_that_spent_budget_is_refused():
    """A fresh PrivacyEngine would report ε from zero (3.79 instead of 4.70 after two epochs)."""
    model, first, data = Z.MLP(), fxdp.PrivacyEngine(accountant="rdp"), _data()
    model, opt, loader = _make_private(data, engine=first, model=model)
    x, y = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(first.accountant) > 0
    with pytest.raises(PrivacyConfigError, match="already accounted by another PrivacyEngine"):
        _make_private(data, engine=fxdp.PrivacyEngine(accountant="rdp"), model=model)
    _make_private(data, engine=first, model=model)  # the same engine continues the run


def test_a_mean_criterion_that_ignores_padding_targets_is_refused_with_the_safe_form():
    crit = nn.CrossEntropyLoss(ignore_index=0)
    with pytest.raises(PrivacyConfigError, match=r"ignore_index=0.*not ignored.*per_sample_criterion"):
        _make_private(_data(), criterion=crit)
    _make_private(_data(), criterion=nn.CrossEntropyLoss(ignore_index=0, reduction="sum"))


def test_a_lazy_parameter_is_refused_until_a_forward_initialises_it():
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(PrivacyConfigError, match=r"0\.weight, 0\.bias.*lazy.*Run one forward"):
        fxdp.privatize(model)
    with torch.no_grad():
        model(torch.randn(2, 6))
    fxdp.privatize(model)
    model(torch.randn(3, 6)).sum().backward()
    assert all(p.private_grad.shape == p.shape for p in model.parameters())


def test_wrapper_refusals_are_fxdp_errors_and_value_errors():
    ddp_like = nn.DataParallel(Z.MLP())
    with pytest.raises(PrivacyConfigError, match="DPDistributed") as info:
        fxdp.privatize(ddp_like)
    assert isinstance(info.value, PrivacyError) and isinstance(info.value, ValueError)
