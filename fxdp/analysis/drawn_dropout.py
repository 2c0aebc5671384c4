"""Attention dropout drawn inside a parameter use: ``F.scaled_dot_product_attention(..., dropout_p > 0)``
whose operands include a trainable (or virtual) tensor -- T5's relative position bias as ``attn_mask``.

Such a call has no rule of its own, and the per-sample fallback (``torch.func`` under ``vmap``) would
re-run the attention in backward and draw a *new* dropout mask (``vmap`` refuses random ops). Instead
the call is re-spelled as the math attention it computes -- ``softmax(q kᵀ·scale + mask)``, then
``F.dropout``, then ``@ v`` -- so the mask is drawn once, in the forward, by an op that uses no
parameter, and the parameter meets the batch through covered ops (an elementwise add: the broadcast
rule). The analysis runs see the same spelling (their ``F.dropout`` is the identity), so a call site has
the same ordinal in the analysis and in training.

Guarantee: same values as the fused call up to float round-off; on the CPU (the math backend) the
dropout mask is drawn from the same RNG stream in the same order, so it is bit-for-bit the mask the
fused call would draw. A fused GPU kernel draws its own (Philox) mask: the re-spelling draws another
one of the same distribution. A call without dropout, or without a trainable operand, is left as is.
Inside a graph the ``fxdp`` backend compiles, such a call is refused (a graph node is tapped as one call).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch._guards
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.base import root_names_of

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)


def sdpa_arguments(args, kwargs) -> dict:
    """The arguments of an ``F.scaled_dot_product_attention`` call by name, defaults filled in."""
    out = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_ARGS, args))
    out.update(kwargs)
    return out


def math_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """What ``F.scaled_dot_product_attention`` computes (torch's documented reference), dropout drawn by
    ``F.dropout`` on the attention weights. Rows masked out entirely give zeros, as torch's math backend."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    softmax = getattr(torch, "_safe_softmax", None)
    weights = softmax(scores, -1) if softmax is not None else torch.softmax(scores, -1)
    return F.dropout(weights, dropout_p, training=True) @ value


def dropout_decomposition(func, args, kwargs, param_ids) -> Optional[Callable[[], torch.Tensor]]:
    """``math_attention`` for an attention call with dropout and an operand among ``param_ids`` (trainable
    or virtual parameters), else None. Both ``is_causal`` and ``attn_mask`` (an error in torch) are left to
    torch, which raises."""
    if func is not F.scaled_dot_product_attention:
        return None
    a = sdpa_arguments(args, kwargs)
    if not a["dropout_p"] or (a["is_causal"] and a["attn_mask"] is not None):
        return None
    names = sorted({param_ids[id(t)] for t in tree_flatten((args, kwargs))[0]
                    if isinstance(t, torch.Tensor) and id(t) in param_ids})
    if not names:
        return None
    if torch._guards.TracingContext.try_get() is not None:
        raise _compiled_refusal(names, a["dropout_p"])
    return lambda: math_attention(**a)


def _compiled_refusal(names, p) -> UncoveredParameterError:
    """Inside a graph the backend compiles, a call cannot be re-spelled into several ops (the graph node is
    tapped as one call), and the fallback rule cannot re-draw the same dropout mask in backward."""
    roots = root_names_of(names)
    exc = UncoveredParameterError(
        f"fxdp backend: F.scaled_dot_product_attention with dropout_p={p} uses trainable parameter(s) "
        f"{', '.join(roots)} (e.g. a relative position bias as attn_mask): the dropout mask is drawn inside the "
        "fused call, so no per-sample rule can recompute that call's gradient in backward, and fxdp cannot "
        "re-spell it inside a compiled graph (eager fxdp.privatize does: exact). Train this model with eager "
        "fxdp.privatize, or spell the attention as plain ops (HuggingFace: attn_implementation=\"eager\"), or "
        "turn attention dropout off.")
    exc.param_names = roots
    return exc
