"""Activation (gradient) checkpointing: not supported yet, refused loudly with an fxdp error that names the
parameter, the op and what to do -- never a raw CheckpointError, never a gradient that escapes clipping
(the recomputation in backward would run outside fxdp's interception)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fxdp


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.inp, self.a, self.head = nn.Linear(5, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        return self.head(checkpoint(lambda t: torch.tanh(self.a(t)), self.inp(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_is_refused_naming_parameter_and_op(reentrant):
    model = fxdp.privatize(Checkpointed(reentrant))
    kind = "reentrant" if reentrant else "non-reentrant"
    with pytest.raises(fxdp.UncoveredParameterError, match=rf"a\.bias, a\.weight used by F\.linear inside a {kind}"):
        F.cross_entropy(model(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    assert all(not hasattr(p, "private_grad") and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing_enable_on_gpt2_is_refused(reentrant):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    fxdp.privatize(model)
    ids = torch.randint(0, 40, (4, 6))
    with pytest.raises(fxdp.UncoveredParameterError, match="gradient_checkpointing_disable"):
        fxdp.per_sample_loss(model(input_ids=ids).logits, ids, shift=True).backward()


def test_the_same_model_without_checkpointing_trains():
    model = fxdp.privatize(Checkpointed(False))
    model.forward = lambda x: model.head(torch.tanh(model.a(model.inp(x))))
    F.cross_entropy(model(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    assert all(hasattr(p, "private_grad") for p in model.parameters())
