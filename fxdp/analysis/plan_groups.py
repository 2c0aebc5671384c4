"""Clip groups from the model's structure (never from hook or call order).

- all-layer: one group;
- layer-wise: one group per module that owns parameters (a parameter belongs
  to the module of its canonical name, as in ``named_parameters()``);
- param-wise: one group per parameter tensor;
- block-wise: one group per block. With ``block_heads`` each named module
  starts a block that runs, in module order, until the next head (parameters
  before the first head form a block of their own). Without heads, each element
  of the main repeated container (the largest ModuleList / Sequential of
  same-type modules) is a block, everything before it one block and everything
  after it one block; a model without such a container gets one block per
  top-level child.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from fxdp.core.config import ClippingStyle, DPConfig


@dataclass(frozen=True)
class GroupPlan:
    """Clip groups: ``groups[i]`` is the tuple of parameter names of group i."""

    groups: Tuple[Tuple[str, ...], ...]
    labels: Tuple[str, ...]
    group_of: Dict[str, int]

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def main_repeated_container(model: nn.Module) -> Optional[str]:
    """Name of the largest ModuleList/Sequential whose children all share one type."""
    best, best_len = None, 1
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > best_len:
            kinds = {type(c) for c in m.children()}
            if len(kinds) == 1 and any(True for _ in m.parameters()):
                best, best_len = name, len(m)
    return best


def _module_order(model: nn.Module) -> Dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}


def block_labels(model: nn.Module, names: List[str], heads: Optional[Tuple[str, ...]]) -> Dict[str, str]:
    """Block label of each parameter name."""
    order = _module_order(model)
    if heads:
        missing = [h for h in heads if h not in order]
        if missing:
            raise ValueError(f"fxdp: block_heads {missing} name no module of the model; module names look like "
                             f"{[n for n in list(order)[1:6]]}.")
        starts = sorted(((order[h], h) for h in set(heads)))
        out = {}
        for n in names:
            pos = order.get(owner(n), 0)
            label = "<before first head>"
            for start, h in starts:
                if start <= pos:
                    label = h
            out[n] = label
        return out
    container = main_repeated_container(model)
    if container is None:
        return {n: (n.split(".", 1)[0] if "." in n else "<root>") for n in names}
    prefix = container + "." if container else ""
    cpos = order[container]
    out = {}
    for n in names:
        if n.startswith(prefix):
            out[n] = prefix + n[len(prefix):].split(".", 1)[0]
        else:
            out[n] = "<before " + container + ">" if order.get(owner(n), 0) < cpos else "<after " + container + ">"
    return out


def plan_groups(model: nn.Module, config: DPConfig) -> GroupPlan:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("fxdp: the model has no trainable parameters (requires_grad=True); nothing to privatize.")
    if config.style is ClippingStyle.ALL_LAYER:
        labels = {n: "all" for n in names}
    elif config.style is ClippingStyle.PARAM_WISE:
        labels = {n: n for n in names}
    elif config.style is ClippingStyle.LAYER_WISE:
        labels = {n: owner(n) or "<root>" for n in names}
    else:
        labels = block_labels(model, names, config.block_heads)
    order: List[str] = []
    members: Dict[str, List[str]] = {}
    for n in names:
        lab = labels[n]
        if lab not in members:
            order.append(lab)
            members[lab] = []
        members[lab].append(n)
    groups = tuple(tuple(members[lab]) for lab in order)
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    return GroupPlan(groups, tuple(order), group_of)
