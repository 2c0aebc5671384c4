"""Privacy accounting: a thin layer over ``opacus.accountants``.

fxdp does not implement accountants; it validates arguments, reads the
sampling rate from the sampler that actually draws the batches, and decides
what one optimizer step costs:

- Poisson sampling (``opacus.utils.uniform_sampler.UniformWithReplacementSampler``,
  as used by ``opacus.data_loader.DPDataLoader``): every step is one
  Poisson-subsampled Gaussian mechanism with the sampler's own ``sample_rate``
  (:class:`PoissonCharge`).
- Fixed-size batches that use every example at most once per epoch (a
  ``BatchSampler`` over a ``SequentialSampler``, a ``SubsetRandomSampler`` or a
  ``RandomSampler`` without replacement): there is no amplification by subsampling
  to claim, and the adjacency is **replace-one** (substitute one example, the data
  set size fixed). Under add/remove, removing an example shifts every later batch of
  the epoch (measured: the epoch's releases moved by 3.65 R); replacing one keeps the
  (data-independent) batch positions, so exactly one step of the epoch sees a
  different example, and its clipped sum moves by at most 2 R (one contribution out,
  one in). An epoch is therefore one full-batch Gaussian mechanism (``sample_rate = 1``)
  with sensitivity 2 R, i.e. noise multiplier σ/2; :class:`EpochCharge` charges that at
  the first step of each epoch (a partial epoch counts as a whole one). The ε reported
  is for replace-one adjacency; use Poisson sampling (add/remove, amplified) for the
  usual figure.
- Any other sampler (with replacement, weighted, a custom one, an
  ``IterableDataset``): refused, since an example may appear several times in
  one batch or the rate cannot be known.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from opacus.accountants import IAccountant
from opacus.accountants import create_accountant as _opacus_create_accountant
from opacus.accountants.utils import get_noise_multiplier as _opacus_get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, SequentialSampler, SubsetRandomSampler

from fxdp.core.config import positive_number
from fxdp.core.errors import PrivacyError

MECHANISMS = ("prv", "rdp", "gdp", "pld")
# replace-one adjacency: one example out, one in -- the clipped sum of one step moves by at most 2R
REPLACE_ONE_SENSITIVITY = 2.0


def create_accountant(mechanism: str = "prv") -> IAccountant:
    """An accountant with Opacus's interface: "prv" (numerical composition of privacy loss
    random variables, tight), "pld" (privacy loss distributions from Google's dp-accounting,
    the tightest; :mod:`fxdp.training.pld`), "rdp" (Rényi DP, a looser upper bound) or "gdp"
    (central-limit approximation: can *under*-estimate ε; Opacus warns)."""
    if not isinstance(mechanism, str) or mechanism.strip().lower() not in MECHANISMS:
        raise ValueError(f"fxdp: unknown accountant {mechanism!r}; expected one of {', '.join(MECHANISMS)}.")
    if mechanism.strip().lower() == "pld":
        from fxdp.training.pld import PLDAccountant

        return PLDAccountant()
    return _opacus_create_accountant(mechanism.strip().lower())


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of steps in ``epochs`` epochs at ``sample_rate`` (rounded up, never down)."""
    return int(math.ceil(epochs / sample_rate - 1e-9))


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         epochs: Optional[float] = None, steps: Optional[int] = None, accountant: str = "prv",
                         epsilon_tolerance: float = 0.01) -> float:
    """The smallest σ (up to ``epsilon_tolerance``) with ε(σ) <= ``target_epsilon``
    after ``steps`` (or ``epochs / sample_rate``, rounded up) Poisson-subsampled
    Gaussian steps, found by ``opacus.accountants.utils.get_noise_multiplier``."""
    positive_number("target_epsilon", target_epsilon)
    if not (0 < float(target_delta) < 1):
        raise ValueError(f"fxdp: target_delta must be in (0, 1), got {target_delta!r}.")
    _check_rate(sample_rate)
    if (epochs is None) == (steps is None):
        raise ValueError("fxdp: give exactly one of epochs= and steps=.")
    if steps is None:
        positive_number("epochs", epochs)
        steps = steps_for_epochs(float(epochs), float(sample_rate))
    if isinstance(steps, bool) or int(steps) != steps or steps <= 0:
        raise ValueError(f"fxdp: steps must be a positive integer, got {steps!r}.")
    create_accountant(accountant)
    if accountant.strip().lower() == "pld":
        from fxdp.training.pld import pld_noise_multiplier

        return pld_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(target_delta),
                                    sample_rate=float(sample_rate), steps=int(steps),
                                    epsilon_tolerance=epsilon_tolerance)
    with warnings.catch_warnings():
        # the search probes very small and very large σ, where Opacus's RDP order grid warns; harmless here
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(_opacus_get_noise_multiplier(
            target_epsilon=float(target_epsilon), target_delta=float(target_delta), sample_rate=float(sample_rate),
            steps=int(steps), accountant=accountant.strip().lower(), epsilon_tolerance=epsilon_tolerance))


