"""Per-sample rules, one module per layer family, and their registry.

The registry maps a torch function (or Tensor method) to the rules that may
bind it; lookup is by function identity, so subclasses of nn.Linear & co. are
covered because they call the same functional ops.
"""
from __future__ import annotations

from typing import Dict, List

from fxdp.rules.attention import MultiheadAttentionRule
from fxdp.rules.base import Binding, OpCall, Rule, func_name
from fxdp.rules.broadcast import BroadcastRule
from fxdp.rules.conv import ConvRule
from fxdp.rules.embedding import EmbeddingBagRule, EmbeddingRule
from fxdp.rules.inplace import InplaceRule
from fxdp.rules.linear import AddmmRule, LinearRule, MatmulRule
from fxdp.rules.norms import GroupNormRule, LayerNormRule, RMSNormRule
from fxdp.rules.moe import GroupedExpertsRule
from fxdp.rules.recurrent import RecurrentRule

ALL_RULES: List[Rule] = [LinearRule(), AddmmRule(), MatmulRule(), EmbeddingRule(), ConvRule(),
                         LayerNormRule(), GroupNormRule(), RMSNormRule(), BroadcastRule(),
                         MultiheadAttentionRule(), InplaceRule(), EmbeddingBagRule(), RecurrentRule(),
                         GroupedExpertsRule()]

_REGISTRY: Dict[object, List[Rule]] = {}
for _rule in ALL_RULES:
    for _f in _rule.funcs:
        _REGISTRY.setdefault(_f, []).append(_rule)


def rules_for(func) -> List[Rule]:
    """Rules that may bind ``func`` (empty list when none)."""
    try:
        return _REGISTRY.get(func, [])
    except TypeError:  # unhashable callables
        return []


def decomposition(call: OpCall):
    """A callable running ``call`` as simpler intercepted ops, or None."""
    for rule in rules_for(call.func):
        d = rule.decompose(call)
        if d is not None:
            return d
    return None


def bind(call: OpCall):
    """First binding a rule produces for ``call``, or None."""
    for rule in rules_for(call.func):
        b = rule.bind(call)
        if b is not None:
            return b
    return None


__all__ = ["ALL_RULES", "Binding", "OpCall", "Rule", "bind", "decomposition", "func_name", "rules_for"]
