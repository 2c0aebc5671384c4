"""Which examples a data loader visits, and a Poisson sampler over exactly those.

When fxdp replaces a user's loader by a Poisson-sampling one, it must sample the examples the
user's loader would have visited -- a train split given as ``Subset`` or through a
``SubsetRandomSampler`` over the whole data set -- and charge the rate q for that set, never
the whole underlying data set (held-out examples would be drawn into training).

:func:`visited_indices` reads that set from the loader's sampler; :class:`IndexedPoissonSampler`
draws each of them independently with probability q. The sampler also records, in drawing order,
the size of every batch it draws (:attr:`IndexedPoissonSampler.drawn`), so that the loader can tell
the optimizer how many examples each batch it hands out holds, however far worker prefetching has
run ahead (:mod:`fxdp.training.step_check`).
"""
from __future__ import annotations

import collections
from typing import List, Optional, Sequence

import torch
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import BatchSampler, ConcatDataset, RandomSampler, SequentialSampler, Subset, SubsetRandomSampler

from fxdp.core.errors import PrivacyConfigError, PrivacyError


class DrawnSizes:
    """Sizes of drawn batches (with an optional flag each), first in first out: a sampler appends
    when it draws, the loader pops when it hands the batch out. Cleared at the start of every pass."""

    def __init__(self):
        self._queue = collections.deque()

    def clear(self) -> None:
        self._queue.clear()

    def push(self, size: int, ends_logical_batch: bool = True) -> None:
        self._queue.append((int(size), bool(ends_logical_batch)))

    def pop(self):
        """``(size, ends_logical_batch)`` of the next batch handed out."""
        if not self._queue:
            raise PrivacyError("fxdp: a data loader handed out a batch its sampler did not draw (two iterators of one "
                               "loader used at once?); fxdp cannot tell what this batch holds.")
        return self._queue.popleft()


def _leaf_rows(dataset, rows=None):
    """``(leaf data set, its row indices or None for all of them)`` for every leaf under ``Subset`` /
    ``ConcatDataset`` wrappers (``rows``: the rows of ``dataset`` that are visited, None: all)."""
    if isinstance(dataset, Subset):
        indices = [int(i) for i in dataset.indices]
        yield from _leaf_rows(dataset.dataset, indices if rows is None else [indices[r] for r in rows])
    elif isinstance(dataset, ConcatDataset):
        starts = [0, *dataset.cumulative_sizes]
        for child, lo, hi in zip(dataset.datasets, starts, starts[1:]):
            picked = None if rows is None else [r - lo for r in rows if lo <= r < hi]
            if picked is None or picked:
                yield from _leaf_rows(child, picked)
    else:
        yield dataset, rows


def refuse_repeated_examples(dataset) -> None:
    """A data set that holds an underlying example more than once -- a ``Subset`` listing an index twice,
    ``ConcatDataset([d, d])``, at any depth -- would let that example enter one Poisson batch several
    times (k·R), or several fixed-size batches of one epoch, while the accountant charges it once: refused."""
    if not isinstance(dataset, (Subset, ConcatDataset)):
        return
    seen = {}
    for leaf, rows in _leaf_rows(dataset):
        key = id(leaf)
        listed = list(range(len(leaf))) if rows is None else rows
        if key in seen or len(set(listed)) != len(listed):
            if key in seen and not set(seen[key]).isdisjoint(listed) or len(set(listed)) != len(listed):
                raise PrivacyConfigError(
                    "fxdp: the data set holds an example more than once (a Subset that lists an index twice, or one "
                    "data set concatenated with itself); each copy would be drawn independently, so one example "
                    "could contribute several times R to a step or an epoch while the accountant charges it once. "
                    "Train on distinct examples (oversampling is not private), or clip each example's copies as one "
                    "privacy unit with fxdp.privacy_units.")
            seen[key] = [*seen[key], *listed]
        else:
            seen[key] = listed


def visited_indices(data_loader) -> Optional[List[int]]:
    """The dataset indices ``data_loader`` visits (None: all of ``range(len(dataset))``).

    Raises:
        PrivacyError: a sampler whose set of visited examples fxdp cannot read.
    """
    refuse_repeated_examples(data_loader.dataset)
    sampler = data_loader.batch_sampler
    if isinstance(sampler, IndexedPoissonSampler):
        return None if sampler.indices is None else list(sampler.indices)
    if isinstance(sampler, DistributedUniformWithReplacementSampler):
        raise ValueError("fxdp: distributed Poisson sampling belongs to fxdp.DPDistributed.")
    if isinstance(sampler, UniformWithReplacementSampler):
        return None
    if isinstance(sampler, BatchSampler):
        inner = sampler.sampler
        if isinstance(inner, SubsetRandomSampler):
            return [int(i) for i in inner.indices]
        if isinstance(inner, (SequentialSampler, RandomSampler)):
            return None
        raise PrivacyError(
            f"fxdp: the data loader draws with {type(inner).__name__}; fxdp cannot tell which examples it visits, so "
            "it cannot Poisson-sample the same set. Pass a torch.utils.data.Subset of the examples to train on (or a "
            "SubsetRandomSampler) with a plain shuffled or sequential loader.")
    raise PrivacyError(f"fxdp: unknown batch sampler {type(sampler).__name__}; fxdp cannot tell which examples the "
                       "data loader visits. Pass a plain DataLoader over the training examples (a Subset if needed).")


class IndexedPoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler over ``indices`` (None: the whole data set of ``num_samples``):
    each listed example is in each batch independently with probability ``sample_rate``.
    ``num_samples`` is the size of the sampled set, so ``sample_rate * num_samples`` is the
    expected batch size, as the accountant assumes."""

    def __init__(self, *, num_samples: int, sample_rate: float, indices: Optional[Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None, steps: Optional[int] = None):
        if indices is not None:
            indices = [int(i) for i in indices]
            if len(set(indices)) != len(indices):
                raise PrivacyError("fxdp: the loader's index set lists an example more than once; it would be "
                                   "drawn with a higher rate than the accountant charges.")
            num_samples = len(indices)
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=generator, steps=steps)
        self.indices = indices
        self.drawn = DrawnSizes()

    def __iter__(self):
        self.drawn.clear()
        table = None if self.indices is None else torch.as_tensor(self.indices, dtype=torch.long)
        for batch in super().__iter__():
            if table is not None and batch:
                batch = table[torch.as_tensor(batch, dtype=torch.long)].tolist()
            self.drawn.push(len(batch))
            yield batch


def rows_of_empty_batch(collate_fn) -> int:
    """Rows of the batch Opacus's collate wrapper builds for an empty draw: 1 random,
    data-independent row with ``rand_on_empty=True``, else 0."""
    return 1 if getattr(collate_fn, "rand_on_empty", False) else 0
