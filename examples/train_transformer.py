"""Main example: DP training of a small transformer language model with fxdp.

A character-level GPT-style model (plain torch modules: Embedding, Linear,
LayerNorm, scaled-dot-product attention) learns a synthetic grammar of
arithmetic sentences. fxdp clips every sample's gradient (block-wise, one
backward pass, bookkeeping ghost clipping), DPOptimizer adds Gaussian noise,
and the accountant reports the privacy spent.

    python examples/train_transformer.py [--steps 60] [--epsilon 8]
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

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0)
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


def fxdp_loss(logits, targets):
    """Mean over each sample's own tokens, then mean over the batch: a per-sample loss."""
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return tok.view(targets.shape[0], -1).mean(1).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--data", type=int, default=4096)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--style", default="block-wise")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = make_data(args.data)
    model = fxdp.privatize(TinyGPT(), style=args.style, max_grad_norm=args.max_grad_norm)
    q = args.batch / args.data
    from opacus.accountants.utils import get_noise_multiplier
    sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta, sample_rate=q,
                                 steps=args.steps, accountant="prv")
    optimizer = fxdp.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), noise_multiplier=sigma,
                                 max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch)
    from opacus.accountants import PRVAccountant
    accountant = PRVAccountant()
    print(f"fxdp example: TinyGPT ({sum(p.numel() for p in model.parameters())} params), style={args.style}, "
          f"R={args.max_grad_norm}, sigma={sigma:.3f}, q={q:.4f}, target eps={args.epsilon}")
    gen = torch.Generator().manual_seed(1)
    for step in range(1, args.steps + 1):
        mask = torch.rand(args.data, generator=gen) < q          # Poisson sampling
        batch = data[mask]
        optimizer.zero_grad()
        logits = model(batch[:, :-1])
        loss = fxdp_loss(logits, batch[:, 1:]) if len(batch) else logits.sum()
        loss.backward()
        optimizer.step()
        accountant.step(noise_multiplier=sigma, sample_rate=q)
        if step % 10 == 0 or step == 1:
            eps = accountant.get_epsilon(delta=args.delta)
            print(f"step {step:4d}  batch {len(batch):3d}  loss {loss.item():.3f}  "
                  f"(uniform guess {math.log(len(VOCAB)):.3f})  eps spent {eps:.2f}")


if __name__ == "__main__":
    main()
