"""Per-sample losses of HuggingFace model outputs (what DPTrainer differentiates).

HF models given ``labels=`` compute ONE token-level mean over the whole batch,
whose normaliser (the batch's token count) depends on the other samples: not a
per-sample loss (see :mod:`fxdp.training.losses`). DPTrainer never passes the
labels to the model; it computes, per sample b,

    causal LM:       l_b = mean over b's own non-ignored tokens t of CE(logits[b, t-1], labels[b, t])
    token tagging:   the same without the shift
    classification:  l_b = CE(logits[b], labels[b])
    regression:      l_b = mean of (logits[b] - labels[b])²

and the micro-batch loss ``sum_b l_b / B`` (B its actual size; 0 for an empty one),
which fxdp's ``loss_reduction="mean"`` undoes with the same B before clipping.
"""
from __future__ import annotations

import torch

from fxdp.training.losses import per_sample_loss


def is_causal_lm(model) -> bool:
    """True for HF causal-LM classes (PEFT wrappers are looked through)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM")


def logits_of(outputs) -> torch.Tensor:
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if logits is None:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError("fxdp: the model output has no logits; pass PrivacyArguments(per_sample_loss_fn=...) that "
                         "returns one loss per sample.")
    return logits


def default_per_sample_losses(outputs, labels: dict, shift: bool) -> torch.Tensor:
    """(B,) per-sample losses for the label conventions in the module docstring."""
    if set(labels) != {"labels"}:
        raise ValueError(f"fxdp: the default per-sample loss needs exactly one label column 'labels', got "
                         f"{sorted(labels)}; pass PrivacyArguments(per_sample_loss_fn=...).")
    y = labels["labels"]
    logits = logits_of(outputs)
    if y.dtype.is_floating_point:
        pred = logits.reshape(y.shape) if logits.numel() == y.numel() else logits
        if pred.shape != y.shape:
            raise ValueError(f"fxdp: regression logits {tuple(logits.shape)} do not match labels {tuple(y.shape)}.")
        err = (pred - y.to(pred.dtype)).float() ** 2 if pred.dtype != torch.float64 else (pred - y.double()) ** 2
        return err.reshape(err.shape[0], -1).mean(1)
    if logits.shape[:-1] != y.shape:
        raise ValueError(f"fxdp: logits {tuple(logits.shape)} and labels {tuple(y.shape)} do not match (expected "
                         "logits of shape labels.shape + (classes,)); pass PrivacyArguments(per_sample_loss_fn=...).")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # bf16/fp16 logits: the softmax in fp32
    return per_sample_loss(logits, y, shift=shift and y.dim() >= 2, reduction="none")


def batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_b l_b / B`` (0, still attached to the graph, for B = 0)."""
    if per_sample.dim() != 1:
        raise ValueError(f"fxdp: per_sample_loss_fn must return a (B,) tensor, got shape {tuple(per_sample.shape)}.")
    return per_sample.sum() / max(per_sample.shape[0], 1)


__all__ = ["batch_mean", "default_per_sample_losses", "is_causal_lm", "logits_of"]
