"""The guarantee under the training loops people write (issue #13, §1 step/loader invariant, §2, §3).

Every loop runs through the public API (``fxdp.PrivacyEngine.make_private`` with a Poisson loader at
q = 1, so that every step draws every example and D / D minus one example are deterministic
neighbours), noise off. A loop either keeps each step's clipped sum within R of its neighbour's
(and reaches the reference clipped norm, so it cannot pass because nothing moved), or is refused at
step time with a PrivacyError that names the cause.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler, TensorDataset

import fxdp
from fxdp import PrivacyError
from tests import models_zoo as Z
from tests.privacy.neighbours import clipped_norm, per_example_sq_norms
from tests.reference import per_sample_gradients, reference_private_grads, split_batch

STYLES = ["all-layer", "block-wise"]
FNS = ["abadi", "automatic"]
GAMMA = {"abadi": 1e-6, "automatic": 1e-2}
N = 6


def _data(n=N, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _template():
    torch.manual_seed(0)
    return Z.MLP().double()


def _median_R(template, x, y):
    norms = sorted(sum(s.values()) ** 0.5 for s in per_example_sq_norms(template, (x,), y, Z.ce_sum))
    return 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])


def _private(template, x, y, R, style, fn, lr=1.0, **kwargs):
    model = copy.deepcopy(template)
    engine = fxdp.PrivacyEngine(accountant="rdp")
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                               data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
                               noise_multiplier=0.0, max_grad_norm=R, style=style, clipping_fn=fn, **kwargs)


def _one_step(template, x, y, R, style, fn, body, **kwargs):
    """One logical step of ``body(model, opt, xb, yb)`` on D = (x, y); returns the update in
    clipped-sum units (before - after) * expected batch size / lr, and the model."""
    model, opt, loader = _private(template, x, y, R, style, fn, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for xb, yb in loader:
        body(model, opt, xb, yb)
        break
    assert opt.steps_taken == 1
    return {n: (before[n] - p.detach()) * opt.expected_batch_size for n, p in model.named_parameters()}, model


def _max_move(template, x, y, R, style, fn, body):
    full, model = _one_step(template, x, y, R, style, fn, body)
    moves = []
    for i in range(len(x)):
        keep = [j for j in range(len(x)) if j != i]
        other, _ = _one_step(template, x[keep], y[keep], R, style, fn, body)
        move = math.sqrt(sum(float((full[n] - other[n]).square().sum()) for n in full))
        assert move <= R * (1 + 1e-9), f"removing example {i} moved the step by {move:.6g} > R = {R:.6g}"
        moves.append(move)
    return max(moves), full, model


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


# ------------------------------------------------ §1: passes that accumulate into no parameter
def _adversarial(steps, eps=0.3):
    def body(model, opt, x, y):
        opt.zero_grad()
        x_adv = x.clone()
        for _ in range(steps):  # PGD (FGSM: one step): input gradients only, after zero_grad
            x_adv.requires_grad_(True)
            g, = torch.autograd.grad(_ce(model, x_adv, y), x_adv)
            x_adv = (x_adv + eps * g.sign()).detach()
        body.x_adv = x_adv
        _ce(model, x_adv, y).backward()
        opt.step()
    return body


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("attack", ["fgsm", "pgd5"])
def test_adversarial_training_input_gradient_passes_contribute_nothing(attack, style, fn):
    """PGD (5 × autograd.grad w.r.t. the input, then backward) measured 5.9 R, FGSM 1.9 R. Now the
    step equals the reference clipped sum on the adversarial batch alone, and neighbours stay within R."""
    template = _template()
    x, y = _data()
    R = _median_R(template, x, y)
    body = _adversarial(1 if attack == "fgsm" else 5)
    top, _, _ = _max_move(template, x, y, R, style, fn, body)
    full, model = _one_step(template, x, y, R, style, fn, body)
    groups = fxdp.get_engine(model).plan.groups
    per_sample = per_sample_gradients(copy.deepcopy(template), split_batch((body.x_adv,), {}, y),
                                      lambda out, t: F.cross_entropy(out, t))
    want, _ = reference_private_grads(per_sample, groups, R, fn=fn, gamma=GAMMA[fn])
    for n in want:
        torch.testing.assert_close(full[n], want[n], rtol=1e-9, atol=1e-12)
    assert top > 0.5 * R


def test_backward_with_inputs_restricted_to_the_data_contributes_nothing():
    template = _template()
    x, y = _data()
    model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=1.0)
    xr = x.clone().requires_grad_(True)
    _ce(model, xr, y).backward(inputs=[xr])
    assert all(getattr(p, "private_grad", None) is None for p in model.parameters())
    assert fxdp.get_engine(model).ledger.samples == 0


def test_input_gradient_pass_through_torch_compile_contributes_nothing():
    model = fxdp.privatize(_template(), max_grad_norm=1.0)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    x, y = _data()
    xr = x.clone().requires_grad_(True)
    torch.autograd.grad(_ce(compiled, xr, y), xr)
    assert all(getattr(p, "private_grad", None) is None for p in model.parameters())
    _ce(compiled, x, y).backward()
    assert fxdp.get_engine(model).ledger.batch_sizes == [N]
    assert all(p.private_grad is not None for p in model.parameters())


def test_double_backward_for_an_input_gradient_penalty_is_refused():
    model = fxdp.privatize(_template(), max_grad_norm=1.0)
    x, y = _data()
    x.requires_grad_(True)
    with pytest.raises(PrivacyError, match="create_graph=True"):
        torch.autograd.grad(_ce(model, x, y), x, create_graph=True)


# ------------------------------------------------ §1: clipped = drawn at every step
def _views(k):
    def body(model, opt, x, y):  # k augmented views, each with its own forward and backward, one step
        opt.zero_grad()
        for v in range(k):
            _ce(model, x + 0.1 * v, y).backward()
        opt.step()
    return body


def _validation_first(zero_grad_between):
    def body(model, opt, x, y):
        xv, yv = _data(3, seed=99)
        _ce(model, xv, yv).backward()  # a validation batch's backward, e.g. to inspect gradients
        if zero_grad_between:
            opt.zero_grad()
        _ce(model, x, y).backward()
        opt.step()
    return body


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("style", STYLES)
def test_several_views_each_with_its_own_backward_are_refused(style, fn):
    """Four views, four backward passes, one step: measured 4.0 R."""
    template = _template()
    x, y = _data()
    with pytest.raises(PrivacyError, match="4 backward passes"):
        _one_step(template, x, y, 1.0, style, fn, _views(4))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("style", STYLES)
def test_a_validation_backward_left_in_the_private_gradients_is_refused(style, fn):
    template = _template()
    x, y = _data()
    with pytest.raises(PrivacyError, match="validation"):
        _one_step(template, x, y, 1.0, style, fn, _validation_first(zero_grad_between=False))
    # cleared with zero_grad before the training backward: a normal step, within R
    R = _median_R(template, x, y)
    top, _, model = _max_move(template, x, y, R, style, fn, _validation_first(zero_grad_between=True))
    groups = fxdp.get_engine(model).plan.groups
    sq = per_example_sq_norms(template, (x,), y, Z.ce_sum)
    assert top == pytest.approx(max(clipped_norm(s, groups, R, fn, GAMMA[fn]) for s in sq), rel=1e-6)


class TokenMLP(nn.Module):
    """Per-token classifier over (B, T, d) inputs (or (B·T, d) when the loop flattens them)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


