"""Benchmark: one training step of an LSTM language model (embedding -> 2-layer LSTM -> vocabulary head),
non-private vs fxdp.privatize (eager) vs Opacus 1.6 hooks with its DPLSTM, printed as ratios to the
non-private step measured in the same run.

    python examples/benchmark_lstm.py [--steps 10] [--rounds 3] [--batch 16] [--seq 32] [--hidden 128]

All three models live in this one process; each round runs ``--steps`` steps of every mode in turn
(interleaved, so load changes hit all modes alike) and the figure per mode is the median over rounds of
the round's median step time. Noise is on (sigma = 1) for both private modes. Run on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LSTMLM(nn.Module):
    def __init__(self, vocab, d, hidden, lstm_cls=nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = lstm_cls(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def lm_loss(logits, ids):
    """Per-sample loss (mean over each sequence's next-token losses), averaged over the batch."""
    lg = logits[:, :-1]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1).mean()


def plain_step(args, ids):
    torch.manual_seed(0)
    model = LSTMLM(args.vocab, args.dim, args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        lm_loss(model(ids), ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def fxdp_step(args, ids):
    import fxdp
    torch.manual_seed(0)
    model = fxdp.privatize(LSTMLM(args.vocab, args.dim, args.hidden), style="all-layer", max_grad_norm=1.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=ids.shape[0])

    def step():
        lm_loss(model(ids), ids).backward()
        opt.step()
        opt.zero_grad()
    return step


def opacus_step(args, ids):
    from opacus import PrivacyEngine
    from opacus.layers import DPLSTM
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    model = LSTMLM(args.vocab, args.dim, args.hidden, lstm_cls=DPLSTM)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(ids), batch_size=ids.shape[0])
    module, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode="hooks")

    def step():
        lm_loss(module(ids), ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


MODES = {"plain": plain_step, "fxdp": fxdp_step, "opacus-hooks (DPLSTM)": opacus_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    steps = {name: make(args, ids) for name, make in MODES.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            times[name].append(statistics.median(ts))
    base = statistics.median(times["plain"])
    print(f"LSTM LM: vocab {args.vocab}, d {args.dim}, hidden {args.hidden} x 2 layers, B {args.batch}, "
          f"T {args.seq}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':<24}{'ms/step':>10}{'vs non-private':>16}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<24}{t * 1e3:>10.1f}{t / base:>15.2f}x")


if __name__ == "__main__":
    main()
