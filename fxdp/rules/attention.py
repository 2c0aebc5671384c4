"""Multi-head attention: ``F.multi_head_attention_forward`` (nn.MultiheadAttention,
nn.TransformerEncoder/DecoderLayer) as a composite op.

nn.MultiheadAttention hands its raw ``in_proj_weight`` / ``out_proj.weight``
parameters to one functional call. This rule does not bind that call: it
*decomposes* it into the simpler torch calls it is made of, which the
interceptor intercepts in turn, so every parameter use lands on an existing
rule (linear, broadcast) and the batch-layout analysis finds the seq-first
layouts -- including the flattened (T*B, E) rows of the output projection --
by itself.

The decomposition computes exactly what ``F.multi_head_attention_forward``
computes (same masks, ``need_weights`` / ``average_attn_weights``, dropout,
``is_causal``, unbatched inputs), with these re-spellings of parameter uses
that have no rule of their own:

- packed in-projection, self-attention: one ``F.linear(x, W_in, b_in)`` whose
  output is split into q, k, v -- the same single use as in torch;
- packed in-projection, cross-attention (query is not key, or key is not
  value): torch slices the *parameter* (``W_in.split``); here the full
  ``F.linear(x, W_in, b_in)`` is applied to each distinct input and the
  *output* is sliced. The rows of W_in that a slice drops get a zero output
  gradient, so the per-sample gradient (a sum over the uses, cross terms
  included) is exact; the price is up to 3x the projection FLOPs;
- separate q/k/v projection weights (``kdim``/``vdim`` != ``embed_dim``): three
  plain ``F.linear`` calls; the packed ``in_proj_bias`` (3E) is added to the
  output zero-padded to 3E and then sliced, an elementwise use of the whole bias;
- ``bias_k`` / ``bias_v`` (``add_bias_kv=True``): ``bias.expand(1, B, E)``,
  the parameter broadcast over the batch (broadcast rule), instead of ``repeat``.

Guarantee: the decomposition returns the same values as
``F.multi_head_attention_forward`` up to float round-off, and every trainable
parameter among its arguments is used only through covered calls.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.base import OpCall, Rule

_MHA_ARGS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
    "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
    "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
)
_MHA_DEFAULTS = dict(training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                     use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
                     static_k=None, static_v=None, average_attn_weights=True, is_causal=False)


def mha_arguments(call: OpCall) -> dict:
    """The arguments of a ``F.multi_head_attention_forward`` call by name, defaults filled in."""
    out = dict(_MHA_DEFAULTS)
    out.update(zip(_MHA_ARGS, call.args))
    out.update(call.kwargs)
    return out


def _in_projection(a: dict, query, key, value, E: int):
    """q, k, v projections, every parameter used through F.linear or an elementwise add."""
    W, b = a["in_proj_weight"], a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:
        if query is key and key is value:
            proj = F.linear(query, W, b)
            q, k, v = proj.chunk(3, dim=-1)
            return q, k, v
        q = F.linear(query, W, b)[..., :E]
        if key is value:
            k, v = F.linear(key, W, b)[..., E:].chunk(2, dim=-1)
            return q, k, v
        return q, F.linear(key, W, b)[..., E:2 * E], F.linear(value, W, b)[..., 2 * E:]
    outs = []
    for i, (x, w) in enumerate(((query, a["q_proj_weight"]), (key, a["k_proj_weight"]),
                                (value, a["v_proj_weight"]))):
        y = F.linear(x, w)
        if b is not None:
            y = (F.pad(y, (i * E, (2 - i) * E)) + b)[..., i * E:(i + 1) * E]
        outs.append(y)
    return tuple(outs)


def _attention_mask(attn_mask, tgt_len: int, src_len: int, bsz: int, num_heads: int):
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (tgt_len, src_len):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                               f"{(tgt_len, src_len)}.")
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if tuple(attn_mask.shape) != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(bsz * num_heads, tgt_len, src_len)}.")
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def mha_forward(a: dict):
    """``F.multi_head_attention_forward`` as simpler torch calls (see module docstring)."""
    query, key, value = a["query"], a["key"], a["value"]
    num_heads, attn_mask, kpm = a["num_heads"], a["attn_mask"], a["key_padding_mask"]
    is_causal, need_weights = a["is_causal"], a["need_weights"]
    is_batched = F._mha_shape_check(query, key, value, kpm, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if kpm is not None:
            kpm = kpm.unsqueeze(0)
    tgt_len, bsz, E = query.shape
    kpm = F._canonical_mask(mask=kpm, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
                            other_name="attn_mask", target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and kpm is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if kpm is not None:
            is_causal = False
    if E != a["embed_dim_to_check"]:
        raise AssertionError(f"was expecting embedding dimension of {a['embed_dim_to_check']}, but got {E}")
    head_dim = E // num_heads
    if head_dim * num_heads != E:
        raise AssertionError(f"embed_dim {E} not divisible by num_heads {num_heads}")
    q, k, v = _in_projection(a, query, key, value, E)
    attn_mask = _attention_mask(attn_mask, tgt_len, key.shape[0], bsz, num_heads)
    if a["bias_k"] is not None and a["bias_v"] is not None:
        if a["static_k"] is not None or a["static_v"] is not None:
            raise AssertionError("bias cannot be added to static key/value.")
        k = torch.cat([k, a["bias_k"].expand(1, bsz, E)])
        v = torch.cat([v, a["bias_v"].expand(1, bsz, E)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    elif a["bias_k"] is not None or a["bias_v"] is not None:
        raise AssertionError("bias_k and bias_v must be given together")
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = (k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if a["static_k"] is None
         else a["static_k"])
    v = (v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if a["static_v"] is None
         else a["static_v"])
    if a["add_zero_attn"]:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros.to(v.dtype)], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    src_len = k.size(1)
    if kpm is not None:
        if tuple(kpm.shape) != (bsz, src_len):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {kpm.shape}")
        kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    if need_weights:
        if is_causal and attn_mask is None:
            raise AssertionError("is_causal without attn_mask is not supported with need_weights=True "
                                 "(as in torch); pass the causal mask as attn_mask.")
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            w = torch.bmm(q_scaled, k.transpose(-2, -1))
        w = F.softmax(w, dim=-1)
        if dropout_p > 0.0:
            w = F.dropout(w, p=dropout_p)
        out = torch.bmm(w, v).transpose(0, 1).reshape(tgt_len * bsz, E)
        out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).view(tgt_len, bsz, -1)
        w = w.view(bsz, num_heads, tgt_len, src_len)
        if a["average_attn_weights"]:
            w = w.mean(dim=1)
        if not is_batched:
            out, w = out.squeeze(1), w.squeeze(0)
        return out, w
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, E)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).view(tgt_len, bsz, -1)
    if not is_batched:
        out = out.squeeze(1)
    return out, None


class MultiheadAttentionRule(Rule):
    """Decomposes ``F.multi_head_attention_forward`` (see module docstring); binds nothing itself."""

    name = "multi_head_attention"
    funcs = (F.multi_head_attention_forward,)

    def _unsupported(self, call: OpCall) -> Optional[str]:
        a = mha_arguments(call)
        for key in ("static_k", "static_v"):
            t = a[key]
            if isinstance(t, torch.Tensor) and call.param_name(t):
                return f"a trainable parameter passed as {key}"
        for key in ("query", "key", "value", "key_padding_mask", "attn_mask"):
            if call.param_name(a[key]):
                return f"a trainable parameter passed as {key}"
        if a["use_separate_proj_weight"] and any(a[k] is None for k in ("q_proj_weight", "k_proj_weight",
                                                                        "v_proj_weight")):
            return "use_separate_proj_weight=True without all of q/k/v_proj_weight"
        if not a["use_separate_proj_weight"] and a["in_proj_weight"] is None:
            return "in_proj_weight is None"
        return None

    def decompose(self, call: OpCall):
        if self._unsupported(call) is not None:
            return None
        a = mha_arguments(call)
        return lambda: mha_forward(a)

    def bind(self, call: OpCall):
        reason = self._unsupported(call) or "an argument combination the decomposition does not cover"
        raise UncoveredParameterError(
            f"fxdp: F.multi_head_attention_forward with {reason}: no per-sample rule covers this use of "
            f"{', '.join(sorted(set(call.trainable.values())))}. Use nn.MultiheadAttention in its standard "
            "form, or freeze these parameters.")

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        raise UncoveredParameterError("fxdp: multi-head attention is decomposed, never bound; this is a bug in fxdp.")
