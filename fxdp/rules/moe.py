"""Mixture-of-experts layers with stacked expert weights (HF Mixtral / Qwen-MoE: ``torch._grouped_mm``).

Refused. The router sorts the tokens of *all* samples by expert and multiplies each expert's group of rows
with its slice of one stacked parameter; the rows of one sample are scattered over groups whose sizes
depend on every sample's routing, so no dimension of the grouped product carries the samples (the batch
layout analysis cannot place them) and per-sample norms through the routing gather would need the
token-to-sample map of every call. Freeze the experts (train the router, attention and norms, or LoRA on
the attention), or use a dense MLP.
"""
from __future__ import annotations

import torch

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.base import OpCall, NoFactorsRule, root_names

GROUPED = tuple(f for f in (getattr(torch, "_grouped_mm", None),) if f is not None)


class GroupedExpertsRule(NoFactorsRule):
    name = "grouped experts"
    funcs = GROUPED

    def bind(self, call: OpCall):
        names = sorted({r for n in call.trainable.values() for r in root_names(n)})
        raise UncoveredParameterError(
            f"fxdp: {call.name} multiplies routed tokens of all samples with stacked expert weights {', '.join(names)} "
            "(a mixture-of-experts layer): the rows of one sample are scattered over expert groups whose sizes depend "
            "on every sample's routing, so fxdp cannot form per-sample gradients. Freeze the experts (train the "
            "router, attention and norms, or LoRA adapters), or use a dense MLP.")

