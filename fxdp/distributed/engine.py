"""DPDistributed: Opacus-style entry point for data-parallel DP training (see :mod:`fxdp.distributed`)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

from fxdp.core.errors import PrivacyConfigError
from fxdp.core.version import VERSION
from fxdp.core.identity import set_view
from fxdp.engine import install as api
from fxdp.training.accounting import PoissonCharge, get_noise_multiplier
from fxdp.training.adaptive import check_clipping_option, from_clipping_option
from fxdp.training.samplers import visited_indices
from fxdp.distributed import checkpoint as distributed_checkpoint
from fxdp.distributed import fsdp_checkpoint
from fxdp.training.entry_point import PrivateTrainingEngine
from fxdp.distributed.agreement import agree, broadcast_state, check_same_setup, verify_replicas
from fxdp.distributed.optimizer import DistributedDPOptimizer
from fxdp.distributed.fsdp import (FSDPView, front_load_engine_hook, is_fully_sharded, materialize_unsharded,
                                   refuse_compiled_blocks, refuse_unsupported_fsdp)
from fxdp.distributed.fsdp_optimizer import ShardedDPOptimizer, noise_generator_for_rank
from fxdp.distributed.sampler import make_distributed_loader, rank_generator
from fxdp.training.step_check import bind_loader_check, refuse_unowned


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (the module itself otherwise)."""
    from torch._dynamo.eval_frame import OptimizedModule
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def refuse_unsupported(module: nn.Module) -> None:
    """DDP / FSDP wrappers and sharded (DTensor) parameters are refused with what to do instead."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise PrivacyConfigError(
            "fxdp: do not wrap the model in DistributedDataParallel: fxdp's private gradients are written after "
            "autograd, so DDP's reducer never sees them (it would wait for gradients that never come, or average "
            "zeros). Pass the plain model to fxdp.DPDistributed: it broadcasts the parameters and sums the clipped "
            "gradients across ranks itself.")
    from torch.distributed.fsdp import FullyShardedDataParallel
    if isinstance(module, FullyShardedDataParallel):
        raise PrivacyConfigError("fxdp: FSDP1 (FullyShardedDataParallel) is not supported; shard the model with FSDP2 "
                         "(torch.distributed.fsdp.fully_shard), which fxdp.DPDistributed supports.")
    if is_fully_sharded(module):
        return  # checked by fxdp.distributed.fsdp.refuse_unsupported_fsdp
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in module.parameters()):
        raise PrivacyConfigError("fxdp: DTensor (tensor-parallel or sharded) parameters are not supported yet; use "
                         "data parallelism with a full replica of the model on every rank.")


class DPDistributed(PrivateTrainingEngine):
    """Differentially private data-parallel training over torch.distributed (see :mod:`fxdp.distributed`).

    Checkpoints (:meth:`save_checkpoint` / :meth:`load_checkpoint`, collective: rank 0 writes model,
    optimizer with the noise stream, accountant, and every rank's sampler and RNG states; see
    :mod:`fxdp.distributed.checkpoint`) and :meth:`get_epsilon` (for the global data set, the same on
    every rank, no communication) come from :class:`~fxdp.training.entry_point.PrivateTrainingEngine`.

    Args:
        accountant: "prv" (default), "rdp" or "gdp" (``opacus.accountants``).
        secure_mode: OS-seeded noise (drawn on rank 0, re-seeded every step) and OS-seeded
            sampling generators on every rank; checkpoints then carry no generator state.
        process_group: the ranks that share each logical batch (None: the default group).

    Raises:
        ValueError: torch.distributed is not initialised.
    """

    checkpoint_io = distributed_checkpoint

    def __init__(self, accountant: str = "prv", secure_mode: bool = False, process_group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("fxdp: DPDistributed needs torch.distributed.init_process_group() first (launch with "
                             "torchrun); in a single process use fxdp.PrivacyEngine.")
        super().__init__(accountant, secure_mode)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.root = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        self.sample_rate: Optional[float] = None
        self.expected_batch_size: Optional[float] = None
        self.sharded = False

    # ------------------------------------------------------------------ setup
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm: float, sample_rate: Optional[float] = None,
                     **kwargs):
        """Privatize ``module`` (in place) on every rank and return ``(module, optimizer, data_loader)``.

        ``sample_rate`` defaults to ``1 / len(data_loader)``: with a plain loader of batch
        size B that is B/N (B is the GLOBAL expected batch size); with a loader over a
        ``DistributedSampler`` of per-rank batch size b it is W·b/N (DDP's global batch).
        Only the dataset, collate function and worker options of ``data_loader`` are kept:
        the returned loader yields this rank's share of each Poisson-sampled global batch. Keywords: ``style``, ``clipping_fn``,
        ``numerical_stability_constant``, ``block_heads``, ``batch_dim``,
        ``loss_reduction`` as in :func:`fxdp.privatize`; ``public_grads`` as in
        :class:`fxdp.DPOptimizer`; ``noise_generator`` (used on rank 0 only; refused in
        secure mode); ``shuffle_seed`` (the public permutation that shards the data set,
        default 0); ``bucket_cap_mb`` (default 25); ``batch_first``, ``rand_on_empty``.
        Collective: every rank must call it with the same arguments.

        Raises:
            RankMismatchError: the ranks disagree on the model, the DP configuration,
                the optimizer or the sampling (raised on every rank, with the differences).
            PeerRankError: the setup failed on another rank.
            ValueError: bad arguments, a DDP/FSDP-wrapped model, sharded parameters.
        """
        error, out = None, None
        try:
            out = self._prepare(module=module, optimizer=optimizer, data_loader=data_loader,
                                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                sample_rate=sample_rate, **kwargs)
        except Exception as exc:
            error = exc
        agree(error, "DPDistributed.make_private", group=self.process_group)
        inner, fields = out[3], out[4]
        check_same_setup(fields, self.process_group)
        if self.sharded:
            # FSDP2: each rank holds its own shard (fully_shard cut the same model on every rank)
            self.checkpoint_io = fsdp_checkpoint
            materialize_unsharded(inner)
            set_view(inner, FSDPView(inner, self.process_group))
            front_load_engine_hook(inner)
        else:
            broadcast_state(list(inner.parameters()) + list(inner.buffers()), src=self.root,
                            group=self.process_group)
        self.module, self.optimizer, self.data_loader = out[:3]
        return out[:3]

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                                  data_loader: DataLoader, target_epsilon: float, target_delta: float,
                                  epochs: float, max_grad_norm: float, sample_rate: Optional[float] = None,
                                  epsilon_tolerance: float = 0.01, **kwargs):
        """Like :meth:`make_private`, with σ chosen so that ``epochs`` passes over the global
        data set at the global sampling rate spend at most ``target_epsilon`` at ``target_delta``."""
        self.warn_if_budget_spent()
        q = float(sample_rate) if sample_rate is not None else 1.0 / len(data_loader)
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q,
                                     epochs=epochs, accountant=self.accountant_name,
                                     epsilon_tolerance=epsilon_tolerance)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, sample_rate=q, **kwargs)

    def _prepare(self, *, module, optimizer, data_loader, noise_multiplier, max_grad_norm, sample_rate,
                 style="all-layer", clipping_fn="abadi", numerical_stability_constant=None, block_heads=None,
                 batch_dim=None, loss_reduction="mean", noise_generator=None, public_grads="refuse",
                 shuffle_seed: int = 0, bucket_cap_mb: float = 25.0, batch_first: bool = True,
                 rand_on_empty: bool = False, poisson_sampling: bool = True, clipping: str = "flat",
                 **adaptive_options):
        if not isinstance(module, nn.Module):
            raise ValueError(f"fxdp: module must be an nn.Module, got {type(module).__name__}.")
        refuse_unsupported(module)
        inner = unwrap_compiled(module)
        refuse_unsupported(inner)
        check_clipping_option(clipping, adaptive_options)
        self.sharded = is_fully_sharded(inner)
        if self.sharded:
            if inner is not module:
                raise ValueError("fxdp: torch.compile of a whole FSDP2 model is not supported by fxdp; pass the "
                                 "fully_shard-ed model itself (eager).")
            refuse_unsupported_fsdp(inner, self.process_group)
            refuse_compiled_blocks(inner)
            if clipping != "flat":
                raise ValueError("fxdp: adaptive clipping is not supported with FSDP2 (fully_shard) yet: the "
                                 "unclipped count would not be summed across the sharded ranks. Use a fixed "
                                 "max_grad_norm, or DDP-style DPDistributed without fully_shard.")
        if not poisson_sampling:
            raise ValueError("fxdp: DPDistributed samples global batches with Poisson sampling only "
                             "(poisson_sampling=False is not supported across ranks).")
        if not isinstance(data_loader, DataLoader) or isinstance(data_loader.dataset, IterableDataset):
            raise ValueError("fxdp: data_loader must be a torch DataLoader over a map-style dataset.")
        if isinstance(optimizer, DistributedDPOptimizer) or hasattr(optimizer, "original_optimizer"):
            optimizer = optimizer.original_optimizer
        owned = {id(p) for p in inner.parameters()}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("fxdp: the optimizer has parameters that are not the module's parameters.")
        refuse_unowned(inner, optimizer)
        if noise_generator is not None and self.secure_mode:
            raise ValueError("fxdp: secure_mode draws OS-seeded noise; passing noise_generator (a seed) is refused.")
        engine = api.ensure_privatized(
            inner, batch_first=batch_first, batch_dim=batch_dim, style=style, max_grad_norm=max_grad_norm,
            clipping_fn=clipping_fn, numerical_stability_constant=numerical_stability_constant,
            loss_reduction=loss_reduction, block_heads=block_heads)
        self.claim(engine)
        config = engine.config
        adaptive = from_clipping_option(clipping, inner, adaptive_options)
        indices = visited_indices(data_loader)  # the sampled set: the examples data_loader visits
        n = len(data_loader.dataset) if indices is None else len(indices)
        q = float(sample_rate) if sample_rate is not None else 1.0 / len(data_loader)
        if not (0 < q <= 1) or not math.isfinite(q):
            raise ValueError(f"fxdp: sample_rate must be in (0, 1], got {sample_rate!r}.")
        if n < self.world_size:
            raise ValueError(f"fxdp: the data set has {n} examples for {self.world_size} ranks.")
        generator = rank_generator(self.rank, secure=self.secure_mode, base=data_loader.generator)
        loader = make_distributed_loader(data_loader, sample_rate=q, generator=generator, shuffle_seed=shuffle_seed,
                                         num_replicas=self.world_size, rank=self.rank, batch_first=batch_first,
                                         rand_on_empty=rand_on_empty)
        if self.sharded:  # every rank noises the rows it owns, from its own stream (fsdp_optimizer)
            gen = None if self.secure_mode else noise_generator_for_rank(self.rank, noise_generator)
            dp_optimizer = ShardedDPOptimizer(
                optimizer, noise_multiplier, config.max_grad_norm, q * n, config.loss_reduction, generator=gen,
                secure_mode=self.secure_mode, public_grads=public_grads, process_group=self.process_group,
                bucket_cap_mb=bucket_cap_mb)
        else:
            dp_optimizer = DistributedDPOptimizer(
                optimizer, noise_multiplier, config.max_grad_norm, q * n, config.loss_reduction,
                generator=noise_generator, secure_mode=self.secure_mode, public_grads=public_grads,
                process_group=self.process_group, bucket_cap_mb=bucket_cap_mb, adaptive_clipping=adaptive)
        dp_optimizer.attach_step_hook(PoissonCharge(self.accountant, q))
        dp_optimizer.set_param_names(inner)
        bind_loader_check(dp_optimizer, loader, "this rank's share of the distributed Poisson loader")
        self.sampler_generator, self.sample_rate, self.expected_batch_size = generator, q, q * n
        fields = self._setup_fields(inner, engine, optimizer, dp_optimizer, loader, shuffle_seed)
        return module, dp_optimizer, loader, inner, fields

    def _setup_fields(self, inner, engine, optimizer, dp_optimizer, loader, shuffle_seed) -> dict:
        names = {id(p): n for n, p in inner.named_parameters()}
        groups = [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
                  for g in optimizer.param_groups]
        sampler = loader.batch_sampler
        return {
            "world size": str(self.world_size),
            "fxdp version": VERSION,
            "model parameters": repr([(n, tuple(p.shape), str(p.dtype), p.requires_grad, p.device.type)
                                      for n, p in inner.named_parameters()]),
            "model buffers": repr([(n, tuple(b.shape), str(b.dtype)) for n, b in inner.named_buffers()]),
            "privatize configuration": f"{engine.config!r} groups={engine.plan.groups!r}",
            "optimizer": f"{type(optimizer).__name__} {groups!r}",
            "noise and clipping": (f"noise_multiplier={dp_optimizer.noise_multiplier!r} "
                                   f"max_grad_norm={dp_optimizer.max_grad_norm!r} "
                                   f"loss_reduction={dp_optimizer.loss_reduction.value} "
                                   f"secure_mode={self.secure_mode} public_grads={dp_optimizer.public_grads} "
                                   f"adaptive_clipping={dp_optimizer.adaptive_clipping!r}"),
            "sampling": (f"sample_rate={sampler.sample_rate!r} dataset_size={sampler.total_size} "
                         f"steps={sampler.num_batches} shuffle_seed={shuffle_seed!r}"),
            "accountant": f"{self.accountant_name} steps_recorded={len(self.accountant)}",
        }

    def verify_replicas(self) -> None:
        """Collective: raise RankMismatchError unless every rank holds rank 0's parameters and
        buffers bit for bit (costs one broadcast of the model)."""
        inner = unwrap_compiled(self.module)
        if self.sharded:
            raise ValueError("fxdp: verify_replicas does not apply to an FSDP2 model (each rank holds its own shard).")
        verify_replicas(list(inner.parameters()) + list(inner.buffers()), src=self.root, group=self.process_group)
