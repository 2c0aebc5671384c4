"""Benchmark: one training step of GPT-2 (4 layers, d=256, T=128, B=16),
non-private (eager and inductor) vs fxdp.privatize (eager and backend "fxdp"), and the peers:
Opacus 1.6 (hooks and ghost clipping) and per-sample gradients by torch.func (vmap over grad),
printed as ratios to non-private eager and to non-private compiled.

    python examples/benchmark.py [--steps 10] [--warmup 3] [--rounds 2] [--device cpu|cuda] [--vocab 5000]
    python examples/benchmark.py --profile plain,fxdp-compiled   # per-phase breakdown (examples/profile_step.py)

Each configuration runs in a fresh process; ``--rounds`` repeats the whole set, interleaved, and
reports the median over rounds of each process's median step time after ``--warmup`` steps.

Memory, per training step after the warm-up (compilation and the analysis are not counted): on CUDA
the peak allocated during a step (``max_memory_allocated`` after ``reset_peak_memory_stats``) and the
same above what is allocated before the step; on the CPU the process's peak RSS during a step (the
peak is reset before each step through ``/proc/self/clear_refs``; glibc's mmap threshold is fixed so
that freed tensors leave the RSS) and that peak above the RSS before the step (the step's working
memory: activations, gradients, and fxdp's per-sample bookkeeping) -- measured on the CPU in a
separate process per configuration (the fixed threshold slows every step), the timings in processes
with the default allocator.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(device, dtype=torch.float32, vocab=50257, tied=True):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=vocab, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype)


def lm_loss(logits, ids):
    """Per-sample loss (mean over each sample's tokens), averaged over the batch."""
    return _lm(logits[:, :-1], ids)


MODES = ("plain", "plain-compiled", "fxdp", "fxdp-compiled", "opacus-hooks", "opacus-ghost", "vmap")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _rss_mib(field: str = "VmRSS:") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _opacus_step(model, mode, ids, B):
    """Opacus 1.6: make_private on a fixed batch, noise off; one optimizer step (clip, sum, noise 0).
    Opacus refuses tied weights with ghost clipping, so its rows use an untied GPT-2 (lm_head its own
    V x d weight: a little more work than the tied model of the other rows)."""
    import torch.nn as nn
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(ids.cpu()), batch_size=B)
    engine = PrivacyEngine(accountant="rdp")
    out = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
                              max_grad_norm=1.0, poisson_sampling=False, criterion=nn.CrossEntropyLoss(),
                              grad_sample_mode="ghost" if mode == "opacus-ghost" else "hooks")
    module, opt = out[0], out[1]
    criterion = out[2] if mode == "opacus-ghost" else None

    positions = torch.arange(ids.shape[1], device=ids.device).repeat(B, 1)  # (1, T) or expanded ids break Opacus

    def step():
        logits = module(ids, position_ids=positions).logits[:, :-1]
        if criterion is not None:  # per-sequence mean of token losses, as lm_loss
            loss = criterion(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), shape=logits.shape)
        else:
            loss = _lm(logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _lm(lg, ids):
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1).mean()


