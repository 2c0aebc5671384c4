"""Static check and fixer for modules that mix samples (like Opacus's ModuleValidator).

DP-SGD needs each sample's output to depend on that sample only; otherwise
per-sample clipping bounds nothing (removing one sample changes every other
sample's gradient). :func:`validate` lists the modules that do this by
construction -- BatchNorm (all variants, SyncBatchNorm included) normalises
with statistics of the whole batch in training mode -- and :func:`fix_batchnorm`
replaces them by GroupNorm, which normalises each sample on its own.

What a static look at the module tree cannot see (``x - x.mean(0)`` in a
forward, attention over the batch dimension) is found by the batch-layout
analysis at the first privatized forward pass, which raises
:class:`fxdp.SampleMixingError`; ``validate`` is a quick early check, not a
replacement for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from fxdp.core.errors import SampleMixingError

BATCHNORM_REASON = ("normalises with the mean and variance of the whole batch in training mode, so every "
                    "sample's output depends on the other samples")
BATCHNORM_FIX = "replace it with GroupNorm (fxdp.fix_batchnorm(model)) or LayerNorm"


@dataclass(frozen=True)
class ValidationIssue:
    """One module that mixes samples: where, what, why, and what to do."""

    module: str
    module_type: str
    reason: str
    fix: str

    def __str__(self) -> str:
        where = self.module or "<root>"
        return f"{where} ({self.module_type}): {self.reason}; {self.fix}."


def validate(model: nn.Module, strict: bool = False) -> List[ValidationIssue]:
    """List the modules of ``model`` that mix samples, with the reason and the fix.

    Args:
        model: any module (privatized or not; nothing is changed).
        strict: raise :class:`fxdp.SampleMixingError` listing every issue
            instead of returning a non-empty list.

    Returns:
        The issues, in ``named_modules()`` order; empty when none is found.
    """
    issues = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            issues.append(ValidationIssue(name, type(module).__name__, BATCHNORM_REASON, BATCHNORM_FIX))
    if strict and issues:
        raise SampleMixingError("fxdp: the model mixes samples, which per-sample clipping cannot bound:\n  " +
                                "\n  ".join(str(i) for i in issues))
    return issues


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """The largest number of groups <= ``max_groups`` that divides ``num_channels``."""
    for g in range(min(max_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def batchnorm_to_groupnorm(bn: _BatchNorm, max_groups: int = 32) -> nn.GroupNorm:
    """A GroupNorm for ``bn``'s channels; the affine weight and bias are copied (same shape, same
    requires_grad), the running statistics are dropped (GroupNorm has none).

    BatchNorm1d becomes ``GroupNorm(1, C)`` (each sample's features normalised together, like
    LayerNorm): its input is often (N, C), where one channel per group would normalise every value
    to a constant. BatchNorm2d/3d (and SyncBatchNorm) get ``group_count(C, max_groups)`` groups."""
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError("fxdp: a lazy BatchNorm with unknown num_features cannot be replaced; run one forward "
                         "pass (outside privatize) first, or use nn.BatchNorm*d with explicit sizes.")
    C = bn.num_features
    groups = 1 if isinstance(bn, nn.BatchNorm1d) else group_count(C, max_groups)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    gn = nn.GroupNorm(groups, C, eps=bn.eps, affine=bn.affine, **kw)
    if bn.affine:
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def fix_batchnorm(model: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d / SyncBatchNorm in ``model`` by a GroupNorm, in place.

    Each BatchNorm2d/3d over C channels becomes ``GroupNorm(G, C)`` with G
    the largest divisor of C not above ``max_groups`` (32, as Opacus's
    ``ModuleValidator.fix``, but always a valid group count); BatchNorm1d
    becomes ``GroupNorm(1, C)`` (see :func:`batchnorm_to_groupnorm`). Same eps
    and affine flag, the affine parameters copied. Call it *before*
    ``fxdp.privatize`` (and before building the optimizer: the parameters are
    new objects). Returns the model -- a new GroupNorm if ``model`` itself is a
    BatchNorm.

    Raises:
        ValueError: the model is already privatized (its clip groups name the
            old parameters), or a lazy BatchNorm is not initialised yet.
    """
    from fxdp.engine.install import is_privatized

    if is_privatized(model):
        raise ValueError("fxdp: fix_batchnorm changes the model's parameters; call it before fxdp.privatize "
                         "(or fxdp.unprivatize(model) first).")
    if isinstance(model, _BatchNorm):
        return batchnorm_to_groupnorm(model, max_groups)
    replaced = {}
    _replace(model, max_groups, replaced)
    return model


def _replace(module: nn.Module, max_groups: int, replaced: dict) -> None:
    """Swap BatchNorm children; a BatchNorm shared by several parents becomes one shared GroupNorm."""
    for name, child in list(module._modules.items()):  # every slot, also a module shared twice
        if child is None:
            continue
        if isinstance(child, _BatchNorm):
            if id(child) not in replaced:
                replaced[id(child)] = batchnorm_to_groupnorm(child, max_groups)
            setattr(module, name, replaced[id(child)])
        else:
            _replace(child, max_groups, replaced)


__all__ = ["ValidationIssue", "validate", "fix_batchnorm", "batchnorm_to_groupnorm", "group_count"]