def epsilon_spent(accountant: IAccountant, delta: float) -> float:
    """ε at ``delta`` for the accountant's history: 0 before any step, inf once a step had σ = 0."""
    if not (0 < float(delta) < 1):
        raise ValueError(f"fxdp: delta must be in (0, 1), got {delta!r}.")
    if len(accountant.history) == 0:
        return 0.0
    if any(float(sigma) == 0 for sigma, _, _ in accountant.history):
        return math.inf
    return float(accountant.get_epsilon(delta=float(delta)))


@dataclass(frozen=True)
class Sampling:
    """How a data loader draws batches, as far as accounting is concerned.

    Attributes:
        poisson: True for Poisson sampling (each example independently with ``sample_rate``).
        sample_rate: q (Poisson), or batch_size / dataset size otherwise (informative only).
        expected_batch_size: q * (examples this process samples from), or the fixed batch size.
        adjacency: "add/remove" (Poisson) or "replace-one" (fixed-size batches).
        steps_per_epoch: the loader's length (batches per pass).
    """

    poisson: bool
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int

    @property
    def adjacency(self) -> str:
        return "add/remove" if self.poisson else "replace-one"


def sampling_of(data_loader) -> Sampling:
    """Read the sampling scheme from the loader's actual batch sampler (see the module docstring).

    Raises:
        PrivacyError: a sampler that may repeat an example within a batch, or one whose
            scheme is unknown; an ``IterableDataset``.
    """
    if isinstance(getattr(data_loader, "dataset", None), IterableDataset):
        raise PrivacyError("fxdp: an IterableDataset has no sampling rate fxdp can account for; use a map-style "
                           "dataset with Poisson sampling.")
    sampler = getattr(data_loader, "batch_sampler", None)
    while isinstance(sampler, BatchSplittingSampler):
        sampler = sampler.sampler
    if isinstance(sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)):
        q = float(sampler.sample_rate)
        _check_rate(q)
        return Sampling(True, q, q * sampler.num_samples, len(sampler))
    sampler = getattr(sampler, "inner", sampler)  # fxdp's recording / epoch-marking wrappers
    sampler = getattr(sampler, "inner", sampler)
    if isinstance(sampler, BatchSampler):
        inner = sampler.sampler
        n = len(inner.indices) if isinstance(inner, SubsetRandomSampler) else len(data_loader.dataset)
        uses_each_once = isinstance(inner, (SequentialSampler, SubsetRandomSampler)) or (
            isinstance(inner, RandomSampler) and not inner.replacement and inner.num_samples <= n)
        if uses_each_once:
            return Sampling(False, min(1.0, sampler.batch_size / n), float(sampler.batch_size), len(sampler))
        raise PrivacyError(
            f"fxdp: the data loader samples with {type(inner).__name__}"
            f"{' (with replacement)' if getattr(inner, 'replacement', False) else ''}: an example may appear "
            "several times in one batch, so neither its sensitivity nor the sampling rate is what the accountant "
            "assumes. Use Poisson sampling (poisson_sampling=True / opacus.data_loader.DPDataLoader).")
    raise PrivacyError(
        f"fxdp: unknown batch sampler {type(sampler).__name__}; fxdp cannot tell how batches are drawn and "
        "refuses to guess the sampling rate. Use Poisson sampling (opacus.data_loader.DPDataLoader).")


