"""Poisson sampling of one global logical batch across the ranks of a process group.

:class:`DistributedPoissonSampler` is Opacus's
``DistributedUniformWithReplacementSampler`` (a seeded permutation of the data
set split into one disjoint shard per rank; every rank selects each example
of its shard independently with probability q) with two fixes that matter
for privacy and for not hanging:

- It yields **empty local batches** too. Opacus's sampler skips them, so a
  rank whose shard drew nothing would hand out fewer batches than the others:
  the ranks' steps would pair up different logical batches, and the rank that
  runs out first leaves the others waiting in a collective forever.
  Here every rank yields exactly ``steps`` batches per pass.
- Each rank's selection generator is **independent** of the others'
  (:func:`rank_generator`): seeded from OS entropy in secure mode, else from
  a seed mixed with the rank. Ranks that share a seed (``torch.manual_seed(0)``
  on every rank, the usual habit) would otherwise select the same positions of
  their shards, correlating examples' inclusions -- no longer Poisson
  sampling of the global data set, which the accountant assumes.

Guarantees: the shards of one pass are disjoint and cover the data set (each
example lives on exactly one rank, so it contributes at most once to the
global batch: sensitivity R, not W·R); each example is in each global batch
independently with probability q; the global batch size is Poisson-binomial
with mean q·N. The permutation is public (``shuffle_seed + epoch``) and must be
the same on every rank (``fxdp.DPDistributed`` checks it).

:class:`DistributedPoissonDataLoader` hands the local batches out (empty ones
as empty tensors, via Opacus's collate wrapper) and tells the optimizer at
hand-out time that each batch is one logical batch, like
:class:`fxdp.training.loaders.PoissonDataLoader`.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from opacus.data_loader import CollateFnWithEmpty
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import DataLoader, IterableDataset

from fxdp.training.loaders import empty_aware_collate, notifying
from fxdp.training.noise import generator_from_os_entropy, seed_from_global_rng
from fxdp.training.samplers import DrawnSizes, visited_indices


def mix_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for ``rank`` derived from ``seed`` (SHA-256): distinct ranks get unrelated streams."""
    digest = hashlib.sha256(f"fxdp-sampler:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def rank_generator(rank: int, *, secure: bool, base: Optional[torch.Generator] = None) -> torch.Generator:
    """The selection generator of ``rank``: OS entropy in secure mode; otherwise a seed drawn from
    ``base`` (or torch's global RNG), mixed with the rank -- reproducible under ``torch.manual_seed``
    and different on every rank even when all ranks were seeded alike."""
    if secure:
        return generator_from_os_entropy()
    if base is not None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=base, dtype=torch.int64))
    else:
        seed = seed_from_global_rng()
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, rank))
    return g


class DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Opacus's distributed Poisson sampler that also yields empty local batches (module docstring).

    Args:
        total_size: N, the size of the whole data set.
        sample_rate: q, each example's probability of being in a global batch.
        generator: this rank's selection generator (see :func:`rank_generator`).
        shuffle, shuffle_seed: the public permutation that assigns examples to ranks.
        steps: batches per pass (default ``int(1 / q)``, Opacus's convention).
        num_replicas, rank: default to the default process group's.
        indices: the dataset indices sampled from (None: ``range(total_size)``); ``total_size``
            is then their number (a train split given as a ``SubsetRandomSampler``).
    """

    def __init__(self, *, total_size: int, sample_rate: float, generator: Optional[torch.Generator] = None,
                 shuffle: bool = True, shuffle_seed: int = 0, steps: Optional[int] = None, num_replicas=None,
                 rank=None, indices=None):
        if indices is not None:
            total_size = len(indices)
        if not (0 < float(sample_rate) <= 1):
            raise ValueError(f"fxdp: sample_rate must be in (0, 1], got {sample_rate!r}.")
        super().__init__(total_size=total_size, sample_rate=float(sample_rate), shuffle=shuffle,
                         shuffle_seed=shuffle_seed, steps=steps, generator=generator)
        if num_replicas is not None or rank is not None:
            self.num_replicas, self.rank = int(num_replicas), int(rank)
            self.num_samples = self.total_size // self.num_replicas + int(
                self.rank < self.total_size % self.num_replicas)
        if self.num_batches <= 0:
            raise ValueError(f"fxdp: steps must be positive, got {self.num_batches!r}.")
        self.indices = None if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        self.drawn = DrawnSizes()

    def shard(self) -> torch.Tensor:
        """The data set indices this rank draws from in the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        if self.indices is not None:
            indices = self.indices[indices]
        return indices[self.rank: self.total_size: self.num_replicas]

    def __iter__(self):
        self.drawn.clear()
        indices = self.shard()
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            batch = indices[mask.nonzero(as_tuple=False).reshape(-1)].tolist()
            self.drawn.push(len(batch))
            yield batch


class DistributedPoissonDataLoader(DataLoader):
    """Local batches of a :class:`DistributedPoissonSampler`, empty ones included; notifies
    ``dp_optimizer`` of every batch it hands out (one batch = one logical batch)."""

    dp_optimizer = None

    def __init__(self, dataset, *, batch_sampler: DistributedPoissonSampler, collate_fn=None,
                 batch_first: bool = True, rand_on_empty: bool = False, **kwargs):
        if isinstance(dataset, IterableDataset):
            raise ValueError("fxdp: Poisson sampling needs a map-style dataset, not an IterableDataset.")
        if isinstance(collate_fn, CollateFnWithEmpty):
            collate_fn = collate_fn.wrapped_collator_fn
        super().__init__(dataset=dataset, batch_sampler=batch_sampler,
                         collate_fn=empty_aware_collate(dataset[0], collate_fn, batch_first, rand_on_empty), **kwargs)
        self.sample_rate = batch_sampler.sample_rate

    def __iter__(self):
        yield from notifying(self, super().__iter__())


def make_distributed_loader(data_loader: DataLoader, *, sample_rate: float, generator: torch.Generator,
                            shuffle_seed: int, num_replicas: int, rank: int, batch_first: bool = True,
                            rand_on_empty: bool = False) -> DistributedPoissonDataLoader:
    """A :class:`DistributedPoissonDataLoader` over the examples ``data_loader`` visits (its dataset,
    or the indices of its ``SubsetRandomSampler``), with its collate function, workers and options
    (its own sampler and batch size are replaced)."""
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("fxdp: Poisson sampling needs a map-style dataset, not an IterableDataset.")
    sampler = DistributedPoissonSampler(total_size=len(data_loader.dataset), sample_rate=sample_rate,
                                        generator=generator, shuffle_seed=shuffle_seed, num_replicas=num_replicas,
                                        rank=rank, indices=visited_indices(data_loader))
    return DistributedPoissonDataLoader(
        data_loader.dataset, batch_sampler=sampler, collate_fn=data_loader.collate_fn, batch_first=batch_first,
        rand_on_empty=rand_on_empty, num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context, prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers)
