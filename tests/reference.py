"""Brute-force reference: one sample at a time, plain autograd, batch of 1.

``reference_private_grads`` returns what ``p.private_grad`` must be: the sum
over samples of each sample's own gradient times its clip factor, with the
groups of ``plan`` and the clipping function of ``config`` -- computed from
materialised per-sample gradients, independently of fxdp's rules.
"""
from __future__ import annotations

import copy
import math

import torch


def per_sample_gradients(model, samples, loss_fn):
    """samples: list of (args, kwargs, target). Returns list of {name: grad}."""
    out = []
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for args, kwargs, target in samples:
        for p in params.values():
            p.grad = None
        loss = loss_fn(model(*args, **kwargs), target)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append({n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)})
    return out


def clip_factor(norm, threshold, fn, gamma):
    if fn == "abadi":
        return min(1.0, threshold / (norm + gamma))
    if fn == "automatic":
        return threshold / (norm + gamma)
    return 1.0 if norm <= threshold else 0.0


def reference_private_grads(per_sample, groups, R, fn="abadi", gamma=None):
    """groups: list of lists of names. Returns ({name: clipped sum}, [per-sample group norms])."""
    if gamma is None:
        gamma = {"abadi": 1e-6, "automatic": 1e-2, "global": 0.0}[fn]
    G = len(groups)
    thr = R / math.sqrt(G)
    total = {n: torch.zeros_like(g) for n, g in per_sample[0].items()}
    norms = []
    for grads in per_sample:
        gn = []
        for group in groups:
            sq = sum(float(grads[n].double().square().sum()) for n in group)
            norm = math.sqrt(sq)
            gn.append(norm)
            c = clip_factor(norm, thr, fn, gamma)
            for n in group:
                total[n] += c * grads[n]
        norms.append(gn)
    return total, norms


def split_batch(args, kwargs, target, batch_dim=0):
    """Split batched tensors (dim batch_dim of size B) into a list of batch-of-1 samples."""
    from torch.utils._pytree import tree_flatten, tree_map
    leaves, _ = tree_flatten((args, kwargs))
    B = next(t.shape[batch_dim] for t in leaves if isinstance(t, torch.Tensor))

    def take(i):
        def f(x):
            if isinstance(x, torch.Tensor) and x.dim() > batch_dim and x.shape[batch_dim] == B:
                return x.narrow(batch_dim, i, 1)
            return x
        return f

    samples = []
    for i in range(B):
        a, k = tree_map(take(i), (args, kwargs))
        t = tree_map(take(i), target) if target is not None else None
        samples.append((a, k, t))
    return samples


def median_threshold(per_sample, groups):
    """R such that about half the samples are clipped in the all-layer sense."""
    norms = [math.sqrt(sum(float(g[n].double().square().sum()) for grp in groups for n in grp)) for g in per_sample]
    return float(torch.tensor(norms).median())


def fresh_copy(model):
    return copy.deepcopy(model)
