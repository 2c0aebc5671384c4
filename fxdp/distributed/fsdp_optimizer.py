"""ShardedDPOptimizer: DP-SGD releases for FSDP2 models, each rank noising and stepping its own shard.

For every trainable parameter p (a DTensor sharded ``Shard(0)`` over the W data-parallel ranks; rank r
owns the rows ``[r·c, min((r+1)·c, n))`` with ``c = ceil(n / W)``, torch.chunk's split, which FSDP2
uses):

- at the end of every backward pass, the engine reduce-scatters each rank's full clipped sum into
  the owners' rows (:func:`reduce_scatter_rows`, in float32, float64 for float64 parameters) and
  drops it: ``p.private_grad`` is a DTensor like p holding, on rank r, the sum over ranks of the
  clipped sums of its rows (:meth:`fxdp.distributed.fsdp.FSDPView.convert_private_grad`); at most
  one parameter's full-size clipped sum exists at a time, never all of them, and no all-reduce of a
  full gradient ever happens. Micro-batches add their reduced shards.

At the step, :class:`ShardedDPOptimizer` (a :class:`~fxdp.distributed.optimizer.DistributedDPOptimizer`:
its collective checks, refusals and the accountant's charge hold) releases through the named steps:

1. ``check``: as DistributedDPOptimizer (all ranks agree, or all raise);
2. ``add_noise``: rank r adds N(0, σ²R²) to every coordinate of its shard, from its own generator
   (a seed mixed with the rank, or OS entropy in secure mode);
3. ``reduce``: nothing left to do (done at the end of backward);
4. ``scale``: every rank divides its shard by the GLOBAL expected batch size q·N;
5. ``write``: ``p.grad`` is the DTensor with p's sharding whose local tensor is that shard; the
   inner optimizer (built on the sharded parameters) steps each rank's shard.

Why the noise is exactly N(0, σ²R²·I) over the whole parameter vector: the row blocks of the
ranks partition every parameter, so each coordinate has exactly one owner, which adds exactly one
draw to the already summed coordinate; no other rank touches it. The draws of one rank are i.i.d.
N(0, σ²R²) (one float32 generator stream), and the ranks' streams are independent (distinct
SHA-256-mixed seeds, or OS entropy), so the noise vector is N(0, σ²R²·I): each coordinate once, none
correlated with another. Seeding every rank alike does not correlate them: the rank is mixed into
the seed.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from fxdp.distributed.shards import ShardingError, owned_rows
from fxdp.distributed.optimizer import DistributedDPOptimizer
from fxdp.training.noise import seed_from_global_rng


def noise_generator_for_rank(rank: int, base: Optional[torch.Generator] = None) -> torch.Generator:
    """This rank's noise generator: a seed from ``base`` (or torch's global RNG) mixed with the rank."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=base, dtype=torch.int64)) if base is not None \
        else seed_from_global_rng()
    mixed = int.from_bytes(hashlib.sha256(f"fxdp-noise:{seed}:{rank}".encode()).digest()[:8], "little")
    g = torch.Generator()
    g.manual_seed(mixed & (2 ** 63 - 1))
    return g


class ShardedDPOptimizer(DistributedDPOptimizer):
    """:class:`DistributedDPOptimizer` for FSDP2-sharded parameters (module docstring).

    Args (besides DistributedDPOptimizer's): ``generator`` is this rank's noise generator (build it
    with :func:`noise_generator_for_rank`; every rank must have an independent one).
    """

    def __repr__(self):
        return "Sharded" + super().__repr__()

    def notify_batch(self, ends_logical_batch: bool, num_examples=None, poisson: bool = True) -> None:
        """Micro-batches (``fxdp.BatchMemoryManager``) are refused under FSDP2: ranks with different local
        batch sizes would run different numbers of forward passes, and FSDP2's collectives (and fxdp's
        reduce-scatter at the end of each backward) would no longer pair up across ranks."""
        if not ends_logical_batch:
            raise ShardingError(
                "fxdp: micro-batches (BatchMemoryManager) are not supported with FSDP2 yet: the ranks' local "
                "Poisson batches differ in size, so they would run different numbers of sharded forward passes. "
                "Use a global batch size whose local share fits in memory (FSDP2 already shards the model).")
        super().notify_batch(ends_logical_batch, num_examples, poisson)

    def add_noise(self, params, grads) -> None:
        """N(0, σ²R²) on every coordinate of this rank's shard (the rows it owns), after their
        reduce-scatter at the end of backward (module docstring)."""
        std = self.noise_multiplier * self.max_grad_norm
        self.noise.begin_step()
        for p in params:
            g = grads[id(p)]
            g = g.to_local() if hasattr(g, "to_local") else g
            start, stop, _ = owned_rows(p, self.rank, self.world_size)
            if tuple(g.shape) != ((stop - start,) + tuple(p.shape[1:])):
                raise ShardingError(f"fxdp: the private gradient of {self._name(p)} is not this rank's shard "
                                    f"(shape {tuple(g.shape)}); was it written by the sharded model's engine?")
            noise = self.noise.draw(g.shape, std, g.device) if g.numel() else None
            grads[id(p)] = g if noise is None else g + noise.to(g.dtype)

    def reduce(self, params, grads) -> None:
        """Nothing left to combine: the engine reduce-scattered each clipped sum into its owners' shards
        at the end of every backward pass (:meth:`fxdp.distributed.fsdp.FSDPView.convert_private_grad`)."""
        self.last_num_buckets = 0

    def write(self, params, grads, public) -> None:
        """``p.grad`` = the DTensor of p's sharding holding this rank's released shard."""
        from torch.distributed.tensor import DTensor

        for p in params:
            g = grads[id(p)]
            if id(p) in public:
                extra = public[id(p)]
                g = g + (extra.to_local() if isinstance(extra, DTensor) else extra).to(g.dtype)
            local = g.to(p.dtype).contiguous()
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
