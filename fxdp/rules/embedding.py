"""Embeddings: nn.Embedding and F.embedding.

Per-sample gradient of sample b: ``sum_t onehot(x_b[t]) g_b[t]^T`` (V x d), kept
as an :class:`EmbeddingGrad`: squared norm ``sum_{t,s} 1[x_t = x_s] <g_t, g_s>``,
clipped sum by index_add -- never one_hot (O(B*T*V) memory). Rows whose index
is ``padding_idx`` get no gradient, as in F.embedding.

An index tensor without a batch dimension but with a leading dimension of 1
(position ids of shape (1, T)) is *lifted*: expanded to (B, T) before the
lookup, so that the broadcast over the batch happens after the rule, not inside
the gradient (the analysis checks that the model's output is unchanged).
"""
from __future__ import annotations

import torch.nn.functional as F

from fxdp.core.errors import SampleMixingError, UncoveredParameterError
from fxdp.rules.base import Binding, OpCall, NoFactorsRule, Rule
from fxdp.rules.factors import EmbeddingGrad


class EmbeddingRule(Rule):
    name = "embedding"
    funcs = (F.embedding,)

    def bind(self, call: OpCall):
        idx, w = call.arg(0, "input"), call.arg(1, "weight")
        name = call.param_name(w)
        if not name:
            return None
        padding_idx = call.arg(2, "padding_idx")
        max_norm = call.arg(3, "max_norm")
        scale_grad_by_freq = call.arg(5, "scale_grad_by_freq", False)
        if max_norm is not None:
            raise UncoveredParameterError(
                f"fxdp: embedding {name!r} uses max_norm, which rewrites the weight in place during the "
                "forward pass; per-sample gradients are not defined for it. Remove max_norm.")
        if scale_grad_by_freq:
            raise SampleMixingError(
                f"fxdp: embedding {name!r} uses scale_grad_by_freq, which scales each gradient by token "
                "counts over the whole batch (samples are mixed). Set scale_grad_by_freq=False.")
        if padding_idx is not None and padding_idx < 0:
            padding_idx = w.shape[0] + padding_idx
        return Binding(self, {"weight": name}, {"weight": w}, saved={"index": idx}, layout_source=idx,
                       options={"padding_idx": padding_idx, "num_embeddings": w.shape[0], "dim": w.shape[1]},
                       liftable=True)

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        B = batch_size
        idx = layout.to_batch_first(saved["index"], B).reshape(B, -1)
        d = binding.options["dim"]
        g = layout.to_batch_first(grad_output, B).reshape(B, -1, d)
        pad = binding.options["padding_idx"]
        if pad is not None:
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        return {"weight": EmbeddingGrad(idx, g, binding.params["weight"].shape)}

    def shape_summary(self, binding):
        return {"V": binding.options["num_embeddings"], "n": binding.options["dim"]}


class EmbeddingBagRule(NoFactorsRule):
    """``F.embedding_bag``: a 2-D (B, L) input goes to the per-sample fallback (each bag is one sample's
    row); flat ids with ``offsets`` are refused -- the bags are ragged slices of one flat tensor, so
    no dimension of any input carries the samples and the analysis cannot place them."""

    name = "embedding_bag"
    funcs = (F.embedding_bag,)

    def bind(self, call: OpCall):
        idx, w = call.arg(0, "input"), call.arg(1, "weight")
        name = call.param_name(w)
        if not name or idx is None or idx.dim() != 1:
            return None
        raise UncoveredParameterError(
            f"fxdp: F.embedding_bag uses {name!r} with flat ids and offsets: the samples (bags) are ragged slices "
            "of one 1-D tensor, so fxdp cannot tell which rows belong to which sample. Pass the ids as a 2-D "
            "(batch, max_bag_length) tensor without offsets, padded with padding_idx (nn.EmbeddingBag(..., "
            "padding_idx=...) ignores those entries), or freeze the parameter.")

