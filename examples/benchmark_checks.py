"""Benchmark: the per-forward privacy checks of eager fxdp (issue #13 §5-§7), GPT-2.

    python examples/benchmark_checks.py [--layers 2] [--d 128] [--T 64] [--B 8] [--rounds 5]

Prints, in one run, the median step time (forward + backward) of non-private eager training, of
fxdp eager with its per-forward checks (sample-mixing monitor with its batch-dimension propagation,
autograd-graph walk for unseen parameter uses, buffer watch, submodule hooks), of fxdp eager with
the monitor's batch-dimension rules switched off (only its full-reduction check and call hashing:
the monitor before the structural propagation), and of fxdp eager with the monitor and the graph
walk switched off, as ratios to non-private eager. The checks are switched off by patching them out
in this process only: that configuration is not a supported way to train.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(layers, d, T, vocab=5000):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=4, n_positions=T, vocab_size=vocab,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def loss_of(model, ids):
    import fxdp

    return fxdp.per_sample_loss(model(ids).logits, ids, shift=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import fxdp
    from fxdp.analysis import mixing_monitor
    from fxdp.engine import forward_checks

    ids = torch.randint(0, 5000, (args.B, args.T))
    plain = build(args.layers, args.d, args.T)
    private = fxdp.privatize(build(args.layers, args.d, args.T))

    def step(model):
        loss_of(model, ids).backward()
        for p in model.parameters():
            p.grad = None
        fxdp.clear_private_grads(model) if fxdp.is_privatized(model) else None

    monitor_tf, walk = mixing_monitor.MixingMonitor.__torch_function__, forward_checks.refuse_unseen_uses
    rules = mixing_monitor.RULES

    def checks(on: bool, propagation: bool = True):
        mixing_monitor.RULES = rules if propagation else {}
        if on:
            mixing_monitor.MixingMonitor.__torch_function__, forward_checks.refuse_unseen_uses = monitor_tf, walk
        else:
            def passthrough(self, func, types, a=(), k=None):
                self.signature = hash((self.signature, func))  # keeps re-validation quiet
                return func(*a, **(k or {}))
            mixing_monitor.MixingMonitor.__torch_function__ = passthrough
            forward_checks.refuse_unseen_uses = lambda *a: None

    times = {"non-private": [], "fxdp (checks on)": [], "fxdp (batch-dim rules off)": [],
             "fxdp (monitor+walk off)": []}
    for _ in range(2):
        step(plain), step(private)
    for _ in range(args.rounds):  # interleaved, so that load on the machine hits every configuration
        for name in times:
            model = plain if name == "non-private" else private
            checks(name != "fxdp (monitor+walk off)", propagation=name != "fxdp (batch-dim rules off)")
            t = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - t)
    checks(True)
    base = statistics.median(times["non-private"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:26s} {med * 1e3:8.1f} ms   {med / base:5.2f}x non-private eager")
    on, off = statistics.median(times["fxdp (checks on)"]), statistics.median(times["fxdp (monitor+walk off)"])
    print(f"cost of the per-forward checks: {on / off:.3f}x the fxdp eager step")
    rules_off = statistics.median(times["fxdp (batch-dim rules off)"])
    print(f"cost of the batch-dimension propagation alone: {on / rules_off:.3f}x the fxdp eager step")


if __name__ == "__main__":
    main()
