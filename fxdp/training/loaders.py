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

Sampling and splitting are Opacus's: ``opacus.data_loader.DPDataLoader``
(Poisson sampling, empty batches) and
``opacus.utils.batch_memory_manager.BatchSplittingSampler`` (splitting).
"""
from __future__ import annotations

import collections
from typing import Optional

import torch
from opacus.data_loader import CollateFnWithEmpty, DPDataLoader
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from torch.utils.data import DataLoader, IterableDataset


class PoissonDataLoader(DPDataLoader):
    """Opacus's ``DPDataLoader`` (Poisson sampling, empty batches supported) that
    notifies ``dp_optimizer`` of every batch it hands out: one batch = one logical batch."""

    dp_optimizer = None

    def __iter__(self):
        for batch in super().__iter__():
            if self.dp_optimizer is not None:
                self.dp_optimizer.notify_batch(ends_logical_batch=True)
            yield batch


def make_poisson_loader(data_loader: DataLoader, *, sample_rate: Optional[float] = None,
                        generator: Optional[torch.Generator] = None, batch_first: bool = True,
                        rand_on_empty: bool = False) -> PoissonDataLoader:
    """A :class:`PoissonDataLoader` over ``data_loader``'s dataset, with its collate
    function, workers and options.

    ``sample_rate`` defaults to ``1 / len(data_loader)`` (Opacus's convention: the
    expected batch size stays the loader's batch size). ``generator`` drives the
    sampling (default: the loader's own generator, else torch's global RNG).
    """
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("fxdp: Poisson sampling needs a map-style dataset, not an IterableDataset.")
    collate = data_loader.collate_fn
    if isinstance(collate, CollateFnWithEmpty):
        collate = collate.wrapped_collator_fn
    return PoissonDataLoader(
        dataset=data_loader.dataset,
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


class _SplitFlags:
    """Stands in for the optimizer in Opacus's BatchSplittingSampler: records, in
    sampling order, whether each physical batch is skipped (not the last of its logical batch)."""

    def __init__(self):
        self.flags = collections.deque()

    def signal_skip_step(self, do_skip: bool = True):
        self.flags.append(bool(do_skip))


class MicroBatchLoader(DataLoader):
    """The loader :class:`BatchMemoryManager` yields: physical batches of at most
    ``max_physical_batch_size`` examples; the optimizer learns at hand-out time
    which one ends its logical batch."""

    def __init__(self, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        flags = _SplitFlags()
        super().__init__(
            dataset=data_loader.dataset,
            batch_sampler=BatchSplittingSampler(sampler=data_loader.batch_sampler,
                                                max_batch_size=max_physical_batch_size, optimizer=flags),
            **loader_options(data_loader),
        )
        self.split_flags = flags
        self.dp_optimizer = optimizer

    def __iter__(self):
        self.split_flags.flags.clear()
        for batch in super().__iter__():
            skip = self.split_flags.flags.popleft()
            self.dp_optimizer.notify_batch(ends_logical_batch=not skip)
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
    loader is usually the one ``PrivacyEngine.make_private`` returned.
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
        return MicroBatchLoader(self.data_loader, self.max_physical_batch_size, self.optimizer)

    def __exit__(self, exc_type, exc, tb):
        self.optimizer.reset_logical_batch()
        return False
