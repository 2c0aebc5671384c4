"""Accounting: ε equals opacus.accountants' value at the sampler's own rate; σ search reaches the target."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.accountants import create_accountant as opacus_accountant
from opacus.accountants.utils import get_noise_multiplier as opacus_sigma
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset, WeightedRandomSampler

import fxdp
from fxdp import PrivacyError
from fxdp.training import accounting as A
from tests.training.stack_helpers import make_data, make_loader, make_model


def _train(model, optimizer, loader, epochs=1):
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def _opacus_eps(mech, sigma, q, steps, delta):
    acc = opacus_accountant(mech)
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("mech", ["rdp", "prv"])
def test_get_epsilon_equals_opacus_accountant_at_the_samplers_rate(mech):
    x, y = make_data(40)
    user_loader = DPDataLoader(TensorDataset(x, y), sample_rate=0.3, generator=torch.Generator().manual_seed(0))
    engine = fxdp.PrivacyEngine(accountant=mech)
    model = make_model()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=user_loader, noise_multiplier=1.2, max_grad_norm=1.0)
    assert loader.sample_rate == 0.3 and opt.expected_batch_size == pytest.approx(0.3 * 40)
    _train(model, opt, loader)
    steps = len(user_loader)
    assert engine.accountant.history == [(1.2, 0.3, steps)]
    assert engine.get_epsilon(1e-5) == pytest.approx(_opacus_eps(mech, 1.2, 0.3, steps, 1e-5), rel=1e-12)


def test_make_private_with_epsilon_reaches_the_target():
    loader = make_loader(n=64, batch_size=16, sampler_seed=0)
    engine = fxdp.PrivacyEngine(accountant="prv")
    model = make_model()
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    _train(model, opt, loader, epochs=2)
    assert engine.accountant.history == [(opt.noise_multiplier, 0.25, 8)] and 2 * len(loader) == 8
    eps = engine.get_epsilon(1e-5)
    assert 3.0 - 0.05 <= eps <= 3.0
    want = opacus_sigma(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=8, accountant="prv")
    assert opt.noise_multiplier == pytest.approx(want)


def test_epsilon_is_zero_before_any_step_and_infinite_after_a_noiseless_step():
    acc = A.create_accountant("prv")
    assert A.epsilon_spent(acc, 1e-5) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert A.epsilon_spent(acc, 1e-5) == math.inf


def test_sampling_is_read_from_the_actual_sampler():
    x, y = make_data(50)
    ds = TensorDataset(x, y)
    poisson = A.sampling_of(DPDataLoader(ds, sample_rate=0.2))
    assert poisson.poisson and poisson.sample_rate == 0.2 and poisson.expected_batch_size == pytest.approx(10)
    shuffled = A.sampling_of(DataLoader(ds, batch_size=10, shuffle=True))
    assert not shuffled.poisson and shuffled.expected_batch_size == 10 and shuffled.steps_per_epoch == 5


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=5, sampler=RandomSampler(ds, replacement=True)),
    lambda ds: DataLoader(ds, batch_size=5, sampler=WeightedRandomSampler(torch.ones(len(ds)), len(ds))),
    lambda ds: DataLoader(ds, batch_size=5, sampler=RandomSampler(ds, num_samples=3 * len(ds))),
])
def test_samplers_that_can_repeat_an_example_are_refused(make):
    x, y = make_data(20)
    with pytest.raises(PrivacyError, match="several times|unknown"):
        A.sampling_of(make(TensorDataset(x, y)))


def test_iterable_dataset_is_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(PrivacyError, match="IterableDataset"):
        A.sampling_of(DataLoader(Stream(), batch_size=4))


def test_non_poisson_loader_is_charged_one_full_batch_gaussian_of_sensitivity_2R_per_epoch():
    loader = make_loader(n=32, batch_size=8)  # sequential batches: no subsampling amplification
    engine = fxdp.PrivacyEngine(accountant="rdp")
    model = make_model()
    with pytest.warns(UserWarning, match="no amplification"):
        model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                 data_loader=loader, noise_multiplier=2.0, max_grad_norm=1.0,
                                                 poisson_sampling=False)
    _train(model, opt, loader, epochs=2)
    _train(model, opt, [next(iter(loader))])  # a partial third epoch counts as a whole one
    # replace-one adjacency: one step per epoch moves by 2R, so sigma = 2 is charged as 1 (noise / sensitivity)
    assert engine.accountant.history == [(1.0, 1.0, 3)]
    assert engine.sampling.adjacency == "replace-one"
    assert engine.get_epsilon(1e-5) == pytest.approx(_opacus_eps("rdp", 1.0, 1.0, 3, 1e-5))


def test_noise_multiplier_dropping_inside_a_non_poisson_epoch_is_refused():
    acc = A.create_accountant("rdp")
    hook = A.EpochCharge(acc)

    class Opt:
        noise_multiplier = 2.0

    opt = Opt()
    hook(opt)
    opt.noise_multiplier = 1.0
    with pytest.raises(PrivacyError, match="inside an epoch"):
        hook(opt)


def test_get_noise_multiplier_matches_opacus_and_rounds_steps_up():
    assert A.steps_for_epochs(3, 0.01) == 300 and A.steps_for_epochs(2, 1 / 29) == 58
    got = A.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, epochs=2, accountant="rdp")
    assert got == opacus_sigma(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, steps=40, accountant="rdp")


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_epsilon=0.0), "target_epsilon"),
    (dict(target_delta=1.0), "target_delta"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(epochs=None), "exactly one"),
    (dict(steps=10), "exactly one"),
    (dict(accountant="moments"), "unknown accountant"),
])
def test_bad_accounting_arguments_are_refused(kwargs, match):
    base = dict(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.1, epochs=1, accountant="rdp")
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        A.get_noise_multiplier(**base)


def test_gdp_accountant_is_available_but_opacus_warns_it_can_underestimate():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxdp.PrivacyEngine(accountant="gdp")
    assert any("underestimate" in str(w.message) for w in caught)


def _epochs_charged(loop):
    """Run ``loop(model, opt, loader)`` on a non-Poisson PrivacyEngine; return the charged epochs."""
    import warnings

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    model = nn.Linear(4, 3)
    engine = fxdp.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                 data_loader=DataLoader(data, batch_size=10, shuffle=True),
                                                 noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    loop(model, opt, loader)
    return sum(n for _, _, n in engine.accountant.history)


def test_non_poisson_passes_cut_short_are_each_charged():
    def loop(model, opt, loader):
        for _ in range(3):
            for i, (x, y) in enumerate(loader):
                if i == 2:
                    break
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    assert _epochs_charged(loop) == 3


def test_non_poisson_gradient_accumulation_charges_every_epoch():
    def loop(model, opt, loader):
        for _ in range(3):
            for i, (x, y) in enumerate(loader):
                F.cross_entropy(model(x), y).backward()
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
    assert _epochs_charged(loop) == 3


@pytest.mark.parametrize("rate", [0.0, 1.5, "q"])
def test_attach_accountant_refuses_a_sampling_rate_outside_0_1(rate):
    opt = fxdp.DPOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="sample_rate"):
        A.attach_accountant(opt, opacus_accountant("rdp"), rate)
    assert opt.step_hooks == []


def test_attached_accountant_is_charged_once_per_step_at_the_steps_sigma():
    model = fxdp.privatize(nn.Linear(3, 1), max_grad_norm=1.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 0.7, 1.0, 4.0)
    acc = opacus_accountant("rdp")
    A.attach_accountant(opt, acc, 0.25)
    for sigma in (0.7, 1.3):
        opt.noise_multiplier = sigma
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert acc.history == [(0.7, 0.25, 1), (1.3, 0.25, 1)]
