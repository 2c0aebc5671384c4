"""DPTrainer under a multi-process launch (``torchrun`` / ``accelerate launch``): data parallelism the fxdp way.

    torchrun --nproc_per_node=2 train.py        # train.py builds and trains DPTrainer as in one process

With W > 1 processes the Trainer has accelerate wrap the model in
``DistributedDataParallel``, whose reducer averages ``p.grad`` during backward. fxdp's
clipped per-sample sums are written to ``p.private_grad`` at the end of backward: DDP
would synchronise nothing private, and noise drawn on every rank would be added W times.
DPTrainer therefore runs what :class:`fxdp.DPDistributed` runs, inside the Trainer's loop:

- model: prepared by accelerate WITHOUT the DDP wrapper (``prepare_model(...,
  evaluation_mode=True)``: device placement and autocast only); a DDP-wrapped model that
  reaches the training step is refused. At setup every rank checks that the others built the
  same model, DP configuration, optimizer and sampling (:func:`check_same_setup`: a mismatch
  raises ``RankMismatchError`` on every rank instead of hanging), then rank 0's parameters and
  buffers are broadcast;
- sampling: :class:`~fxdp.distributed.DistributedPoissonSampler` -- a public seeded
  permutation gives every example of the N to exactly one rank, and each rank selects each of
  its examples independently with probability q = L / N (L = per_device_train_batch_size ×
  gradient_accumulation_steps × W) with its own generator
  (:func:`~fxdp.distributed.sampler.rank_generator`: seeded from ``data_seed``/``seed`` mixed
  with the rank, or OS entropy in secure mode); ceil(N / L) logical batches per epoch on every
  rank, empty shares included; each rank's share is split into the GA micro-batches
  (:class:`~fxdp.integrations.hf_data.MicroBatchSampler`). The shards do not change between
  epochs (they are public; Poisson selection is fresh at every step);
- optimizer: :class:`~fxdp.distributed.DistributedDPOptimizer` -- the micro-batches' clipped
  sums accumulate locally; at the optimizer step rank 0 adds the noise N(0, σ²R²) once to its
  share, the shares are summed in bucketed all-reduces (``ddp_bucket_cap_mb``, default 25 MiB)
  and every rank divides by L and applies the same update;
- accounting: every rank charges each optimizer step once at the global q, so ε (logged at
  each logging step) is the same number on every rank, with no communication;
- checkpoints: rank 0 writes ``fxdp_privacy.pt`` with every rank's sampler generator state
  (gathered, :func:`sampler_states`); each rank restores its own. A resume on another world
  size is refused (the ranks' sampling streams cannot be re-split without replaying draws).

Refused before training, with what to do instead (:func:`refuse_unsupported_parallelism`):
FSDP, DeepSpeed and tensor/context parallelism through TrainingArguments or an accelerate
config, ``nn.DataParallel`` (several GPUs in one process), and a process group of several
ranks that the Trainer does not see (no torchrun environment: each rank would train alone).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from fxdp.core.errors import PrivacyError
from fxdp.core.version import VERSION
from fxdp.distributed.agreement import agree, all_gather_bytes, broadcast_state, check_same_setup, control_device
from fxdp.distributed.optimizer import DistributedDPOptimizer
from fxdp.distributed.sampler import DistributedPoissonSampler, rank_generator
from fxdp.integrations.hf_data import MicroBatchSampler

_ALTERNATIVE = ("Launch plain data parallelism (torchrun / accelerate launch without FSDP or DeepSpeed): DPTrainer "
                "then sums the clipped gradients across ranks itself. For a sharded model, use fxdp.DPDistributed "
                "with FSDP2 (torch.distributed.fsdp.fully_shard) in a hand-written loop.")


def is_multi_process(args) -> bool:
    return int(args.world_size) > 1


def refuse_unsupported_parallelism(args, trainer=None) -> None:
    """PrivacyError for sharding / DeepSpeed / tensor parallelism / DataParallel (module docstring);
    ``trainer`` (after the accelerator exists) also catches them when set by an accelerate config."""
    what = None
    if getattr(args, "fsdp", None) or getattr(args, "fsdp_plugin_args", None) is not None:
        what = "FSDP (TrainingArguments(fsdp=...))"
    elif getattr(args, "deepspeed", None):
        what = "DeepSpeed (TrainingArguments(deepspeed=...))"
    elif getattr(args, "parallelism_config", None) is not None:
        what = "a ParallelismConfig (tensor / context / sharded data parallelism)"
    elif trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        what = "FSDP (from the accelerate configuration)"
    elif trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
        what = "DeepSpeed (from the accelerate configuration)"
    elif trainer is not None and (getattr(trainer.model, "tp_size", None) or 1) > 1:
        what = "a tensor-parallel model (tp_plan)"
    if what is not None:
        raise PrivacyError(f"fxdp: DPTrainer does not support {what}: these shard or reduce p.grad inside backward "
                           "(reduce-scatter / ZeRO partitions), while fxdp's clipped per-sample sums are in "
                           f"p.private_grad and must be noised once before they are combined. {_ALTERNATIVE}")
    if (trainer is not None and not is_multi_process(args) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        raise PrivacyError(f"fxdp: torch.distributed has {dist.get_world_size()} ranks but the Trainer runs as a "
                           "single process (no RANK / WORLD_SIZE / LOCAL_RANK in the environment): every rank would "
                           "train its own model on the whole data set, each spending the full ε (releasing them all "
                           "costs more than the accountant reports). Launch with torchrun or accelerate launch, so "
                           "that the ranks share each logical batch.")
    if trainer is not None and int(args.n_gpu) > 1:
        raise PrivacyError("fxdp: DPTrainer does not run nn.DataParallel (several GPUs in one process: it replicates "
                           "the model and sums p.grad, not fxdp's private gradients). Launch one process per GPU: "
                           "torchrun --nproc_per_node=<GPUs> train.py.")


def refuse_ddp_wrapped(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise PrivacyError("fxdp: the training model is wrapped in DistributedDataParallel: its reducer averages "
                           "p.grad, not fxdp's clipped p.private_grad, so the ranks would not combine the private "
                           "gradients (or would combine unclipped ones). DPTrainer syncs the private gradients "
                           "itself; do not wrap the model (or override _wrap_model) yourself.")


def rank_sampler_generator(seed: int, secure: bool) -> torch.Generator:
    """This rank's Poisson selection generator: ``seed`` mixed with the rank (OS entropy in secure mode)."""
    return rank_generator(dist.get_rank(), secure=secure, base=torch.Generator().manual_seed(int(seed)))