def _token_data(n=N, T=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, T), generator=g)


@pytest.mark.parametrize("fn", FNS)
def test_tokens_flattened_into_the_batch_dimension_are_refused(fn):
    """(B, T, d) flattened to (B·T, d) before the model: 4 "samples" clipped per example (measured 4.1 R)."""
    torch.manual_seed(0)
    template = TokenMLP().double()
    x, y = _token_data()

    def body(model, opt, xb, yb):
        opt.zero_grad()
        F.cross_entropy(model(xb.reshape(-1, 6)), yb.reshape(-1)).backward()
        opt.step()

    with pytest.raises(PrivacyError, match="4 rows per example"):
        _one_step(template, x, y, 1.0, "all-layer", fn, body)


def test_batch_first_false_on_batch_first_data_is_refused():
    """make_private(batch_first=False) reads dim 1 (T = 4) as the batch of 6 examples (measured 1.4 R)."""
    torch.manual_seed(0)
    template = TokenMLP().double()
    x, y = _token_data()

    def body(model, opt, xb, yb):
        opt.zero_grad()
        F.cross_entropy(model(xb).reshape(-1, 3), yb.reshape(-1)).backward()
        opt.step()

    with pytest.raises(PrivacyError, match="batch_first"):
        _one_step(template, x, y, 1.0, "all-layer", "abadi", body, batch_first=False)
    _one_step(template, x, y, 1.0, "all-layer", "abadi", body)  # the right setting steps


def test_a_step_on_batches_of_the_original_loader_is_refused():
    """Iterating the loader passed to make_private (not the returned one) was charged as Poisson."""
    template = _template()
    x, y = _data()
    model = copy.deepcopy(template)
    original = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)
    model, opt, _ = fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(),
                                                      lr=0.1), data_loader=original, noise_multiplier=1.0,
                                                      max_grad_norm=1.0)
    xb, yb = next(iter(original))
    opt.zero_grad()
    _ce(model, xb, yb).backward()
    with pytest.raises(PrivacyError, match="without a batch drawn"):
        opt.step()


