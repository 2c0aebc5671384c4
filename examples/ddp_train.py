"""Data-parallel DP-SGD with fxdp.DPDistributed on scikit-learn's digits.

CPU, 2 processes (gloo):

    torchrun --nproc_per_node=2 examples/ddp_train.py [--epsilon 3] [--epochs 15]

GPUs (NCCL, one process per GPU; the same code path):

    torchrun --nproc_per_node=<number of GPUs> examples/ddp_train.py

Every rank builds the same model (not wrapped in DistributedDataParallel),
``DPDistributed.make_private`` privatizes it, checks that the ranks agree,
broadcasts rank 0's weights and returns a loader that yields this rank's share
of each Poisson-sampled global batch (``--batch-size`` is the GLOBAL expected
batch size). Each step sums the ranks' clipped gradients, adds the noise once
and applies the same update everywhere. Rank 0 prints the loss, the test
accuracy and ε, which every rank computes identically (checked at the end).
``--compile`` runs the model through ``torch.compile(backend="fxdp")``;
``--max-steps`` stops early (a smoke test); ``--checkpoint PATH`` saves a
checkpoint from rank 0 at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxdp  # noqa: E402
from examples.dp_digits import load_digits_split as digits, make_model  # noqa: E402


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device) -> float:
    x, y = data.tensors
    return float((model(x.to(device)).argmax(1).cpu() == y).float().mean())


def setup_process_group():
    """NCCL with one GPU per process when CUDA is available, gloo on CPU otherwise."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64, help="GLOBAL expected logical batch size")
    ap.add_argument("--physical-batch-size", type=int, default=None, help="micro-batch size on each rank")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile(backend='fxdp', compiler aot_eager)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = setup_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed + rank)
    train_set, test_set = digits(args.seed)
    model = fxdp.privatize(make_model(args.seed).to(device), max_grad_norm=args.max_grad_norm)
    run = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}) if args.compile else model

    dp = fxdp.DPDistributed(accountant="prv")
    _, optimizer, loader = dp.make_private_with_epsilon(
        module=run, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
        data_loader=DataLoader(train_set, batch_size=args.batch_size), target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), σ = {optimizer.noise_multiplier:.3f}, q = {dp.sample_rate:.4f}, "
              f"global expected batch {dp.expected_batch_size:.1f}, {len(loader)} steps per epoch", flush=True)
    t0, steps = time.time(), 0
    for epoch in range(args.epochs):
        loader.batch_sampler.set_epoch(epoch)
        manager = (fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=args.physical_batch_size,
                                           optimizer=optimizer)
                   if args.physical_batch_size else contextlib.nullcontext(loader))
        with manager as batches:
            for x, y in batches:
                optimizer.zero_grad()
                loss = F.cross_entropy(run(x.to(device)), y.to(device))
                loss.backward()
                before = optimizer.steps_taken
                optimizer.step()
                steps += optimizer.steps_taken - before
                if args.max_steps is not None and steps >= args.max_steps:
                    break
        if rank == 0:
            print(f"epoch {epoch + 1}: local loss {loss.item():.3f}, test accuracy "
                  f"{accuracy(model, test_set, device):.3f}, ε = {dp.get_epsilon(args.delta):.3f}", flush=True)
        if args.max_steps is not None and steps >= args.max_steps:
            break

    eps = dp.get_epsilon(args.delta)
    every = [None] * world
    dist.all_gather_object(every, eps)
    dp.verify_replicas()
    if args.checkpoint:
        dp.save_checkpoint(path=args.checkpoint, module=model, optimizer=optimizer)
    if rank == 0:
        print(f"steps {steps}, ε = {eps:.4f} at δ = {args.delta:g} (identical on all {world} ranks: "
              f"{all(e == eps for e in every)}), test accuracy {accuracy(model, test_set, device):.3f}, "
              f"{time.time() - t0:.1f} s", flush=True)
    dist.destroy_process_group()
    return eps


if __name__ == "__main__":
    main()