def distributed_sampler(args, num_samples: int, sample_rate: float, steps_per_epoch: int,
                        generator: torch.Generator) -> MicroBatchSampler:
    """This rank's micro-batches of its share of each global Poisson batch (the shards: a permutation
    seeded by ``seed``, public and the same on every rank)."""
    logical = DistributedPoissonSampler(total_size=num_samples, sample_rate=sample_rate, generator=generator,
                                        shuffle_seed=int(args.seed), steps=steps_per_epoch,
                                        num_replicas=dist.get_world_size(), rank=dist.get_rank())
    return MicroBatchSampler(logical, args.gradient_accumulation_steps)


def distributed_optimizer(inner, sigma: float, max_grad_norm: float, expected_batch_size: float, *, secure: bool,
                          bucket_cap_mb: Optional[float]) -> DistributedDPOptimizer:
    return DistributedDPOptimizer(inner, sigma, max_grad_norm, expected_batch_size, "mean", secure_mode=secure,
                                  bucket_cap_mb=25.0 if bucket_cap_mb is None else float(bucket_cap_mb))


def agree_and_broadcast(model: nn.Module, dp_optimizer, privacy_args, sampling, budget,
                        error: Optional[BaseException]) -> None:
    """Collective: every rank raises if one failed to build its optimizer (``error``: that rank raises it,
    the others PeerRankError) or if the ranks' setups differ (RankMismatchError); then rank 0's
    parameters and buffers overwrite every rank's (module docstring)."""
    agree(error, "DPTrainer optimizer setup (σ calibration, optimizer)")
    optimizer = dp_optimizer.original_optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({k: v for k, v in g.items() if k != "params"}, [names.get(id(p), "?") for p in g["params"]])
              for g in optimizer.param_groups]
    q, logical, n = sampling
    check_same_setup({
        "world size": str(dist.get_world_size()),
        "fxdp version": VERSION,
        "model parameters": repr([(n_, tuple(p.shape), str(p.dtype), p.requires_grad, p.device.type)
                                  for n_, p in model.named_parameters()]),
        "model buffers": repr([(n_, tuple(b.shape), str(b.dtype)) for n_, b in model.named_buffers()]),
        "privacy arguments": repr(privacy_args),
        "optimizer": f"{type(optimizer).__name__} {groups!r}",
        "noise and sampling": f"sigma={budget.sigma!r} delta={budget.delta!r} sample_rate={q!r} "
                              f"logical_batch={logical} dataset_size={n} steps={budget.steps}",
    })
    broadcast_state(list(model.parameters()) + list(model.buffers()), src=0)


def sampler_states(generator: Optional[torch.Generator], secure: bool) -> Optional[List[torch.Tensor]]:
    """Collective: every rank's sampler generator state, in rank order (None in secure mode)."""
    mine = torch.empty(0, dtype=torch.uint8) if secure or generator is None else generator.get_state()
    states = all_gather_bytes(mine, None)
    return None if secure or generator is None else states


def sum_over_ranks(counts: List[int]) -> List[int]:
    """Collective: ``counts`` summed over the ranks."""
    t = torch.tensor(counts, dtype=torch.int64, device=control_device())
    dist.all_reduce(t)
    return [int(v) for v in t.cpu()]


__all__ = ["agree_and_broadcast", "distributed_optimizer", "distributed_sampler", "is_multi_process",
           "rank_sampler_generator", "refuse_ddp_wrapped", "refuse_unsupported_parallelism", "sampler_states",
           "sum_over_ranks"]