def test_batch_memory_manager_checks_each_logical_batch():
    """Micro-batches of 2, each with two backward passes: refused when the logical batch steps."""
    template = _template()
    x, y = _data()
    model, opt, loader = _private(template, x, y, 1.0, "all-layer", "abadi")
    with pytest.raises(PrivacyError, match="2 backward passes"):
        with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as micro:
            for xb, yb in micro:
                opt.zero_grad()
                _ce(model, xb, yb).backward()
                _ce(model, xb, yb).backward()
                opt.step()
    assert opt.steps_taken == 0


def test_batch_memory_manager_over_a_users_dpoptimizer_checks_its_micro_batches():
    """BatchMemoryManager owns its loader even for a DPOptimizer built by hand."""
    from opacus.data_loader import DPDataLoader

    x, y = _data()
    model = fxdp.privatize(_template(), max_grad_norm=1.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 0.0, 1.0, expected_batch_size=N)
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=1.0)
    with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=opt) as micro:
        for xb, yb in micro:
            opt.zero_grad()
            _ce(model, xb, yb).backward()
            opt.step()
    assert opt.steps_taken == 1 and opt.batch_check is None
    with pytest.raises(PrivacyError, match="rows per example"):
        with fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=6, optimizer=opt) as micro:
            for xb, yb in micro:
                opt.zero_grad()
                _ce(model, torch.cat([xb, xb]), torch.cat([yb, yb])).backward()
                opt.step()


# ------------------------------------------------ §2: parameters outside the optimizer
def test_a_trainable_parameter_outside_the_optimizer_is_refused():
    template = _template()
    x, y = _data()
    model = copy.deepcopy(template)
    with pytest.raises(PrivacyError, match="fc2.weight, fc2.bias"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.fc1.parameters(), lr=0.1),
                                          data_loader=DataLoader(TensorDataset(x, y), batch_size=2),
                                          noise_multiplier=1.0, max_grad_norm=1.0)
    model = fxdp.privatize(copy.deepcopy(template), max_grad_norm=1.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.fc1.parameters(), lr=0.1), 0.0, 1.0, expected_batch_size=N)
    _ce(model, x, y).backward()
    with pytest.raises(PrivacyError, match="not in the optimizer"):
        opt.step()


def test_zero_grad_and_step_clear_every_private_gradient_of_the_model():
    """Every parameter the engine clipped is stepped or cleared: nothing survives a step or zero_grad."""
    template = _template()
    x, y = _data()
    model, opt, loader = _private(template, x, y, 1.0, "all-layer", "abadi")
    engine = fxdp.get_engine(model)
    for xb, yb in loader:
        _ce(model, xb, yb).backward()
        assert engine.ledger.samples == N
        opt.zero_grad()
        assert engine.ledger.samples == 0 and all(not hasattr(p, "private_grad") for p in model.parameters())
        _ce(model, xb, yb).backward()
        opt.step()
    assert engine.ledger.samples == 0 and all(not hasattr(p, "private_grad") for p in model.parameters())


def test_a_parameter_unfrozen_after_make_private_is_refused():
    """The way to add_param_group a parameter later: it must not be trainable (and clipped) before."""
    template = _template()
    x, y = _data()
    model = copy.deepcopy(template)
    model.fc2.requires_grad_(False)
    model, opt, loader = fxdp.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.fc1.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=N), noise_multiplier=0.0, max_grad_norm=1.0)
    model.fc2.requires_grad_(True)
    opt.add_param_group({"params": list(model.fc2.parameters())})
    xb, yb = next(iter(loader))
    with pytest.raises(PrivacyError, match="became trainable"):
        _ce(model, xb, yb).backward()


# ------------------------------------------------ §3: accounting matches the sampling used
def _epoch_releases(x, y, R, shuffle_seed, style="all-layer"):
    """One epoch of fixed-size batches of 2 (shuffled with a fixed permutation seed, or sequential),
    noise off, lr = 0: every step's released clipped sum, concatenated."""
    model = copy.deepcopy(_template())
    gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    data = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=shuffle_seed is not None, generator=gen)
    with pytest.warns(UserWarning, match="replace-one"):
        model, opt, loader = fxdp.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=data,
            noise_multiplier=0.0, max_grad_norm=R, poisson_sampling=False, style=style)
    out = []
    for xb, yb in loader:
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.step()
        out.extend((p.grad.detach() * opt.expected_batch_size).reshape(-1) for p in model.parameters())
    return torch.cat(out)


