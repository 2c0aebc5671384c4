"""Helpers for the training-loop tests (issue #13, §1 step/loader invariant, §2, §3): one logical step of a
loop through the public API, and how far it moves when one example is removed.

Every loop runs through ``fxdp.PrivacyEngine.make_private`` with a Poisson loader at q = 1, so that every
step draws every example and D / D minus one example are deterministic neighbours, noise off. A loop either
keeps each step's clipped sum within R of its neighbour's (and reaches the reference clipped norm, so it
cannot pass because nothing moved), or is refused at step time with a PrivacyError that names the cause.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from tests import models_zoo as Z
from tests.privacy.neighbours import per_example_sq_norms

STYLES = ["all-layer", "block-wise"]
FNS = ["abadi", "automatic"]
GAMMA = {"abadi": 1e-6, "automatic": 1e-2}
N = 6


def loop_data(n=N, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def mlp_template():
    torch.manual_seed(0)
    return Z.MLP().double()


def median_R(template, x, y):
    norms = sorted(sum(s.values()) ** 0.5 for s in per_example_sq_norms(template, (x,), y, Z.ce_sum))
    return 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])


def make_private_loop(template, x, y, R, style, fn, lr=1.0, **kwargs):
    model = copy.deepcopy(template)
    engine = fxdp.PrivacyEngine(accountant="rdp")
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                               data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
                               noise_multiplier=0.0, max_grad_norm=R, style=style, clipping_fn=fn, **kwargs)


def one_step(template, x, y, R, style, fn, body, **kwargs):
    """One logical step of ``body(model, opt, xb, yb)`` on D = (x, y); returns the update in
    clipped-sum units (before - after) * expected batch size / lr, and the model."""
    model, opt, loader = make_private_loop(template, x, y, R, style, fn, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for xb, yb in loader:
        body(model, opt, xb, yb)
        break
    assert opt.steps_taken == 1
    return {n: (before[n] - p.detach()) * opt.expected_batch_size for n, p in model.named_parameters()}, model


def max_move(template, x, y, R, style, fn, body):
    full, model = one_step(template, x, y, R, style, fn, body)
    moves = []
    for i in range(len(x)):
        keep = [j for j in range(len(x)) if j != i]
        other, _ = one_step(template, x[keep], y[keep], R, style, fn, body)
        move = math.sqrt(sum(float((full[n] - other[n]).square().sum()) for n in full))
        assert move <= R * (1 + 1e-9), f"removing example {i} moved the step by {move:.6g} > R = {R:.6g}"
        moves.append(move)
    return max(moves), full, model


def ce(model, x, y):
    return F.cross_entropy(model(x), y)

