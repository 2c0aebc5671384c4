"""A criterion whose batch reduction fxdp applies itself, from per-sample losses.

DP-SGD needs a loss that is a sum (or a mean with a constant normaliser) of per-sample terms.
Several torch losses, in their default ``reduction="mean"``, divide by a quantity that depends on
the *other* samples of the batch, so removing one example rescales every other example's
contribution and the update moves by far more than R (measured: 9.2 R with
``CrossEntropyLoss(weight=w)``, whose mean divides by Σ_b w[y_b]; 9.8 R with a token mean over
``ignore_index`` padding, which divides by the batch's count of real tokens).

:func:`per_sample_criterion` turns such a criterion into a safe one: it evaluates the criterion
with ``reduction="none"``, forms each sample's own loss, then takes the plain mean (or sum) over
the batch's samples:

- class losses (``CrossEntropyLoss``, ``NLLLoss``) with class-index targets: a sample with one
  target has the loss ``w[y]·l`` (its class weight, no batch normaliser); a sample with several
  targets (``(B, C, T)`` inputs, ``(B, T)`` targets) averages its own counted targets -- weighted by
  ``w`` when given (Σ_t w·l / Σ_t w over the sample's tokens) -- ignoring ``ignore_index``; a
  sample without counted targets contributes 0;
- elementwise losses (MSE, L1, smooth L1 / Huber, BCE, BCE-with-logits, KL divergence, soft-target
  cross entropy) and losses whose ``"none"`` output is already per sample (margin / triplet /
  cosine-embedding / CTC / Poisson and Gaussian NLL): the mean over each sample's own elements;
- a plain function: it must return per-sample losses (shape ``(B,)`` or ``(B, ...)``, reduced per
  sample as above); a scalar is refused, since fxdp cannot tell whether its normaliser depends on
  the batch.

The batch reduction is ``"mean"`` (the realised batch's mean, which the engine undoes with the
actual B) or ``"sum"``, matching ``loss_reduction`` of the privatized model. Losses that compare
samples with each other (in-batch contrastive losses, InfoNCE over ``a @ b.T``) are not per-sample
losses under any reduction: fxdp cannot see them, and they must not be used.
"""
from __future__ import annotations

import copy
from typing import Callable, Union

import torch
import torch.nn as nn

from fxdp.core.errors import PrivacyError
from fxdp.training.losses import REDUCTIONS, reduce_token_losses

CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                      nn.KLDivLoss, nn.PoissonNLLLoss, nn.GaussianNLLLoss, nn.SoftMarginLoss,
                      nn.MultiLabelSoftMarginLoss, nn.MultiLabelMarginLoss, nn.MultiMarginLoss,
                      nn.MarginRankingLoss, nn.HingeEmbeddingLoss, nn.CosineEmbeddingLoss,
                      nn.TripletMarginLoss, nn.TripletMarginWithDistanceLoss, nn.CTCLoss)

SAFE_FORM = ("the safe form: criterion = fxdp.per_sample_criterion(nn.CrossEntropyLoss(weight=w)) (or "
             "make_private(..., criterion=..., grad_sample_mode='ghost'), which returns it), or per-sample "
             "losses reduced by hand: F.cross_entropy(out, y, weight=w, reduction='none') then .mean() over "
             "samples; for sequences fxdp.per_sample_loss(logits, target, ignore_index=...)")


def batch_dependent_normaliser(criterion) -> str:
    """Why ``criterion`` used as is divides by a batch-dependent quantity ("" if it does not visibly)."""
    if isinstance(criterion, CLASS_LOSSES) and getattr(criterion, "reduction", None) == "mean" \
            and getattr(criterion, "weight", None) is not None:
        return (f"{type(criterion).__name__}(weight=...) with reduction='mean' divides by the sum of the class "
                "weights of the batch's targets, which depends on the other examples")
    if isinstance(criterion, CLASS_LOSSES) and getattr(criterion, "reduction", None) == "mean" \
            and getattr(criterion, "ignore_index", -100) != -100:
        return (f"{type(criterion).__name__}(ignore_index={criterion.ignore_index}) with reduction='mean' divides by "
                "the number of targets of the batch that are not ignored (padding), which depends on the other "
                "examples")
    return ""


class PerSampleCriterion(nn.Module):
    """``criterion`` with fxdp's batch reduction over per-sample losses (module docstring)."""

    def __init__(self, criterion: Union[nn.Module, Callable], reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"fxdp: the batch reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.reduction = reduction
        if isinstance(criterion, PerSampleCriterion):
            criterion = criterion.criterion
        if isinstance(criterion, nn.modules.loss._Loss):
            if not isinstance(criterion, CLASS_LOSSES + ELEMENTWISE_LOSSES):
                raise ValueError(
                    f"fxdp: per_sample_criterion does not know {type(criterion).__name__}; pass a function that "
                    "returns per-sample losses (reduction='none'), or use fxdp.per_sample_loss for token losses.")
            criterion = copy.copy(criterion)
            criterion.reduction = "none"
        elif not callable(criterion):
            raise ValueError(f"fxdp: criterion must be a torch loss or a callable, got {type(criterion).__name__}.")
        self.criterion = criterion

    def per_sample(self, input: torch.Tensor, target) -> torch.Tensor:
        """Each sample's own loss, shape (B,)."""
        c = self.criterion
        out = c(input, target)
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            raise PrivacyError(
                "fxdp: the criterion returned a scalar, so its batch reduction is its own and fxdp cannot tell "
                "whether it divides by something that depends on the other examples (a weighted mean, a token "
                "count over the batch). Return per-sample losses (reduction='none'); " + SAFE_FORM + ".")
        if isinstance(c, CLASS_LOSSES) and isinstance(target, torch.Tensor) and not target.is_floating_point():
            mask = target != c.ignore_index
            if target.dim() == 1:
                return out * mask.to(out.dtype)  # (B,): w[y]·l, zero where ignored
            if c.weight is None:
                return reduce_token_losses(out, mask, "none")
            C = c.weight.shape[0]
            w = c.weight[target.clamp(min=0, max=C - 1)].to(out.dtype) * mask.to(out.dtype)
            B = target.shape[0]
            return out.reshape(B, -1).sum(1) / w.reshape(B, -1).sum(1).clamp(min=torch.finfo(out.dtype).tiny)
        return reduce_token_losses(out, None, "none") if out.dim() > 1 else out

    def forward(self, input, target):
        per = self.per_sample(input, target)
        return per.sum() if self.reduction == "sum" else per.mean()

    def __repr__(self):
        return f"PerSampleCriterion({self.criterion!r}, reduction={self.reduction!r})"


def per_sample_criterion(criterion, reduction: str = "mean") -> PerSampleCriterion:
    """``criterion`` as a per-sample loss with fxdp's batch reduction (see the module docstring).

    Args:
        criterion: a torch loss module (its own ``reduction`` is replaced by fxdp's) or a function
            returning per-sample losses.
        reduction: "mean" or "sum" over samples; the ``loss_reduction`` of the privatized model.
    """
    if reduction not in REDUCTIONS or reduction == "none":
        raise ValueError(f"fxdp: reduction must be 'mean' or 'sum', got {reduction!r}.")
    return PerSampleCriterion(criterion, reduction)


__all__ = ["PerSampleCriterion", "per_sample_criterion", "batch_dependent_normaliser"]
