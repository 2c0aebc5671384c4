"""Per-rank memory of DP training under FSDP2: fxdp vs non-private FSDP2 vs Opacus ``ghost_fsdp``.

    torchrun --nproc_per_node=W examples/fsdp_memory.py --impl fxdp|plain|opacus [--blocks 8 --width 1024]

A stack of residual Linear+LayerNorm blocks (untied: Opacus' FSDP mode refuses tied parameters),
each block ``fully_shard``-ed, then the root (Opacus: its own ``FSDP2Wrapper``), AdamW, a few steps of
a global batch of ``--batch-size`` sequences. Rank 0 prints one line per run: the local bytes of
parameters, gradients and optimizer states (exact, from the local shards: they should scale ~1/W),
and the peak resident memory of the process above what it used before the model was built
(``VmHWM - VmRSS`` from /proc/self/status, the largest over the ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxdp  # noqa: E402
from examples.models import ResidualMLP  # noqa: E402


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", choices=["fxdp", "plain", "opacus"], default="fxdp")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32, help="global expected batch size")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = 16 * args.batch_size
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, args.seq_len, 64, generator=g), torch.randint(0, 10, (n,), generator=g))
    base_rss = status_mib("VmRSS")
    torch.manual_seed(0)
    model = ResidualMLP(d_in=64, d=args.width, blocks=args.blocks, classes=10, pool_dim=1)
    from torch.distributed.fsdp import fully_shard
    if args.impl == "opacus":
        from opacus import PrivacyEngine
        from opacus.utils.fsdp_utils import FSDP2Wrapper
        model = FSDP2Wrapper(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = PrivacyEngine()
        model, opt, criterion, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=args.batch_size),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost_fsdp", criterion=nn.CrossEntropyLoss(),
            poisson_sampling=True)
    else:
        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(*[t[rank::world] for t in data.tensors]), batch_size=args.batch_size // world)
        if args.impl == "fxdp":
            dp = fxdp.DPDistributed()
            model, opt, loader = dp.make_private(module=model, optimizer=opt,
                                                 data_loader=DataLoader(data, batch_size=args.batch_size),
                                                 noise_multiplier=1.0, max_grad_norm=1.0, style="block-wise")
    steps = 0
    for x, y in loader:
        opt.zero_grad()
        if args.impl == "opacus":
            loss = criterion(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        steps += 1
        if steps == args.steps:
            break
    params = list(model.parameters())
    inner = getattr(opt, "original_optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values()]
    row = {"impl": args.impl, "world": world, "params_MiB": local_bytes(params) / 2 ** 20,
           "grads_MiB": local_bytes(p.grad for p in params if p.grad is not None) / 2 ** 20,
           "optimizer_MiB": local_bytes(state) / 2 ** 20, "peak_above_base_MiB": status_mib("VmHWM") - base_rss}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        worst = {k: (max(r[k] for r in rows) if isinstance(row[k], float) else row[k]) for k in row}
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in worst.items()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