def _vmap_step(model, ids, B, R=1.0):
    """Per-sample gradients by torch.func (vmap over grad), all-layer clipping, clipped sum."""
    from torch.func import functional_call, grad, vmap
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=1e-3)

    def one(ps, x):
        x = x.unsqueeze(0)
        return _lm(functional_call(model, ps, (x,)).logits[:, :-1], x)

    per_sample = vmap(grad(one), in_dims=(None, 0), randomness="different")  # dropout per sample

    def step():
        g = per_sample({n: p.detach() for n, p in params.items()}, ids)
        norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
        c = (R / (norms + 1e-6)).clamp(max=1.0)
        for n, p in params.items():
            p.grad = torch.einsum("b,b...->...", c, g[n]) / B
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def make_step(mode, device, B=16, T=128, vocab=50257):
    """The training step of one configuration (a closure over a fresh model and a fixed batch)."""
    import fxdp
    model = build(device, vocab=vocab, tied=not mode.startswith("opacus"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g).to(device)
    if mode.startswith("opacus"):
        return _opacus_step(model, mode, ids, B)
    if mode == "vmap":
        return _vmap_step(model, ids, B)
    if mode.startswith("fxdp"):
        fxdp.privatize(model, style="all-layer", max_grad_norm=1.0)
    fwd = model
    if mode.endswith("compiled"):
        fwd = torch.compile(model, backend="fxdp" if mode.startswith("fxdp") else "inductor")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        loss = lm_loss(fwd(ids).logits, ids)
        loss.backward()
        if mode.startswith("fxdp"):
            for p in params:
                p.grad = p.private_grad / B
                del p.private_grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def run_one(mode, steps, warmup, device, B=16, T=128, vocab=50257):
    step = make_step(mode, device, B, T, vocab)
    t_compile = time.perf_counter()
    step()
    t_compile = time.perf_counter() - t_compile
    for _ in range(warmup - 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    times, peaks, above = [], [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = _rss_mib()
            _reset_peak()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib("VmHWM:")
        peaks.append(peak)
        above.append(peak - before)
    return {"mode": mode, "median_ms": 1000 * statistics.median(times), "peak_mib": max(peaks),
            "step_mib": max(above), "first_step_s": t_compile}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="repeat the set of configurations, interleaved")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--profile", metavar="MODES", help="per-phase breakdown of these configurations instead "
                    "(examples/profile_step.py)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        from examples import profile_step
        sys.argv = [profile_step.__file__, "--modes", args.profile, "--vocab", str(args.vocab)]
        profile_step.main()
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.warmup, args.device, vocab=args.vocab)))
        return
    runs, memory = {}, {}
    def one(mode, memory: bool):
        """One fresh process: times its steps, or (``memory``, on the CPU) measures them under a fixed mmap
        threshold, which makes every large allocation a system call and would distort the timings."""
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0") if memory else None
        steps = min(args.steps, 3) if memory else args.steps
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(steps), "--warmup",
                              str(args.warmup), "--device", args.device, "--vocab", str(args.vocab)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    separate_memory = args.device != "cuda"
    for r in range(args.rounds):
        for mode in args.modes.split(","):
            timed = one(mode, memory=False)
            if timed is None:
                continue
            if separate_memory and r == 0:
                measured = one(mode, memory=True) or {"peak_mib": float("nan"), "step_mib": float("nan")}
                memory[mode] = {k: measured[k] for k in ("peak_mib", "step_mib")}
            if separate_memory:
                timed.update(memory[mode])
            runs.setdefault(mode, []).append(timed)
    keys = ("median_ms", "peak_mib", "step_mib", "first_step_s")
    results = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    from tabulate import tabulate
    base = results.get("plain") or next(iter(results.values()))
    comp = results.get("plain-compiled") or base
    rows = [[m, f"{r['median_ms']:.1f}", f"{r['median_ms'] / base['median_ms']:.2f}x",
             f"{r['median_ms'] / comp['median_ms']:.2f}x", f"{r['peak_mib']:.0f}",
             f"{r['peak_mib'] / comp['peak_mib']:.2f}x", f"{r['step_mib']:.0f}",
             f"{r['step_mib'] / base['step_mib']:.2f}x", f"{r['step_mib'] / comp['step_mib']:.2f}x",
             f"{r['first_step_s']:.1f}"] for m, r in results.items()]
    print(f"GPT-2 4x256, T=128, B=16, vocab {args.vocab} on {args.device} ({torch.get_num_threads()} threads), "
          f"median of {args.rounds} interleaved rounds")
    print(tabulate(rows, headers=["mode", "step ms", "vs plain eager", "vs plain compiled", "peak MiB in a step",
                                  "vs plain compiled", "step memory MiB", "vs plain eager", "vs plain compiled",
                                  "first step s (incl. compile)"]))
    if args.rounds > 1 and "plain-compiled" in runs:
        ref = runs["plain-compiled"]
        print("step time vs plain compiled in each round (the spread between rounds is this machine's noise):")
        for m, rs in runs.items():
            per_round = [f"{a['median_ms'] / b['median_ms']:.2f}x" for a, b in zip(rs, ref)]
            print(f"  {m:16s} " + " ".join(per_round))
    print("peak: the process's peak during a training step (CPU: RSS, libraries included; CUDA: allocated); "
          "step memory: that peak above the memory before the step.")


if __name__ == "__main__":
    main()
