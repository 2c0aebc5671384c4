"""Compiled privatized models against the one-sample-at-a-time reference (float64, R at the median norm)."""
from __future__ import annotations

import copy
import math

import torch

import fxdp
from tests import reference as ref


def check_compiled_against_reference(model, args, kwargs, target, loss_fn, style="all-layer", compiler="aot_eager",
                                     fullgraph=False, rtol=1e-8, **privatize_kwargs):
    """``loss_fn(output, target)`` is the SUM over samples of each sample's loss. Privatizes a copy of ``model``
    with R at the median per-sample norm, runs ``torch.compile(model, backend="fxdp")`` forward and backward
    once, and asserts ``private_grad == sum_b C_b grad_b`` for every trainable parameter, that ``p.grad`` is
    never written, and that some samples are clipped and some not. Returns the privatized model."""
    samples = ref.split_batch(args, kwargs, target, privatize_kwargs.get("batch_dim", 0))
    per_sample = ref.per_sample_gradients(copy.deepcopy(model), samples, loss_fn)
    m = fxdp.privatize(copy.deepcopy(model), style=style, loss_reduction="sum", **privatize_kwargs)
    groups = [list(g) for g in fxdp.get_engine(m).plan.groups]
    R = ref.median_threshold(per_sample, groups)
    fxdp.unprivatize(m)
    fxdp.privatize(m, style=style, max_grad_norm=R, loss_reduction="sum", **privatize_kwargs)
    compiled = torch.compile(m, backend="fxdp", options={"compiler": compiler}, fullgraph=fullgraph)
    loss_fn(compiled(*args, **kwargs), target).backward()
    expected, norms = ref.reference_private_grads(per_sample, groups, R)
    thr = R / math.sqrt(len(groups))
    clipped = sum(1 for gn in norms for n in gn if n > thr * (1 + 1e-9))
    assert 0 < clipped < sum(len(gn) for gn in norms), "R should clip some samples and not others"
    scale = max(float(e.abs().max()) for e in expected.values())
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is None, f"{name}: p.grad written under compile"
        err = float((p.private_grad.double() - expected[name].double()).abs().max())
        assert err <= rtol * scale, f"{name} ({style}): {err:.3e} vs scale {scale:.3e}"
    return m
