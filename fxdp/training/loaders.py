"""Logical batches: Poisson batches handed to the optimizer one at a time, or split into micro-batches.

A *logical batch* is what one noised optimizer step releases: one Poisson
sample of the data set. fxdp's loaders tell the :class:`DPOptimizer` about
every batch they hand out (``optimizer.notify_batch``), at the moment the
training loop receives it -- not when the sampler draws it, so worker
prefetching cannot shift the boundaries. This lets the optimizer

- skip the step of a micro-batch that does not end its logical batch (the
  private gradients keep accumulating; noise is drawn once, at the end), and
- refuse a step after more than one Poisson batch (gradient accumulation
  across Poisson batches, or a skipped batch), which would break the
  sensitivity bound and the accountant's sampling rate.

With every batch the loaders also report how many examples it holds, so that the
optimizer can check that the samples clipped for a step are exactly the examples drawn
for it (:mod:`fxdp.training.step_check`). The Poisson loader samples only the examples the
user's loader would visit (a ``Subset``, a ``SubsetRandomSampler``: see
:mod:`fxdp.training.samplers`).

Sampling and splitting are Opacus's: ``opacus.data_loader.DPDataLoader``
(Poisson sampling, empty batches) and
``opacus.utils.batch_memory_manager.BatchSplittingSampler`` (splitting).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from opacus.data_loader import CollateFnWithEmpty, DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from torch.utils.data import BatchSampler, DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate

from fxdp.training.samplers import DrawnSizes, IndexedPoissonSampler, rows_of_empty_batch, visited_indices


def empty_aware_collate(first_example, collate_fn, batch_first: bool, rand_on_empty: bool):
    """The user's collate (default_collate if None) wrapped so that an empty Poisson batch collates to
    zero-row tensors shaped like ``first_example``'s fields (Opacus's wrapper)."""
    fields = isinstance(first_example, (tuple, list))
    shapes = [(0, *shape_safe(x)) for x in first_example] if fields else None
    dtypes = [dtype_safe(x) for x in first_example] if fields else None
    return wrap_collate_with_empty(collate_fn=collate_fn if collate_fn is not None else default_collate,
                                   batch_first=batch_first, rand_on_empty=rand_on_empty,
                                   sample_empty_shapes=shapes, dtypes=dtypes)


def notifying(loader, batches):
    """Yield ``batches`` of a Poisson ``loader``, telling its ``dp_optimizer`` how many examples each one drew
    (each batch is one logical batch; an empty one counts its zero rows)."""
    for batch in batches:
        n, _ = loader.batch_sampler.drawn.pop()
        if loader.dp_optimizer is not None:
            loader.dp_optimizer.notify_batch(ends_logical_batch=True,
                                             num_examples=n or rows_of_empty_batch(loader.collate_fn))
        yield batch


class PoissonDataLoader(DPDataLoader):
    """Opacus's ``DPDataLoader`` (Poisson sampling, empty batches supported) over ``indices``
    (None: the whole dataset), which notifies ``dp_optimizer`` of every batch it hands out and of
    its number of examples: one batch = one logical batch."""

    dp_optimizer = None

    def __init__(self, dataset, *, sample_rate: float, indices: Optional[Sequence[int]] = None, collate_fn=None,
                 generator=None, batch_first: bool = True, rand_on_empty: bool = False, **kwargs):
        kwargs.pop("drop_last", None)
        sampler = IndexedPoissonSampler(num_samples=len(dataset), sample_rate=sample_rate, indices=indices,
                                        generator=generator)
        first = dataset[sampler.indices[0] if sampler.indices else 0]
        DataLoader.__init__(self, dataset=dataset, batch_sampler=sampler, generator=generator,
                            collate_fn=empty_aware_collate(first, collate_fn, batch_first, rand_on_empty), **kwargs)
        self.sample_rate = sample_rate
        self.distributed = False

    def __iter__(self):
        yield from notifying(self, super().__iter__())


def make_poisson_loader(data_loader: DataLoader, *, sample_rate: Optional[float] = None,
                        generator: Optional[torch.Generator] = None, batch_first: bool = True,
                        rand_on_empty: bool = False) -> PoissonDataLoader:
    """A :class:`PoissonDataLoader` over the examples ``data_loader`` visits (its whole dataset,
    or the indices of its ``SubsetRandomSampler``), with its collate function, workers and options.

    ``sample_rate`` defaults to ``1 / len(data_loader)`` (Opacus's convention: the
    expected batch size stays the loader's batch size). ``generator`` drives the
    sampling (default: the loader's own generator, else torch's global RNG).

    Raises:
        PrivacyError: a sampler whose visited examples fxdp cannot tell (weighted, custom).
    """
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("fxdp: Poisson sampling needs a map-style dataset, not an IterableDataset.")
    indices = visited_indices(data_loader)
    collate = data_loader.collate_fn
    if isinstance(collate, CollateFnWithEmpty):
        collate = collate.wrapped_collator_fn
    return PoissonDataLoader(
        dataset=data_loader.dataset, indices=indices,
        sample_rate=(1 / len(data_loader)) if sample_rate is None else float(sample_rate),
        **dict(loader_options(data_loader), collate_fn=collate,
               generator=generator if generator is not None else data_loader.generator),
        batch_first=batch_first,
        rand_on_empty=rand_on_empty,
    )


def loader_options(data_loader: DataLoader) -> dict:
    """The keyword arguments that rebuild ``data_loader`` with another batch sampler."""
    return dict(num_workers=data_loader.num_workers, collate_fn=data_loader.collate_fn,
                pin_memory=data_loader.pin_memory, timeout=data_loader.timeout,
                worker_init_fn=data_loader.worker_init_fn, multiprocessing_context=data_loader.multiprocessing_context,
                generator=data_loader.generator, prefetch_factor=data_loader.prefetch_factor,
                persistent_workers=data_loader.persistent_workers)


class FixedBatchLoader(DataLoader):
    """A shuffled or sequential loader of fixed-size batches (``poisson_sampling=False``) that tells
    ``dp_optimizer`` how many examples each batch it hands out holds (batches may be accumulated)."""

    dp_optimizer = None

    def __init__(self, dataset, *, batch_sampler, **kwargs):
        super().__init__(dataset, batch_sampler=_Recording(batch_sampler), **kwargs)

    def __iter__(self):
        check = getattr(self.dp_optimizer, "batch_check", None)
        if check is not None:
            check.new_pass()
        for batch in super().__iter__():
            n, _ = self.batch_sampler.drawn.pop()
            if self.dp_optimizer is not None:
                self.dp_optimizer.notify_batch(ends_logical_batch=True, num_examples=n, poisson=False)
            yield batch


class _Recording(BatchSampler):
    """``inner``'s batches, their sizes recorded as they are drawn (``inner`` stays reachable as ``.inner``)."""

    def __init__(self, inner: BatchSampler):
        super().__init__(inner.sampler, inner.batch_size, inner.drop_last)
        self.inner = inner
        self.drawn = DrawnSizes()

    def __iter__(self):
        self.drawn.clear()
        for batch in self.inner:
            self.drawn.push(len(batch))
            yield batch

    def __len__(self):
        return len(self.inner)


class _SplittingSampler(BatchSplittingSampler):
    """Opacus's BatchSplittingSampler that records, in drawing order, each physical batch's size and
    whether it ends its logical batch (an empty logical batch is one empty physical batch)."""

    def __init__(self, sampler, max_batch_size: int):
        super().__init__(sampler=sampler, max_batch_size=max_batch_size, optimizer=None)
        self.drawn = DrawnSizes()

    def __iter__(self):
        self.drawn.clear()
        for idxs in self.sampler:
            parts = [list(idxs)] if len(idxs) == 0 else [
                s.tolist() for s in np.array_split(idxs, math.ceil(len(idxs) / self.max_batch_size))]
            for k, part in enumerate(parts):
                self.drawn.push(len(part), ends_logical_batch=k == len(parts) - 1)
                yield part


class MicroBatchLoader(DataLoader):
    """The loader :class:`BatchMemoryManager` yields: physical batches of at most
    ``max_physical_batch_size`` examples; the optimizer learns at hand-out time
    which one ends its logical batch."""

    def __init__(self, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        super().__init__(
            dataset=data_loader.dataset,
            batch_sampler=_SplittingSampler(data_loader.batch_sampler, max_physical_batch_size),
            **loader_options(data_loader),
        )
        self.dp_optimizer = optimizer

    def __iter__(self):
        for batch in super().__iter__():
            n, ends = self.batch_sampler.drawn.pop()
            self.dp_optimizer.notify_batch(ends_logical_batch=ends, num_examples=n or rows_of_empty_batch(
                self.collate_fn))
            yield batch


class BatchMemoryManager:
    """Process each logical batch as physical micro-batches; clip per sample, noise once.

    Usage (Opacus's calling convention)::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32, optimizer=optimizer) as mb_loader:
            for x, y in mb_loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()        # a no-op except at the end of each logical batch

    Guarantee: with the noise off, the update after a logical batch equals one
    step on the whole logical batch (the private gradients of the micro-batches
    add up to the clipped sum over the logical batch; the scale is the expected
    logical batch size). ``zero_grad()`` between micro-batches of one logical
    batch keeps what was accumulated. An empty Poisson batch is handed out as
    one empty batch, which still steps (noise only). The optimizer must be the
    :class:`~fxdp.training.optimizer.DPOptimizer` of this training run; the
    loader is usually the one ``PrivacyEngine.make_private`` returned. Inside the
    ``with`` block every step checks that the samples clipped for the logical batch
    are exactly the examples drawn for it (:mod:`fxdp.training.step_check`).
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        from fxdp.training.optimizer import DPOptimizer

        if not isinstance(optimizer, DPOptimizer):
            raise ValueError(f"fxdp: BatchMemoryManager needs fxdp's DPOptimizer, got {type(optimizer).__name__}.")
        if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) \
                or max_physical_batch_size <= 0:
            raise ValueError(f"fxdp: max_physical_batch_size must be a positive int, got {max_physical_batch_size!r}.")
        if getattr(data_loader, "batch_sampler", None) is None:
            raise ValueError("fxdp: BatchMemoryManager needs a data loader with a batch sampler.")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> MicroBatchLoader:
        from fxdp.training.step_check import DrawnBatchCheck

        self._own_check = self.optimizer.batch_check is None
        if self._own_check:
            self.optimizer.batch_check = DrawnBatchCheck("the BatchMemoryManager's loader")
        return MicroBatchLoader(self.data_loader, self.max_physical_batch_size, self.optimizer)

    def __exit__(self, exc_type, exc, tb):
        self.optimizer.reset_logical_batch()
        if getattr(self, "_own_check", False):
            self.optimizer.batch_check = None
        return False
