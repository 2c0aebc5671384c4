"""Poisson logical batches split into gradient-accumulation micro-batches, for the HF Trainer.

The Trainer runs ``gradient_accumulation_steps`` (GA) forward/backward passes,
then one optimizer step. :class:`PoissonMicroBatchSampler` makes each group of GA
batches one Poisson sample of the data set (every example independently with
probability q = L / N, L = per-device batch × GA × world size), split into GA
micro-batches of as-equal-as-possible sizes (some may be empty). Under a
multi-process launch, :class:`MicroBatchSampler` splits each rank's share of
the global Poisson batch (:mod:`fxdp.integrations.hf_distributed`) the same way. The private
gradients of the GA micro-batches add up to the clipped sum over the logical
batch, and the optimizer noises once per step: exactly one Poisson-subsampled
Gaussian mechanism per step, as the accountant charges.

:class:`PerSampleCollator` wraps the user's collator: it refuses a batch whose
rows are not the examples it was given (packing / flattening collators put
several examples in one row, or change the number of rows, which defeats
per-sample clipping), and turns an empty micro-batch into tensors with zero rows
(shapes taken from collating one example, whose values are then dropped), so that
an empty Poisson sample still runs forward/backward and steps with noise only.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from fxdp.core.errors import PrivacyError

PACKING_COLLATORS = ("DataCollatorWithFlattening",)


class PoissonMicroBatchSampler(Sampler[List[int]]):
    """``steps_per_epoch`` Poisson logical batches per pass, each yielded as ``micro_batches``
    index lists (module docstring). Draws with ``generator`` (mask ``rand(N) < q``, as Opacus's
    ``UniformWithReplacementSampler``); a logical batch is drawn when its first micro-batch is asked
    for, so the generator state after k optimizer steps does not depend on where an epoch ends."""

    def __init__(self, num_samples: int, sample_rate: float, micro_batches: int, steps_per_epoch: int,
                 generator: torch.Generator):
        if num_samples <= 0:
            raise ValueError(f"fxdp: Poisson sampling needs a non-empty data set, got {num_samples} examples.")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"fxdp: sample rate must be in (0, 1], got {sample_rate!r} (is the logical batch "
                             "per_device_train_batch_size × gradient_accumulation_steps × world size larger than "
                             "the data set?).")
        self.num_samples, self.sample_rate = int(num_samples), float(sample_rate)
        self.micro_batches, self.steps_per_epoch = int(micro_batches), int(steps_per_epoch)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield from split_micro_batches(mask.nonzero().flatten().tolist(), self.micro_batches)


def split_micro_batches(indices: List[int], micro_batches: int) -> List[List[int]]:
    """``indices`` cut, in order, into ``micro_batches`` consecutive lists whose sizes differ by at most 1."""
    n, m = len(indices), int(micro_batches)
    return [indices[i * n // m:(i + 1) * n // m] for i in range(m)]


class MicroBatchSampler(Sampler[List[int]]):
    """Each logical batch of the batch sampler ``logical`` (e.g. this rank's share of a distributed
    Poisson batch, :class:`fxdp.distributed.DistributedPoissonSampler`) yielded as ``micro_batches``
    index lists; a logical batch is drawn when its first micro-batch is asked for."""

    def __init__(self, logical: Sampler, micro_batches: int):
        self.logical, self.micro_batches = logical, int(micro_batches)
        self.sample_rate = logical.sample_rate

    def __len__(self) -> int:
        return len(self.logical) * self.micro_batches

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.logical:
            yield from split_micro_batches(list(batch), self.micro_batches)


def _rows(value):
    if isinstance(value, torch.Tensor):
        return [value.shape[0]] if value.dim() > 0 else []
    if isinstance(value, dict):
        return [r for v in value.values() for r in _rows(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _rows(v)]
    return []


def _empty_like(value):
    if isinstance(value, torch.Tensor):
        return value[:0] if value.dim() > 0 else value
    if isinstance(value, dict):
        return type(value)({k: _empty_like(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_empty_like(v) for v in value)
    return value


class PerSampleCollator:
    """Wrap ``collate`` so that every tensor of a batch has one row per example (module docstring).

    Raises:
        PrivacyError: a known packing collator, or a batch whose tensors do not have
            ``len(examples)`` rows in dimension 0.
    """

    def __init__(self, collate: Callable, dataset):
        inner = getattr(collate, "data_collator", collate)  # HF's RemoveColumnsCollator wraps the user's
        if type(inner).__name__ in PACKING_COLLATORS:
            raise PrivacyError(
                f"fxdp: {type(inner).__name__} packs several examples into one sequence; per-sample clipping would "
                "clip the packed row, not each example, and Poisson sampling would no longer decide which examples "
                "a step sees. Use a padding collator (e.g. DataCollatorWithPadding / DataCollatorForLanguageModeling).")
        self.collate, self.dataset = collate, dataset
        self._template = None

    def __call__(self, examples):
        if len(examples) == 0:
            if self._template is None:
                self._template = _empty_like(self.collate([self.dataset[0]]))
            return self._template
        batch = self.collate(examples)
        rows = _rows(batch)
        if not rows or any(r != len(examples) for r in rows):
            raise PrivacyError(
                f"fxdp: the data collator turned {len(examples)} examples into a batch with rows {sorted(set(rows))}; "
                "each example must be exactly one row (dimension 0) of every tensor, otherwise per-sample clipping and "
                "the Poisson sampling rate no longer refer to examples. Packing or dropping collators are refused.")
        return batch


def check_train_dataset(dataset) -> Optional[int]:
    """The data set size; PrivacyError for data sets without one (no sampling rate to account for)."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise PrivacyError("fxdp: DPTrainer needs a map-style train_dataset with a length (Poisson sampling picks "
                           "examples by index); an IterableDataset has no sampling rate fxdp can account for.")
    return len(dataset)


__all__ = ["MicroBatchSampler", "PerSampleCollator", "PoissonMicroBatchSampler", "check_train_dataset",
           "split_micro_batches"]