class PoissonCharge:
    """Step hook: one Poisson-subsampled Gaussian mechanism per optimizer step at the current σ."""

    def __init__(self, accountant: IAccountant, sample_rate: float):
        _check_rate(sample_rate)
        self.accountant = accountant
        self.sample_rate = float(sample_rate)

    def __call__(self, optimizer) -> None:
        self.accountant.step(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=self.sample_rate)


def attach_accountant(optimizer, accountant: IAccountant, sample_rate: float) -> PoissonCharge:
    """Charge ``accountant`` one Poisson-subsampled Gaussian step at rate ``sample_rate`` after every
    step of ``optimizer`` (a :class:`~fxdp.training.optimizer.DPOptimizer`), at its σ of that step."""
    charge = PoissonCharge(accountant, sample_rate)
    optimizer.attach_step_hook(charge)
    return charge


class EpochMarkingBatchSampler(BatchSampler):
    """A fixed-size batch sampler that tells its :class:`EpochCharge` when a new pass
    over the data (a new iterator) starts; batches are those of ``inner``."""

    def __init__(self, inner: BatchSampler, charge: "EpochCharge"):
        super().__init__(inner.sampler, inner.batch_size, inner.drop_last)
        self.inner, self.charge = inner, charge

    def __iter__(self):
        self.charge.start_epoch()
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


class EpochCharge:
    """Step hook for samplers that use each example at most once per pass over the
    data: one full-batch Gaussian mechanism (q = 1) of sensitivity 2R (replace-one
    adjacency, module docstring), i.e. noise multiplier σ/2, at the first step after each
    new pass starts (signalled by :class:`EpochMarkingBatchSampler`), however many
    steps or accumulated batches the pass has, and however early it is cut short.

    The σ of a pass must not drop inside it (a lower σ later in the pass would not
    have been charged): that raises PrivacyError.
    """

    def __init__(self, accountant: IAccountant):
        self.accountant = accountant
        self.pending = False
        self.epoch_sigma: Optional[float] = None

    def start_epoch(self) -> None:
        self.pending = True

    def __call__(self, optimizer) -> None:
        sigma = float(optimizer.noise_multiplier)
        if self.pending or self.epoch_sigma is None:
            self.accountant.step(noise_multiplier=sigma / REPLACE_ONE_SENSITIVITY, sample_rate=1.0)
            self.epoch_sigma, self.pending = sigma, False
        elif sigma < self.epoch_sigma:
            raise PrivacyError("fxdp: the noise multiplier dropped inside an epoch of non-Poisson batches; the epoch "
                               f"was charged at σ={self.epoch_sigma}. Change σ only at epoch boundaries.")

    def state_dict(self) -> dict:
        return {"pending": self.pending, "epoch_sigma": self.epoch_sigma}

    def load_state_dict(self, state: dict) -> None:
        self.pending = bool(state.get("pending", False))
        self.epoch_sigma = state["epoch_sigma"]


def mark_epochs(data_loader, charge: EpochCharge):
    """The same loader (dataset, collate, workers, ...) with its batch sampler
    wrapped so that each new pass over it signals ``charge`` (a
    :class:`~fxdp.training.loaders.FixedBatchLoader`, which also reports its batch sizes)."""
    from fxdp.training.loaders import FixedBatchLoader, loader_options

    return FixedBatchLoader(data_loader.dataset,
                            batch_sampler=EpochMarkingBatchSampler(data_loader.batch_sampler, charge),
                            **loader_options(data_loader))


def _check_rate(q):
    try:
        v = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"fxdp: sample_rate must be a number in (0, 1], got {q!r}.") from None
    if not (0 < v <= 1):
        raise ValueError(f"fxdp: sample_rate must be in (0, 1], got {q!r}.")
