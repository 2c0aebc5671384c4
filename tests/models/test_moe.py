"""Mixture of experts (HF Mixtral, stacked expert weights used by torch._grouped_mm): trainable experts are
refused with the reason (fxdp.rules.moe); with frozen experts the router, attention and norms train exactly
(float32: grouped_mm has no float64 kernel)."""
import pytest
import torch

import fxdp
from tests.models.helpers import check_against_reference

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()


def mixtral():
    cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg)


def lm_loss(out, y):
    return fxdp.per_sample_loss(out.logits, y, shift=True)


def test_trainable_stacked_experts_are_refused_with_the_reason():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no grouped_mm in this torch")
    model = fxdp.privatize(mixtral())
    ids = torch.randint(1, 40, (4, 6))
    with pytest.raises(fxdp.UncoveredParameterError, match="(?s)experts.gate_up_proj.*mixture-of-experts.*Freeze"):
        lm_loss(model(input_ids=ids), ids).backward()


def test_mixtral_with_frozen_experts_equals_reference():
    model = mixtral()
    for n, p in model.named_parameters():
        if ".experts." in n:
            p.requires_grad_(False)
    torch.manual_seed(1)
    ids = torch.randint(1, 40, (4, 6))
    check_against_reference(model, (), {"input_ids": ids}, ids, lm_loss, rtol=2e-4, atol=1e-7)
