"""Data-parallel DP-SGD over torch.distributed: W processes, one noised update per global batch.

Usage (the same code on every rank; launch with ``torchrun --nproc_per_node=W train.py``)::

    import torch, torch.distributed as dist, fxdp
    dist.init_process_group("gloo")            # CPU; "nccl" on GPUs (then torch.cuda.set_device(local_rank))
    model = Net().to(device)                   # the same model on every rank -- NOT wrapped in DDP
    dp = fxdp.DPDistributed(accountant="prv")
    model, optimizer, loader = dp.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(train_set, batch_size=256),   # 256 = GLOBAL expected batch size
        noise_multiplier=1.0, max_grad_norm=1.0)
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)  # optional: a new (public) sharding each epoch
        for x, y in loader:                    # this rank's share of the global Poisson batch
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()                   # collective: sum, noise once, same update everywhere
    print(dp.get_epsilon(delta=1e-5))          # identical on every rank

What happens:

- ``make_private`` privatizes the model on every rank (``fxdp.privatize``; a
  model privatized beforehand, or compiled with
  ``torch.compile(model, backend="fxdp")`` after privatizing, is accepted as is),
  checks that every rank has the same model structure, clipping configuration,
  optimizer, noise and sampling arguments and world size -- ranks that
  disagree all raise :class:`RankMismatchError` naming the differences,
  instead of hanging -- and broadcasts rank 0's parameters and buffers.
- Sampling: each example of the global data set (N examples) lives on exactly
  one rank (a public seeded permutation, sharded) and is drawn into each global
  batch independently with probability q = ``sample_rate`` (default
  ``1 / len(data_loader)``), by a generator that is independent on every rank.
  Empty local batches are handed out too, so all ranks step together. The
  accountant charges every step at q, for the global data set.
- Each rank clips its own examples (bookkeeping, one backward pass); at the
  step, the ranks sum their clipped sums with bucketed asynchronous
  all-reduces, rank 0 adds Gaussian noise of std σ·R once to the sum, and
  every rank divides by the global expected batch size q·N and applies the same
  update (:class:`DistributedDPOptimizer`). With the noise off, W ranks give the
  parameters of one process on the same global batches.
- Micro-batches (``fxdp.BatchMemoryManager(data_loader=loader, ...)``)
  accumulate locally; the ranks communicate once per logical batch.
- ``dp.save_checkpoint`` / ``dp.load_checkpoint`` (collective): rank 0 writes and
  reads the file; a resume on the same world size continues exactly.

Why no DistributedDataParallel: fxdp's clipped gradients are produced at the end
of backward in ``p.private_grad``; autograd never produces ``p.grad``, so DDP's
reducer would wait for gradients that never come. A DDP-wrapped model is
refused; pass the plain model. The reduction cannot overlap the backward pass
itself (clip factors need every layer's per-sample norm first), so the
buckets overlap with each other and with rank 0's noise draws instead.

Trust model: the ranks are one party (each holds raw data); DP protects what
is released -- the model after the noised updates -- not one rank's clipped
sums from another. A rank that dies or fails outside fxdp's calls leaves the
others waiting until the process group's timeout (torchrun stops the job when
a worker fails).

FSDP2: a model sharded with ``torch.distributed.fsdp.fully_shard`` (before or
after ``fxdp.privatize``) is accepted by the same ``make_private``; it then
returns a :class:`ShardedDPOptimizer`: the clipped sums are reduce-scattered
into each rank's shard at the end of backward, each rank noises its own shard
from an independent stream, and checkpoints go through
torch.distributed.checkpoint (:mod:`fxdp.distributed.fsdp`,
:mod:`fxdp.distributed.fsdp_optimizer`, :mod:`fxdp.distributed.fsdp_checkpoint`).

Not supported yet: tensor or pipeline parallelism, HSDP, FSDP2 CPU offload,
torch.compile of an FSDP2 model's blocks (all refused with a message),
non-Poisson sampling across ranks, changing the world size with an exact resume
(a checkpoint loads on another world size with fresh sampling streams and a
warning; an FSDP2 checkpoint is refused there).
"""
from fxdp.distributed.agreement import PeerRankError, RankMismatchError
from fxdp.distributed.engine import DPDistributed
from fxdp.distributed.optimizer import DistributedDPOptimizer
from fxdp.distributed.fsdp import ShardingError
from fxdp.distributed.fsdp_optimizer import ShardedDPOptimizer
from fxdp.distributed.sampler import DistributedPoissonDataLoader, DistributedPoissonSampler

__all__ = ["DPDistributed", "DistributedDPOptimizer", "ShardedDPOptimizer", "ShardingError", "DistributedPoissonSampler", "DistributedPoissonDataLoader",
           "RankMismatchError", "PeerRankError"]
