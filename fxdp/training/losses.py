"""Per-sample losses for sequence models.

DP-SGD clips each *sample's* gradient, so the loss must be a sum (or mean with
a constant normaliser) of per-sample terms, each depending on one sample only.

Why a token-level mean over the whole batch is wrong: with n_b counted tokens
in sample b and N = sum_b n_b,

    L = (1/N) * sum_b sum_t l_bt

gives sample b the term ``S_b / N``: its normaliser N depends on how many
tokens the *other* samples have. With ``loss_reduction="mean"`` fxdp undoes a
factor 1/B, so a sample's contribution becomes ``(B/N) * grad S_b``: adding or
removing another sample (or padding it differently) rescales every unclipped
sample's contribution, and the change of the update between neighbouring
datasets is no longer bounded by R -- the sensitivity the noise is calibrated
to. (F.cross_entropy with ``reduction="mean"`` and ``ignore_index`` over
flattened (B*T) tokens, and HuggingFace models' built-in ``labels=`` loss, both
compute exactly this.) When every sample has the same number of counted tokens,
N = B*n and the two forms agree.

The per-sample form (what :func:`per_sample_loss` computes):

    l_b = (1/n_b) * sum_t l_bt        (mean over the sample's own tokens)
    L   = sum_b l_b  or  (1/B) sum_b l_b

A sample with no counted token (all ``ignore_index``) has l_b = 0 and
contributes nothing. Use ``reduction="mean"`` with ``privatize(...,
loss_reduction="mean")`` (the default) and ``"sum"`` with ``"sum"``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def reduce_token_losses(token_losses: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        reduction: str = "mean") -> torch.Tensor:
    """Mean of each sample's own token losses, then ``reduction`` over the batch.

    Args:
        token_losses: (B, ...) one loss per token (pixel, frame...) per sample.
        mask: bool/0-1 tensor of the same shape, True where a token counts;
            None counts every token.
        reduction: "mean" (over samples), "sum", or "none" (the (B,) vector).

    Returns:
        A scalar (or (B,) for "none"). Samples without any counted token give 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"fxdp: per-sample loss reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if token_losses.dim() == 0:
        raise ValueError("fxdp: token losses need a batch dimension (got a scalar): reduce per token, "
                         "not over the batch (reduction='none').")
    B = token_losses.shape[0]
    flat = token_losses.reshape(B, -1)
    if mask is None:
        per_sample = flat.mean(1) if flat.shape[1] > 0 else flat.sum(1)
    else:
        if mask.shape != token_losses.shape:
            raise ValueError(f"fxdp: mask shape {tuple(mask.shape)} differs from the token losses' shape "
                             f"{tuple(token_losses.shape)}.")
        m = mask.reshape(B, -1).to(flat.dtype)
        count = m.sum(1)
        per_sample = (flat * m).sum(1) / count.clamp(min=1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                    reduction: str = "mean", shift: bool = False, label_smoothing: float = 0.0,
                    weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token cross-entropy -> mean over each sample's own tokens -> ``reduction`` over the batch.

    Args:
        logits: (B, T, C) (or (B, C) for one token per sample).
        target: (B, T) (or (B,)) class indices; ``ignore_index`` marks tokens
            that do not count (padding, prompt).
        ignore_index: target value excluded from the loss and from the count.
        reduction: "mean" over samples (matches ``loss_reduction="mean"``),
            "sum" (matches ``"sum"``), or "none" for the (B,) per-sample losses.
        shift: causal language modelling: position t predicts token t+1
            (``logits[:, :-1]`` against ``target[:, 1:]``), as HuggingFace's
            ``labels=`` loss does.
        label_smoothing, weight: as in ``F.cross_entropy``. With ``weight`` the
            sample's tokens are averaged with those class weights (sum of
            weighted losses / sum of weights of the sample's tokens).

    Returns:
        The scalar loss (or (B,) for "none"); see the module docstring for why
        a token mean over the whole batch would couple samples.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"fxdp: per-sample loss reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if logits.dim() < 2:
        raise ValueError(f"fxdp: per_sample_loss expects logits (B, [T,] C), got shape {tuple(logits.shape)}.")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"fxdp: logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match "
                         "(expected logits of shape target.shape + (num_classes,)).")
    if shift:
        if logits.dim() < 3:
            raise ValueError("fxdp: shift=True needs (B, T, C) logits.")
        logits, target = logits[:, :-1], target[:, 1:]
    C = logits.shape[-1]
    tok = F.cross_entropy(logits.reshape(-1, C), target.reshape(-1), weight=weight, ignore_index=ignore_index,
                          reduction="none", label_smoothing=label_smoothing).view(target.shape)
    mask = target != ignore_index
    if weight is None:
        return reduce_token_losses(tok, mask, reduction)
    w = weight[target.clamp(min=0, max=C - 1)] * mask.to(weight.dtype)
    B = target.shape[0]
    per_sample = tok.reshape(B, -1).sum(1) / w.reshape(B, -1).sum(1).clamp(min=torch.finfo(w.dtype).tiny)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


__all__ = ["per_sample_loss", "reduce_token_losses"]
