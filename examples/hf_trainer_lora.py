"""DP fine-tuning with the HuggingFace Trainer: tiny GPT-2 + LoRA at a stated ε.

    python examples/hf_trainer_lora.py [--epsilon 8] [--epochs 3] [--max-steps N] [--output-dir DIR]
    torchrun --nproc_per_node=2 examples/hf_trainer_lora.py     # the same script on 2 processes

GPT-2 (2 layers, d=32, built from config with random weights: nothing is
downloaded) gets LoRA adapters (PEFT) and is fine-tuned on a small in-memory
text data set (short sentences from a few templates, character-level tokens,
padded, labels -100 on the padding) with ``fxdp.integrations.DPTrainer``:
Poisson logical batches of 32 (8 per micro-batch × 4 accumulation steps),
per-sample loss, σ calibrated by the PLD accountant for the target ε over the
planned steps, ε logged by the Trainer at each logging step. Runs in about a
minute on a laptop CPU; prints the loss before and after and the ε spent.

Under ``torchrun`` (W processes, gloo on CPU) DPTrainer runs fxdp's data
parallelism, not the Trainer's DDP: the logical batch becomes 32 × W (each rank
draws its share of the global Poisson batch), rank 0 adds the noise once per
logical batch, every rank applies the same update and logs the same ε; rank 0 prints.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "our teacher", "a small bird", "the robot"]
VERBS = ["sees", "likes", "finds", "draws", "follows", "paints", "builds"]
OBJECTS = ["a red ball", "the blue house", "an apple", "the green tree", "a paper boat", "the moon"]
PAD, T = 0, 32


def corpus(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    return [f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}." for _ in range(n)]


def encode(texts, vocab):
    data = []
    for text in texts:
        ids = [vocab[c] for c in text][:T]
        n = len(ids)
        input_ids = torch.tensor(ids + [PAD] * (T - n))
        mask = (torch.arange(T) < n).long()
        data.append({"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)})
    return data


def build_model(vocab_size: int, seed: int):
    import peft
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=T,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                                                      lora_dropout=0.0, fan_in_fan_out=True))


@torch.no_grad()
def mean_loss(model, data):
    import fxdp

    model.eval()
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(fxdp.per_sample_loss(logits, batch["labels"], shift=True))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (σ is calibrated for them)")
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--output-dir", default="hf_trainer_lora_output")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import transformers

    from fxdp.integrations import DPTrainer, PrivacyArguments

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    chars = sorted(set("".join(SUBJECTS + VERBS + OBJECTS) + " ."))
    vocab = {c: i + 1 for i, c in enumerate(chars)}  # 0 is padding
    train, test = encode(corpus(a.examples, a.seed), vocab), encode(corpus(a.test_examples, a.seed + 1), vocab)
    model = build_model(len(vocab) + 1, a.seed)
    args = transformers.TrainingArguments(
        output_dir=a.output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=4,
        num_train_epochs=a.epochs, max_steps=a.max_steps, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=8, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=a.seed)
    trainer = DPTrainer(model=model, args=args, train_dataset=train,
                        privacy_args=PrivacyArguments(target_epsilon=a.epsilon, target_delta=a.delta,
                                                      max_grad_norm=1.0, style="all-layer"))
    before = mean_loss(model, test)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    after = mean_loss(model, test)
    eps = trainer.get_epsilon()
    result = {"before": before, "after": after, "epsilon": eps, "steps": trainer.state.global_step}
    if not trainer.is_world_process_zero():
        return result
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:4d}  loss {entry['loss']:.3f}  ε {entry['epsilon']:.3f}  "
                  f"clipped {entry.get('clipped_fraction', math.nan):.2f}")
    print(f"test loss {before:.3f} -> {after:.3f} in {trainer.state.global_step} steps ({seconds:.0f} s); "
          f"σ = {trainer.budget.sigma:.3f}, R = 1.0, ε = {eps:.3f} at δ = {a.delta:g} (target {a.epsilon:g})")
    return result


if __name__ == "__main__":
    main()
