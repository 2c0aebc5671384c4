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


CHECKPOINT_FLAVOURS = {"non-reentrant": False, "reentrant": True}  # torch.utils.checkpoint's use_reentrant


def uncheckpointed(model):
    """A copy of a test model with a ``checkpointing`` switch, switched off: the reference for the same model
    run with activation checkpointing (plain autograd, no region, no recomputation)."""
    plain = copy.deepcopy(model)
    plain.checkpointing = False
    return plain


def clipped_reference(model, args, kwargs, target, sample_loss, style="all-layer", clipping_fn="abadi", R=None,
                      block_heads=None, batch_dim=0, reference_model=None):
    """What every ``p.private_grad`` must be after one backward of ``model`` privatized with ``style``,
    ``clipping_fn`` and R (default: the median per-sample norm, so some samples are clipped and some
    not), for a loss that sums (or averages) ``sample_loss`` over the samples. The per-sample
    gradients come from ``reference_model`` (default: a copy of ``model``), which must compute the same
    function with the same parameter names (e.g. :func:`uncheckpointed`); the groups from privatizing
    a copy of ``model``. Returns ``(expected, R, per-sample group norms, groups)``."""
    import fxdp

    samples = split_batch(args, kwargs, target, batch_dim)
    per_sample = per_sample_gradients(copy.deepcopy(model) if reference_model is None else reference_model,
                                      samples, sample_loss)
    probe = fxdp.privatize(copy.deepcopy(model), style=style, clipping_fn=clipping_fn, block_heads=block_heads,
                           batch_dim=batch_dim)
    groups = [list(g) for g in fxdp.get_engine(probe).plan.groups]
    if R is None:
        R = median_threshold(per_sample, groups)
    expected, norms = reference_private_grads(per_sample, groups, R, clipping_fn)
    return expected, R, norms, groups


def check_against_reference(model, args, kwargs, target, sample_loss, style="all-layer", clipping_fn="abadi",
                            loss_reduction="mean", block_heads=None, rtol=1e-9, R=None, batch_dim=0,
                            reference_model=None):
    """Privatize a copy of ``model``, run one backward, compare every private_grad
    with the brute-force reference (:func:`clipped_reference`). ``sample_loss(output, target)`` must be the
    SUM over the samples it is given of each sample's own loss. R defaults to
    the median per-sample norm (so some samples are clipped and some not).
    Returns (max relative error, R, fraction of clipped samples)."""
    import fxdp

    expected, R, norms, groups = clipped_reference(model, args, kwargs, target, sample_loss, style, clipping_fn, R,
                                                   block_heads, batch_dim, reference_model)
    m = copy.deepcopy(model)
    fxdp.privatize(m, style=style, max_grad_norm=R, clipping_fn=clipping_fn, loss_reduction=loss_reduction,
                   block_heads=block_heads, batch_dim=batch_dim)
    loss = sample_loss(m(*args, **kwargs), target)
    if loss_reduction == "mean":
        loss = loss / len(norms)
    loss.backward()
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


def rule_case(func, args: tuple, params: dict, batch_dim: int = 0, kwargs=None, seed: int = 0):
    """One op call, checked at the level of its rule (no engine, no model).

    ``params``: name -> the trainable tensors among ``args`` / ``kwargs``. The output gradient is
    random; the reference per-sample gradient of sample b is autograd's gradient with the output
    gradient of every other sample zeroed (exact for ops that do not mix samples). Returns
    ``(factors_by_name, reference_by_name)``: the rule's factor per parameter name, and the
    (B, *param.shape) float64 per-sample gradients.
    """
    from fxdp.core.layout import BatchLayout, LayoutKind
    from fxdp.rules import OpCall, bind

    kwargs = dict(kwargs or {})
    trainable = {id(p): n for n, p in params.items()}
    call = OpCall(func, tuple(args), kwargs, trainable)
    binding = bind(call)
    assert binding is not None, f"no rule binds {func}"
    out = func(*args, **kwargs)
    B = out.shape[batch_dim]
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    reference = {n: torch.zeros((B,) + tuple(p.shape), dtype=torch.float64) for n, p in params.items()}
    names = list(params)
    for b in range(B):
        mask = torch.zeros_like(g)
        mask.select(batch_dim, b).fill_(1)
        grads = torch.autograd.grad(out, [params[n] for n in names], g * mask, retain_graph=True, allow_unused=True)
        for n, gr in zip(names, grads):
            if gr is not None:
                reference[n][b] = gr.double()
    layout = BatchLayout(LayoutKind.BATCH, batch_dim)
    saved = {k: v.detach() for k, v in binding.saved.items()}
    factors = binding.rule.factors(binding, saved, g, {}, layout, B)
    return {binding.roles[r]: f for r, f in factors.items()}, reference


def assert_factor_matches(factor, per_sample: torch.Tensor, rtol: float = 1e-10, seed: int = 1):
    """The rule's factor gives the reference's per-sample squared norms and clipped sums."""
    from fxdp.rules import factors as F

    B = per_sample.shape[0]
    want_sq = per_sample.flatten(1).square().sum(1)
    got_sq = F.sq_norm(factor).double()
    assert torch.allclose(got_sq, want_sq, rtol=rtol, atol=1e-12 * float(want_sq.max())), (got_sq, want_sq)
    coef = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    want = torch.tensordot(coef, per_sample, dims=1)
    got = F.clipped_sum(factor, coef).double()
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=rtol, atol=1e-12 * float(want.abs().max())), float((got - want).abs().max())
    keep = torch.ones(B, dtype=torch.bool)
    keep[0] = False
    masked = F.clipped_sum(factor, coef, keep).double()
    assert torch.allclose(masked, want - coef[0] * per_sample[0], rtol=rtol, atol=1e-12 * float(want.abs().max()))


def assert_inner_matches(factor_a, factor_b, per_sample_a: torch.Tensor, per_sample_b: torch.Tensor,
                         rtol: float = 1e-10):
    """The cross term of two uses of one parameter is the per-sample inner product of their gradients."""
    from fxdp.rules import factors as F

    want = (per_sample_a.flatten(1) * per_sample_b.flatten(1)).sum(1)
    got = F.inner(factor_a, factor_b).double()
    assert torch.allclose(got, want, rtol=rtol, atol=1e-12 * float(want.abs().max()) + 1e-300), (got, want)
