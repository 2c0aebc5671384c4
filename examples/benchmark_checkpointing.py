"""Peak memory of one training step of a GPT-2-ish model with and without activation checkpointing
(HF ``gradient_checkpointing_enable()``), non-private vs eager ``fxdp.privatize``, printed as ratios to
the non-private step without checkpointing measured in the same run.

    python examples/benchmark_checkpointing.py [--layers 8] [--d 256] [--T 256] [--B 16] [--device cpu|cuda]
                                               [--reentrant] [--steps 2]

Each configuration runs in a fresh process. After one warm-up step (fxdp analyses the input structure
there), the peak of the measured steps is: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
allocated before the step; on CPU the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident set before the step, with glibc told to map large blocks
and return them at free (``MALLOC_MMAP_THRESHOLD_``), so that the resident set follows the live tensors. fxdp's bookkeeping (BK) clipping
needs each tapped op's input and output gradient until the end of backward, so with checkpointing its
saving is the activations *between* the taps (attention scores and probabilities, the MLP's pre-activation,
norm statistics), not the taps' operands.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = ["plain", "plain+ckpt", "fxdp", "fxdp+ckpt"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.d, n_head=max(1, args.d // 64), n_positions=args.T,
                     vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(args.device)


def lm_loss(logits, ids):
    """Each sample's mean next-token loss, averaged over the batch (a per-sample loss)."""
    logits = logits[:, :-1]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1).mean()


def run_one(config: str, args) -> dict:
    import fxdp
    model = build(args).train()
    if config.endswith("+ckpt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": args.reentrant})
    if config.startswith("fxdp"):
        fxdp.privatize(model, max_grad_norm=1.0)
    ids = torch.randint(0, args.vocab, (args.B, args.T), generator=torch.Generator().manual_seed(1)).to(args.device)
    cuda = args.device.startswith("cuda")

    def step():
        loss = lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "private_grad"):
                del p.private_grad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()  # warm-up (fxdp's analysis of this input structure)
        peaks, times = [], []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                base = _rss_kib("VmRSS") * 1024
                if not _reset_peak_rss():
                    raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); run on CUDA")
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = _rss_kib("VmHWM") * 1024 - base
            times.append(time.perf_counter() - t0)
            peaks.append(peak)
    return {"config": config, "peak_bytes": min(peaks), "step_s": min(times),
            "measure": "cuda max_memory_allocated" if cuda else "peak RSS (VmHWM) delta"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reentrant", action="store_true", help="use_reentrant=True checkpointing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    rows = {}
    for config in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", config] + [
            a for a in sys.argv[1:] if a != "--child"]
        # glibc: large blocks mmap'd and returned at free, so that the resident set follows live tensors
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows[config] = json.loads(out.strip().splitlines()[-1])
    flavour = "reentrant" if args.reentrant else "non-reentrant"
    print(f"GPT-2 {args.layers} layers, d={args.d}, T={args.T}, B={args.B}, vocab={args.vocab}, {args.device}, "
          f"{flavour} checkpointing; peak = {rows['plain']['measure']} of one step")
    ref = rows["plain"]["peak_bytes"]
    print(f"{'config':<12} {'peak MiB':>10} {'x plain':>8} {'step s':>8}")
    for config in CONFIGS:
        r = rows[config]
        print(f"{config:<12} {r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / ref:>8.2f} {r['step_s']:>8.3f}")
    saving = {k: 1 - rows[k + "+ckpt"]["peak_bytes"] / rows[k]["peak_bytes"] for k in ("plain", "fxdp")}
    print(f"checkpointing saves {100 * saving['plain']:.0f}% of the peak without DP, {100 * saving['fxdp']:.0f}% "
          "with fxdp")


if __name__ == "__main__":
    main()