@pytest.mark.parametrize("style", STYLES)
def test_shuffled_epoch_moves_at_most_2R_under_replace_one(style):
    """Replace-one (the stated adjacency): one step of the epoch changes, by at most 2R; the accountant
    charges sigma / 2 for it. Removing an example instead shifts every later batch (measured 3.65 R)."""
    x, y = _data(8)
    R = _median_R(_template(), x, y)
    full = _epoch_releases(x, y, R, shuffle_seed=5, style=style)
    g = torch.Generator().manual_seed(11)
    moves = []
    for j in range(8):
        x2, y2 = x.clone(), y.clone()
        x2[j] = 3 * torch.randn(6, generator=g, dtype=torch.float64)
        y2[j] = (y[j] + 1) % 3
        moves.append(float((full - _epoch_releases(x2, y2, R, shuffle_seed=5, style=style)).norm()))
    assert max(moves) <= 2 * R * (1 + 1e-9) and max(moves) > R
    seq = _epoch_releases(x, y, R, shuffle_seed=None, style=style)
    removed = _epoch_releases(x[1:], y[1:], R, shuffle_seed=None, style=style)
    assert float((seq[:removed.numel()] - removed).norm()) > 2 * R  # why add/remove is not what is charged

    engine = fxdp.PrivacyEngine(accountant="rdp")
    model = _template()
    with pytest.warns(UserWarning, match="replace-one"):
        model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                 data_loader=DataLoader(TensorDataset(x, y), batch_size=2),
                                                 noise_multiplier=1.5, max_grad_norm=R, poisson_sampling=False)
    for xb, yb in loader:
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.step()
    assert engine.accountant.history == [(0.75, 1.0, 1)]


def _indexed(n=20):
    x, y = _data(n)
    return TensorDataset(x, y, torch.arange(n))


def _drawn(loader, epochs=3):
    seen = set()
    for _ in range(epochs):
        for _, _, idx in loader:
            seen.update(int(i) for i in idx)
    return seen


def test_poisson_loader_samples_only_the_subset_random_sampler_indices_and_charges_that_set():
    data = _indexed()
    train = list(range(0, 20, 2))
    model = _template()
    engine = fxdp.PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=5, sampler=SubsetRandomSampler(train)),
        noise_multiplier=1.0, max_grad_norm=1.0)
    seen = _drawn(loader)
    assert seen and seen <= set(train)
    assert engine.sampling.sample_rate == pytest.approx(0.5) and opt.expected_batch_size == pytest.approx(5.0)


def test_poisson_loader_over_a_subset_samples_only_the_subset():
    data = _indexed()
    subset = Subset(data, list(range(5, 15)))
    model = _template()
    engine = fxdp.PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=DataLoader(subset, batch_size=5),
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    seen = _drawn(loader)
    assert seen and seen <= set(range(5, 15)) and opt.expected_batch_size == pytest.approx(5.0)


def test_a_sampler_whose_visited_examples_are_unknown_is_refused_for_poisson_sampling():
    data = _indexed()
    weighted = torch.utils.data.WeightedRandomSampler(torch.ones(20), 20)
    model = _template()
    with pytest.raises(PrivacyError, match="WeightedRandomSampler"):
        fxdp.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          data_loader=DataLoader(data, batch_size=5, sampler=weighted),
                                          noise_multiplier=1.0, max_grad_norm=1.0)


# ------------------------------------------------ fastDP attach with its loader
def test_fastdp_attach_with_a_loader_checks_every_step():
    from fxdp.compat.fastdp import PrivacyEngine as FastDPEngine

    x, y = _data(12)
    model = _template()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = FastDPEngine(model, batch_size=12, sample_size=12, epochs=1, noise_multiplier=0.0,
                      clipping_fn="abadi", max_grad_norm=1.0)
    loader = dp.attach(opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=12))
    xb, yb = next(iter(loader))
    _ce(model, xb, yb).backward()
    opt.step()
    opt.zero_grad()
    xb, yb = next(iter(loader))
    _ce(model, xb, yb).backward()
    _ce(model, xb, yb).backward()
    with pytest.raises(PrivacyError, match="2 backward passes"):
        opt.step()
    dp.detach()
    with pytest.raises(ValueError, match="sample_size"):
        FastDPEngine(model, batch_size=4, sample_size=10, epochs=1, noise_multiplier=1.0).attach(
            torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(TensorDataset(x, y), batch_size=4))


def test_a_subset_listing_an_example_twice_is_refused():
    from torch.utils.data import DataLoader, Subset, TensorDataset

    X, Y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    train = Subset(TensorDataset(X, Y), [0, 0] + list(range(1, 10)))
    model = torch.nn.Linear(4, 2)
    with pytest.raises(fxdp.PrivacyError, match="more than once"):
        fxdp.PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(train, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0)
