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
    norms = sorted(math.sqrt(sum(float(g[n].double().square().sum()) for grp in groups for n in grp))
                   for g in per_sample)
    k = len(norms) // 2
    # midway between two middle norms: no sample sits exactly on the threshold
    return 0.5 * (norms[k - 1] + norms[k]) if len(norms) > 1 else norms[0]


def fresh_copy(model):
    return copy.deepcopy(model)


def check_against_reference(model, args, kwargs, target, sample_loss, style="all-layer", clipping_fn="abadi",
                            loss_reduction="mean", block_heads=None, rtol=1e-9, R=None, batch_dim=0):
    """Privatize a copy of ``model``, run one backward, compare every private_grad
    with the brute-force reference. ``sample_loss(output, target)`` must be the
    SUM over the samples it is given of each sample's own loss. R defaults to
    the median per-sample norm (so some samples are clipped and some not).
    Returns (max relative error, R, fraction of clipped samples)."""
    import fxdp

    ref_model = copy.deepcopy(model)
    samples = split_batch(args, kwargs, target, batch_dim)
    per_sample = per_sample_gradients(ref_model, samples, sample_loss)
    m = copy.deepcopy(model)
    fxdp.privatize(m, style=style, clipping_fn=clipping_fn, loss_reduction=loss_reduction,
                   block_heads=block_heads, batch_dim=batch_dim)
    groups = [list(g) for g in fxdp.get_engine(m).plan.groups]
    if R is None:
        R = median_threshold(per_sample, groups)
    fxdp.unprivatize(m)
    fxdp.privatize(m, style=style, max_grad_norm=R, clipping_fn=clipping_fn, loss_reduction=loss_reduction,
                   block_heads=block_heads, batch_dim=batch_dim)
    B = len(samples)
    loss = sample_loss(m(*args, **kwargs), target)
    if loss_reduction == "mean":
        loss = loss / B
    loss.backward()
    expected, norms = reference_private_grads(per_sample, groups, R, clipping_fn)
    worst = 0.0
    floor = 1e-6 * max(float(e.abs().max()) for e in expected.values())  # gradients that are 0 up to round-off
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert not hasattr(p, "private_grad"), f"frozen {name} got a private grad"
            continue
        assert p.grad is None, f"{name}: p.grad was written by the private path"
        exp = expected[name]
        scale = max(float(exp.abs().max()), floor) + 1e-30
        err = float((p.private_grad - exp).abs().max()) / scale
        assert err < rtol, f"{name}: relative error {err:.3e} (style={style}, fn={clipping_fn})"
        worst = max(worst, err)
    thr = R / math.sqrt(len(groups))
    clipped = sum(1 for gn in norms for n in gn if n > thr) / max(1, sum(len(gn) for gn in norms))
    return worst, R, clipped
