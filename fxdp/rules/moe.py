"""Mixture-of-experts layers with stacked expert weights (HF Mixtral / Qwen-MoE: ``torch._grouped_mm``).

Refused, eager and compiled. The router sorts the tokens of *all* samples by expert and multiplies each
expert's group of rows with its slice of one stacked parameter; the rows of one sample are scattered over
groups whose sizes depend on every sample's routing. No dimension of the grouped product carries the
samples, so the batch layout -- which fxdp fixes once per input structure -- cannot place them: exact
per-sample norms would need the token-to-sample map of every call carried through the routing gather into
a new kind of layout (rows labelled by sample at run time) and a factor per expert slice. That is not
built. The per-expert loop (``config._experts_implementation = "eager"``: ``F.linear(x[token_idx],
W[expert_idx])``) is refused for the same reason by the lift pass (:mod:`fxdp.analysis.lift`: a slice of a
parameter chosen by an index computed from the samples). What to do: freeze the experts (the router,
attention, norms and embeddings train exactly; or LoRA adapters on the attention), or use a dense MLP.
"""
from __future__ import annotations

import torch

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.base import OpCall, NoFactorsRule, root_names_of

GROUPED = tuple(f for f in (getattr(torch, "_grouped_mm", None),) if f is not None)


class GroupedExpertsRule(NoFactorsRule):
    name = "grouped experts"
    funcs = GROUPED

    def bind(self, call: OpCall):
        names = root_names_of(call.trainable.values())
        raise UncoveredParameterError(
            f"fxdp: {call.name} multiplies routed tokens of all samples with stacked expert weights {', '.join(names)} "
            "(a mixture-of-experts layer): the rows of one sample are scattered over expert groups whose sizes depend "
            "on every sample's routing, so no dimension carries the samples and fxdp cannot form per-sample "
            "gradients (not supported). Freeze the experts (the router, attention and norms train exactly; or LoRA "
            "adapters on the attention), or use a dense MLP.")

