"""HuggingFace models built from config (random weights, tiny sizes, no dropout)
under fxdp, against the per-sample reference (float64, R near the median norm):
GPT-2 with padding, BERT masked LM, ViT, Llama (RMSNorm, rotary, GQA), T5
(trainable relative attention bias: a virtual parameter; and frozen), PEFT LoRA."""

import pytest
import torch
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z
from tests.models.helpers import STYLES, check_against_reference

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

B = 4


def lm_loss(out, labels):
    return fxdp.per_sample_loss(out.logits, labels, shift=True)


def padded_ids(vocab, T=7, lengths=(7, 5, 7, 3)):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def gpt2():
    torch.manual_seed(0)
    return Z.gpt2()


@pytest.mark.parametrize("style", STYLES)
def test_gpt2_with_padding_and_per_sample_token_mean_equals_reference(style):
    ids, mask, labels = padded_ids(40)
    check_against_reference(gpt2(), (), {"input_ids": ids, "attention_mask": mask}, labels, lm_loss, style=style)


def test_bert_masked_lm_with_token_types_equals_reference():
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).double()
    ids, mask, _ = padded_ids(30)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    labels = torch.full_like(ids, -100)
    labels[:, 1:6:2] = ids[:, 1:6:2]
    labels[3, 3:] = -100

    def loss(out, y):
        return fxdp.per_sample_loss(out.logits, y)

    check_against_reference(model, (), {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
                            labels, loss, style="layer-wise")


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_vit_cls_token_and_position_embeddings_equal_reference(style):
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).double()
    with torch.no_grad():  # random (not zero) cls token and position table
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_()
    x, y = torch.randn(B, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (B,))
    r = check_against_reference(model, (x,), {}, y, lambda o, t: F.cross_entropy(o.logits, t), style=style)
    assert "vit.embeddings.cls_token" in r["engine"].plan.group_of


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
def test_llama_rmsnorm_rotary_gqa_with_padding_equals_reference(style):
    ids, mask, labels = padded_ids(40)
    check_against_reference(Z.llama(), (), {"input_ids": ids, "attention_mask": mask}, labels, lm_loss, style=style)


def t5():
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).double()


def t5_loss(out, labels):
    return fxdp.per_sample_loss(out.logits, labels)


@pytest.mark.parametrize("batch,seq", [(4, 7), (3, 3)])
def test_t5_trainable_relative_attention_bias_equals_reference(batch, seq):
    """The bias table is looked up with a (T, T) index that has no batch dimension and broadcast over the
    batch afterwards (it was refused): now a virtual parameter, gathered per sample where it meets the
    attention scores. Also with B == T, where a size-based guess would take T for the batch."""
    torch.manual_seed(2)
    ids = torch.randint(1, 40, (batch, seq))
    labels = torch.randint(1, 40, (batch, seq))
    r = check_against_reference(t5(), (), {"input_ids": ids, "labels": labels}, labels, t5_loss,
                                style="param-wise")
    assert any("relative_attention_bias" in n for n in r["engine"].plan.group_of)


def test_t5_with_frozen_relative_attention_bias_equals_reference():
    model = t5()
    for n, p in model.named_parameters():
        if "relative_attention_bias" in n:
            p.requires_grad_(False)
    ids, mask, _ = padded_ids(40)
    labels = torch.randint(1, 40, (B, 5))
    labels[1, 3:] = -100
    check_against_reference(model, (), {"input_ids": ids, "attention_mask": mask, "labels": labels}, labels,
                            t5_loss, style="block-wise")
    assert all(not hasattr(p, "private_grad") for n, p in model.named_parameters()
               if "relative_attention_bias" in n)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_peft_lora_trains_only_adapters_and_equals_reference(style):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                                        lora_dropout=0.0, fan_in_fan_out=True))
    with torch.no_grad():  # lora_B starts at zero: make lora_A's gradient non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, mask, labels = padded_ids(40)
    r = check_against_reference(model, (), {"input_ids": ids, "attention_mask": mask}, labels, lm_loss, style=style)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    used = {n for table in r["engine"].tables.values() for _, names in table.keys for n in names}
    assert used == trainable, "frozen base parameters must not be intercepted (no norm work for them)"
    for n, p in model.named_parameters():
        assert hasattr(p, "private_grad") == (n in trainable), n


def test_gpt2_token_mean_over_the_whole_batch_differs_from_per_sample_mean_with_padding():
    """Documents why per_sample_loss exists: with unequal lengths the HF ``labels=`` loss (one mean
    over all tokens of the batch) is not the mean of per-sample losses."""
    model = gpt2()
    ids, mask, labels = padded_ids(40)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    per_sample = fxdp.per_sample_loss(out.logits, labels, shift=True)
    assert not torch.allclose(out.loss.double(), per_sample)
    equal = fxdp.per_sample_loss(out.logits[:, :5], ids[:, :5], shift=True)
    lg = out.logits[:, :4]
    token_mean = F.cross_entropy(lg.reshape(-1, 40), ids[:, 1:5].reshape(-1))
    torch.testing.assert_close(equal, token_mean)
