"""Benchmark: one training step of GPT-2 (4 layers, d=256, T=128, B=16),
non-private (eager and inductor) vs fxdp.privatize (eager and backend "fxdp"),
printed as ratios to non-private eager.

    python examples/benchmark.py [--steps 10] [--warmup 3] [--device cpu|cuda]

Mode ``fxdp-dpopt`` is ``fxdp`` stepped through ``fxdp.DPOptimizer`` (noise off) with the
step invariants of a loader fxdp owns (drawn = clipped, parameter ownership, clearing; see
fxdp/training/step_check.py): its ratio to ``fxdp`` is the cost of the optimizer and its checks.

Median step time over ``--steps`` steps after ``--warmup`` steps, and peak
memory (CUDA: max allocated; CPU: peak RSS growth of the step, measured by a
fresh process per configuration).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(device, dtype=torch.float32, vocab=50257):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=vocab)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype)


def lm_loss(logits, ids):
    """Per-sample loss (mean over each sample's tokens), averaged over the batch."""
    lg = logits[:, :-1]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1).mean()


def run_one(mode, steps, warmup, device, B=16, T=128, vocab=50257):
    import fxdp
    model = build(device, vocab=vocab)
    if mode.startswith("fxdp"):
        fxdp.privatize(model, style="all-layer", max_grad_norm=1.0)
    fwd = model
    if mode.endswith("compiled"):
        fwd = torch.compile(model, backend="fxdp" if mode.startswith("fxdp") else "inductor")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    if mode == "fxdp-dpopt":
        from fxdp.training.step_check import DrawnBatchCheck
        opt = fxdp.DPOptimizer(opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)
        opt.batch_check = DrawnBatchCheck("the benchmark's batches")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g).to(device)

    def step():
        if mode == "fxdp-dpopt":
            opt.notify_batch(ends_logical_batch=True, num_examples=B)  # what fxdp's loaders report
        loss = lm_loss(fwd(ids).logits, ids)
        loss.backward()
        if mode in ("fxdp", "fxdp-compiled"):
            for p in params:
                p.grad = p.private_grad / B
                del p.private_grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t_compile = time.perf_counter()
    step()
    t_compile = time.perf_counter() - t_compile
    for _ in range(warmup - 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return {"mode": mode, "median_ms": 1000 * statistics.median(times), "peak_mib": peak,
            "first_step_s": t_compile}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="plain,plain-compiled,fxdp,fxdp-compiled",
                    help="comma-separated: plain, plain-compiled (inductor), fxdp, fxdp-compiled (backend 'fxdp'), "
                         "fxdp-dpopt (fxdp + DPOptimizer with its step checks)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.warmup, args.device, vocab=args.vocab)))
        return
    results = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--device", args.device, "--vocab", str(args.vocab)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from tabulate import tabulate
    base = next((r for r in results if r["mode"] == "plain"), results[0])
    rows = [[r["mode"], f"{r['median_ms']:.1f}", f"{r['median_ms'] / base['median_ms']:.2f}x",
             f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / base['peak_mib']:.2f}x", f"{r['first_step_s']:.1f}"]
            for r in results]
    print(f"GPT-2 4x256, T=128, B=16, vocab {args.vocab} on {args.device} ({torch.get_num_threads()} threads)")
    print(tabulate(rows, headers=["mode", "step ms (median)", "vs plain eager", "peak MiB", "vs plain eager",
                                  "first step s (incl. compile)"]))


if __name__ == "__main__":
    main()
