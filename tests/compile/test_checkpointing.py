"""Activation checkpointing under ``torch.compile(backend="fxdp")``: both flavours reach a region as a
checkpoint body, which ``inline_checkpoints`` inlines (exact against the one-sample-at-a-time reference,
float64, R at the median; its activations are kept, which the pass warns about); a checkpointed function
dynamo cannot trace runs outside the compiled graph and is refused before any gradient exists."""
import copy
import warnings

import pytest
import torch

import fxdp
from tests.engine.test_checkpointing import FLAVOURS, Checkpointed, assert_matches, ce_sum, data, reference


class Traceable(Checkpointed):
    def body(self, h, ids):  # no Python side effect: dynamo traces it into the checkpoint body
        h = self.blocks[0](h + self.pos(ids))
        return h, self.head(h)


@pytest.mark.parametrize("flavour,style", [("non-reentrant", "all-layer"), ("reentrant", "block-wise")])
def test_checkpointed_body_is_inlined_and_exact(flavour, style):
    torch.manual_seed(11)
    template = Traceable(FLAVOURS[flavour]).double()
    ids, y = data(seed=2)
    expected, R = reference(template, ids, y, style, "abadi")
    model = fxdp.privatize(copy.deepcopy(template), style=style, max_grad_norm=R)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "inlined": warned when a region is compiled (once per graph)
        (ce_sum(compiled(ids), y) / len(ids)).backward()
    assert_matches(model, expected)


def test_a_checkpointed_function_dynamo_cannot_trace_is_refused():
    """``Checkpointed.body`` counts its calls (a Python side effect): dynamo runs the checkpoint eagerly,
    outside the compiled graph, where fxdp cannot tap it."""
    model = fxdp.privatize(Checkpointed(False).double())
    ids, y = data()
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(Exception, match="PrivacyError|outside any compiled graph"):
        ce_sum(compiled(ids), y).backward()
    assert all(getattr(p, "private_grad", None) is None and p.grad is None for p in model.parameters())
