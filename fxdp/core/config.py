"""Typed configuration of differentially private clipping.

This is the only module that parses user strings such as ``"block-wise"``;
everything behind the API edge works on the frozen objects defined here.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union


class ClippingStyle(enum.Enum):
    """How parameters are grouped for clipping.

    Each group g gets the threshold ``R / sqrt(G)`` where G is the number of
    groups, so that the whole clipped contribution of one sample has norm <= R.
    """

    ALL_LAYER = "all-layer"
    LAYER_WISE = "layer-wise"
    PARAM_WISE = "param-wise"
    BLOCK_WISE = "block-wise"


class ClippingFn(enum.Enum):
    """Per-sample clip factor C as a function of a group norm ``n``.

    - ABADI: ``min(1, R_g / (n + gamma))`` (Abadi et al. 2016)
    - AUTOMATIC: ``R_g / (n + gamma)`` (Bu et al., "Automatic clipping")
    - GLOBAL: ``1[n <= R_g]`` (samples above the threshold are dropped)
    """

    ABADI = "abadi"
    AUTOMATIC = "automatic"
    GLOBAL = "global"


class LossReduction(enum.Enum):
    """How the per-sample losses were combined into the scalar loss."""

    MEAN = "mean"
    SUM = "sum"


DEFAULT_STABILITY = {ClippingFn.ABADI: 1e-6, ClippingFn.AUTOMATIC: 1e-2, ClippingFn.GLOBAL: 0.0}

_ALIASES = {
    "all-layer": "all-layer", "all_layer": "all-layer", "alllayer": "all-layer", "flat": "all-layer",
    "layer-wise": "layer-wise", "layer_wise": "layer-wise", "layerwise": "layer-wise",
    "param-wise": "param-wise", "param_wise": "param-wise", "paramwise": "param-wise",
    "block-wise": "block-wise", "block_wise": "block-wise", "blockwise": "block-wise",
}


def _parse_enum(kind, value, aliases=None):
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        key = (aliases or {}).get(key, key)
        for member in kind:
            if member.value == key:
                return member
    allowed = ", ".join(repr(m.value) for m in kind)
    raise ValueError(f"fxdp: unknown {kind.__name__} {value!r}; expected one of {allowed}.")


def positive_number(name: str, value) -> float:
    """``float(value)`` if it is a positive finite number, else ValueError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fxdp: {name} must be a positive number, got {value!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"fxdp: {name} must be a positive finite number, got {value!r}.")
    return v


def nonnegative_number(name: str, value) -> float:
    """``float(value)`` if it is a finite number >= 0, else ValueError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fxdp: {name} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"fxdp: {name} must be a finite number >= 0, got {value!r}.")
    return v


@dataclass(frozen=True)
class DPConfig:
    """Everything the clipping engine needs to know, validated.

    Attributes:
        style: grouping of parameters into clip groups.
        max_grad_norm: R > 0, the bound on each sample's whole clipped gradient.
        clipping_fn: the per-sample clip factor.
        numerical_stability_constant: gamma in the clip factor (never changes R).
        loss_reduction: MEAN means the loss carries 1/B, which the engine undoes
            with the actual batch size of each forward pass.
        block_heads: module names each starting a block (block-wise only);
            None means the default blocks (see ``fxdp.analysis.plan_groups``).
        batch_dim: the batch dimension of the model's tensor inputs: an int, or a
            tuple of (input position or keyword, dim or None) pairs (given as a
            dict to ``make_config``); see ``fxdp.core.inputs``.
    """

    style: ClippingStyle = ClippingStyle.ALL_LAYER
    max_grad_norm: float = 1.0
    clipping_fn: ClippingFn = ClippingFn.ABADI
    numerical_stability_constant: float = 1e-6
    loss_reduction: LossReduction = LossReduction.MEAN
    block_heads: Optional[tuple] = None
    batch_dim: object = 0

    @property
    def batch_dim_spec(self):
        """``batch_dim`` as an int or a dict, as ``fxdp.core.inputs`` takes it."""
        return dict(self.batch_dim) if isinstance(self.batch_dim, tuple) else self.batch_dim

    def group_threshold(self, num_groups: int) -> float:
        """R_g = R / sqrt(G): the groups' thresholds add up to R in quadrature."""
        return self.max_grad_norm / math.sqrt(max(num_groups, 1))

    def as_kwargs(self) -> dict:
        """The keyword arguments of ``privatize`` that rebuild this config."""
        return dict(
            style=self.style.value, max_grad_norm=self.max_grad_norm,
            clipping_fn=self.clipping_fn.value,
            numerical_stability_constant=self.numerical_stability_constant,
            loss_reduction=self.loss_reduction.value,
            block_heads=list(self.block_heads) if self.block_heads is not None else None,
            batch_dim=self.batch_dim_spec,
        )


def make_config(
    style: Union[str, ClippingStyle] = "all-layer",
    max_grad_norm: float = 1.0,
    clipping_fn: Union[str, ClippingFn] = "abadi",
    numerical_stability_constant: Optional[float] = None,
    loss_reduction: Union[str, LossReduction] = "mean",
    block_heads: Optional[Sequence[str]] = None,
    batch_dim: Optional[int] = None,
) -> DPConfig:
    """Validate user arguments and turn them into a :class:`DPConfig`.

    Raises:
        ValueError: unknown style / clipping_fn / loss_reduction, a non-positive
            or non-finite R, a negative stability constant, block_heads with a
            style other than block-wise, or a batch_dim that is not an integer.
    """
    style = _parse_enum(ClippingStyle, style, _ALIASES)
    clipping_fn = _parse_enum(ClippingFn, clipping_fn)
    loss_reduction = _parse_enum(LossReduction, loss_reduction)
    r = positive_number("max_grad_norm", max_grad_norm)
    if numerical_stability_constant is None:
        gamma = DEFAULT_STABILITY[clipping_fn]
    else:
        gamma = nonnegative_number("numerical_stability_constant", numerical_stability_constant)
    if clipping_fn is ClippingFn.AUTOMATIC and gamma == 0:
        raise ValueError("fxdp: automatic clipping needs numerical_stability_constant > 0 (C = R/(norm+gamma)).")
    heads = None
    if block_heads is not None:
        if style is not ClippingStyle.BLOCK_WISE:
            raise ValueError(f"fxdp: block_heads only apply to style='block-wise', not {style.value!r}.")
        if isinstance(block_heads, str):
            block_heads = [block_heads]
        heads = tuple(str(h) for h in block_heads)
        if not heads:
            raise ValueError("fxdp: block_heads is empty; pass None for the default blocks.")
    if batch_dim is None:
        batch_dim = 0
    if isinstance(batch_dim, dict):
        for k, v in batch_dim.items():
            if not isinstance(k, (int, str)) or isinstance(k, bool) or not (v is None or (isinstance(v, int)
                                                                                           and not isinstance(v, bool))):
                raise ValueError(f"fxdp: batch_dim entries map an input (position or keyword) to a dim or None, "
                                 f"got {k!r}: {v!r}.")
        batch_dim = tuple(sorted(batch_dim.items(), key=lambda kv: str(kv[0])))
    elif isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise ValueError(f"fxdp: batch_dim must be an int or a dict {{input: dim}}, got {batch_dim!r}.")
    return DPConfig(style, r, clipping_fn, gamma, loss_reduction, heads, batch_dim)
