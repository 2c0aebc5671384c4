"""Helpers for neighbour-sensitivity tests: batches D and D minus one example.

``private_sum`` runs one (or several accumulated) privatized backward passes and
returns the clipped sums ``p.private_grad``; ``drop`` removes one example from a
batch; ``delta_norms`` measures how far the clipped sums of two neighbouring
batches are apart, in the whole model and in every clip group.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch
from torch.utils._pytree import tree_map
import torch.nn as nn
import torch.nn.functional as F

import fxdp


class FunctionalReuse(nn.Module):
    """fc1.weight used by its module call and by ``F.linear(x, self.fc1.weight)``.

    Both uses see the same input and nearly parallel output gradients, so the
    cross term between them is as large as the uses' own norms: a library that
    adds the uses' norms in quadrature (no cross term) lets one example move
    the update by about 1.4 R, and one that clips one use only by more
    (Opacus 1.6 ghost mode: 3.70 against R = 0.5 on such a model).
    """

    def __init__(self, d=5, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) + F.linear(x, self.fc1.weight)
        return self.head(h)


class InputGradient(nn.Module):
    """``out_b = <w, x_b>``: each example's gradient is its own input."""

    def __init__(self, d=3):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        return (x * self.w).sum(-1)


def batch_size(args) -> int:
    return next(t.shape[0] for t in args if isinstance(t, torch.Tensor))


def take(args: tuple, target, index: Sequence[int]):
    """The sub-batch ``index`` of ``args`` and ``target`` (batch dim 0; nested tuples too)."""
    B = batch_size(args)
    idx = torch.as_tensor(list(index), dtype=torch.long)

    def pick(t):
        return t.index_select(0, idx) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == B else t

    return tuple(tree_map(pick, a) for a in args), tree_map(pick, target)


def drop(args: tuple, target, i: int):
    """The batch without example ``i``."""
    B = batch_size(args)
    return take(args, target, [j for j in range(B) if j != i])


def private_sum(model: nn.Module, batches: List[tuple], loss_sum: Callable, reduction: str = "mean"
                ) -> Dict[str, torch.Tensor]:
    """Clear, then forward/backward every (args, target) of ``batches`` (gradient
    accumulation when there are several) and return a copy of every private_grad.

    ``loss_sum(output, target)`` is the SUM of the per-sample losses; with
    ``reduction="mean"`` it is divided by the micro-batch size, as a user would.
    """
    fxdp.clear_private_grads(model)
    for args, target in batches:
        loss = loss_sum(model(*args), target)
        if reduction == "mean":
            loss = loss / batch_size(args)
        loss.backward()
    out = {n: p.private_grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    fxdp.clear_private_grads(model)
    return out


def delta_norms(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], groups) -> tuple:
    """(whole-model L2 norm of a - b, [L2 norm of a - b in each group])."""
    per_group = [math.sqrt(sum(float((a[n] - b[n]).square().sum()) for n in g)) for g in groups]
    return math.sqrt(sum(x * x for x in per_group)), per_group


def per_example_sq_norms(model: nn.Module, args: tuple, target, loss_sum: Callable) -> List[Dict[str, float]]:
    """Squared norm of each example's gradient, per parameter, from plain autograd
    one example at a time in float64 (``model`` must not be privatized)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for i in range(batch_size(args)):
        a, t = take(args, target, [i])
        grads = torch.autograd.grad(loss_sum(model(*a), t), [p for _, p in named], allow_unused=True)
        out.append({n: (0.0 if g is None else float(g.double().square().sum())) for (n, _), g in zip(named, grads)})
    return out


def clipped_norm(sq: Dict[str, float], groups, R: float, fn: str, gamma: float) -> float:
    """Whole-model norm of one example's clipped gradient (reference clip factors)."""
    from tests.reference import clip_factor

    thr = R / math.sqrt(len(groups))
    total = 0.0
    for grp in groups:
        norm = math.sqrt(sum(sq[n] for n in grp))
        total += (clip_factor(norm, thr, fn, gamma) * norm) ** 2
    return math.sqrt(total)
