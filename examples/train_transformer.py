"""Main example: DP training of a small transformer language model with fxdp.

A character-level GPT-style model (plain torch modules: Embedding, Linear,
LayerNorm, scaled-dot-product attention) learns a synthetic grammar of
arithmetic sentences. ``fxdp.PrivacyEngine`` (Opacus conventions) picks the
noise for a target ε, samples Poisson batches, clips every sample's gradient
(block-wise, one backward pass, bookkeeping ghost clipping) and adds the noise
once per batch; the progress bar shows the loss and the ε spent.

    python examples/train_transformer.py [--epochs 2] [--epsilon 8]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

try:
    from tqdm import tqdm
except ImportError:  # progress bar is optional
    tqdm = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxdp  # noqa: E402

VOCAB = "0123456789+= ."


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=len(VOCAB), d=64, heads=4, layers=2, T=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids):
        # position ids of shape (1, T): fxdp lifts them to the batch (see README, "batch-free uses")
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def make_data(n, T=32, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = ""
        while len(s) < T + 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            s += f"{a}+{b}={a + b}. "
        rows.append([VOCAB.index(c) for c in s[: T + 1]])
    return torch.tensor(rows)


def lm_loss(logits, targets):
    """Mean over each sample's own tokens, then mean over the batch: a per-sample loss."""
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return tok.view(targets.shape[0], -1).mean(1).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size")
    ap.add_argument("--data", type=int, default=2048)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--style", default="block-wise")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = make_data(args.data)
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=args.batch)
    model = TinyGPT()
    engine = fxdp.PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), data_loader=loader,
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, style=args.style)
    print(f"fxdp example: TinyGPT ({sum(p.numel() for p in model.parameters())} parameters), style={args.style}, "
          f"R={args.max_grad_norm}, sigma={optimizer.noise_multiplier:.3f}, target eps={args.epsilon} "
          f"at delta={args.delta}; loss of a uniform guess: {math.log(len(VOCAB)):.3f}")
    steps = int(args.epochs * len(loader))
    bar = tqdm(total=steps, unit="step") if tqdm is not None else None
    step = 0
    while step < steps:
        for x, y in loader:                       # Poisson batches of varying size (possibly empty)
            optimizer.zero_grad()
            logits = model(x)
            loss = lm_loss(logits, y) if len(x) else logits.sum()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 8 == 1 or step == steps:           # the PRV accountant takes ~0.1 s per query
                eps = engine.get_epsilon(args.delta)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", eps=f"{eps:.2f}")
                bar.update()
            elif step % 10 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}  eps {eps:.2f}")
            if step >= steps:
                break
    if bar is not None:
        bar.close()
    print(f"final loss {loss.item():.3f}, eps spent {engine.get_epsilon(args.delta):.2f} (delta={args.delta})")


if __name__ == "__main__":
    main()
