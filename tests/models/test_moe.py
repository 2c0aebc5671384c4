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


def test_per_expert_loop_with_trainable_experts_is_refused_with_the_routing_reason():
    """``_experts_implementation="eager"`` indexes the stacked weight with the routed expert id
    (``W[expert_idx]``): a slice chosen by the samples, refused by the lift pass saying so."""
    model = mixtral()
    model.config._experts_implementation = "eager"
    fxdp.privatize(model)
    ids = torch.randint(1, 40, (4, 6))
    with pytest.raises(fxdp.UncoveredParameterError,
                       match="(?s)experts.gate_up_proj.*index computed from the samples.*mixture-of-experts.*Freeze"):
        lm_loss(model(input_ids=ids), ids).backward()


def test_mixtral_compiled_refuses_trainable_experts_and_equals_eager_with_frozen_ones():
    import copy
    ids = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(2))
    trainable = fxdp.privatize(mixtral())
    with pytest.raises(fxdp.UncoveredParameterError, match="(?s)mixture-of-experts.*Freeze"):
        torch.compile(trainable, backend="fxdp", options={"compiler": "aot_eager"})(input_ids=ids)
    base = mixtral()
    for n, p in base.named_parameters():
        if ".experts." in n:
            p.requires_grad_(False)
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.01)
    lm_loss(eager(input_ids=ids), ids).backward()
    model = fxdp.privatize(base, max_grad_norm=0.01)
    lm_loss(torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})(input_ids=ids), ids).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is None
        if p.requires_grad:
            torch.testing.assert_close(p.private_grad, q.private_grad, rtol=1e-5, atol=1e-8, msg=name)
        else:
            assert getattr(p, "private_grad", None) is None
