"""Sharded DP fine-tuning with FSDP2 (``fully_shard``) and fxdp.DPDistributed: GPT-2 built from config.

CPU, 2 processes (gloo):

    torchrun --nproc_per_node=2 examples/fsdp_train.py [--epsilon 3] [--epochs 2] [--style block-wise]

GPUs (NCCL, one process per GPU; bf16 layers with fp32 private gradients):

    torchrun --nproc_per_node=<number of GPUs> examples/fsdp_train.py --mixed-precision

Every rank builds the same model from the same seed and shards it as FSDP2 users do
(``fully_shard`` on every transformer block, then on the root); ``DPDistributed.make_private``
sees that the model is sharded and returns a :class:`fxdp.distributed.ShardedDPOptimizer`. Each
rank clips its own examples in its one backward pass; at the step every rank adds N(0, σ²R²) to
the rows it owns, the clipped sums are reduce-scattered into each rank's shard, divided by the
GLOBAL expected batch size (``--batch-size``), and the inner AdamW steps each rank's shard. The
data is a synthetic next-token task (a noisy cyclic sequence), so nothing is downloaded.
``--max-steps`` stops early (a smoke test); ``--checkpoint DIR`` saves a torch.distributed.checkpoint
(sharded) checkpoint with the accountant, sampler and noise states at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxdp  # noqa: E402
from examples.ddp_train import setup_process_group  # noqa: E402


def synthetic_text(n: int, T: int, vocab: int, seed: int):
    """Sequences t, t+1, t+2, ... (mod vocab) with 10 % random tokens: learnable, public, no download."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % vocab
    noise = torch.rand(n, T, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab, (n, T), generator=g), ids)


def build_model(seed: int, vocab: int, T: int, layers: int, d: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab, n_positions=T, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]  # every sequence has T tokens: the mean is per-sample
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num-sequences", type=int, default=1024, help="training sequences")
    ap.add_argument("--batch-size", type=int, default=64, help="GLOBAL expected logical batch size")
    ap.add_argument("--style", default="all-layer")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--mixed-precision", action="store_true", help="bf16 params in the layers, fp32 reduce")
    ap.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=False")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--checkpoint", default=None, help="directory of a DCP checkpoint written at the end")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = setup_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab, T = 64, 16
    train_ids = synthetic_text(args.num_sequences, T, vocab, args.seed)

    model = build_model(args.seed, vocab, T, args.layers, args.hidden_size).to(device)  # the same model on every rank
    shard_kwargs = dict(reshard_after_forward=not args.no_reshard)
    if args.mixed_precision:
        shard_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, **shard_kwargs)
    fully_shard(model, **shard_kwargs)
    torch.manual_seed(args.seed + rank)

    dp = fxdp.DPDistributed(accountant="prv")
    model, optimizer, loader = dp.make_private_with_epsilon(
        module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
        data_loader=DataLoader(TensorDataset(train_ids), batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, style=args.style)
    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), FSDP2, σ = {optimizer.noise_multiplier:.3f}, "
              f"q = {dp.sample_rate:.4f}, global expected batch {dp.expected_batch_size:.1f}, "
              f"{len(loader)} steps per epoch", flush=True)
    t0, steps, loss = time.time(), 0, torch.tensor(float("nan"))
    for epoch in range(args.epochs):
        loader.batch_sampler.set_epoch(epoch)
        for (ids,) in loader:
            optimizer.zero_grad()
            loss = lm_loss(model, ids.to(device))
            loss.backward()
            optimizer.step()
            steps += 1
            if args.max_steps is not None and steps >= args.max_steps:
                break
        if rank == 0:
            print(f"epoch {epoch + 1}: local loss {loss.item():.3f}, ε = {dp.get_epsilon(args.delta):.3f}",
                  flush=True)
        if args.max_steps is not None and steps >= args.max_steps:
            break

    eps = dp.get_epsilon(args.delta)
    every = [None] * world
    dist.all_gather_object(every, eps)
    if args.checkpoint:
        dp.save_checkpoint(path=args.checkpoint, module=model, optimizer=optimizer)
    if rank == 0:
        print(f"steps {steps}, ε = {eps:.4f} at δ = {args.delta:g} (identical on all {world} ranks: "
              f"{all(e == eps for e in every)}), {time.time() - t0:.1f} s", flush=True)
    dist.destroy_process_group()
    return eps


if __name__ == "__main__":
    main()
