"""Tiny GPT-2 (+ LoRA) built from config and an in-memory padded text data set for the DPTrainer tests."""
from __future__ import annotations

import torch

VOCAB, T = 40, 10


def tiny_gpt2(lora=True, seed=0, dtype=torch.float32):
    import peft
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).to(dtype)
    if not lora:
        return model
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                                       lora_dropout=0.0, fan_in_fan_out=True))
    with torch.no_grad():  # lora_B starts at zero: give lora_A a non-trivial gradient
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def padded_texts(n, seed=0, min_len=3):
    """``n`` examples {input_ids, attention_mask, labels} of length T with 3..T real tokens (labels -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        k = int(torch.randint(min_len, T + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        mask = (torch.arange(T) < k).long()
        data.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return data


def args(tmp_path, **kw):
    import transformers

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, learning_rate=1e-2,
                disable_tqdm=True, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)
