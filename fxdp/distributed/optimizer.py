"""DistributedDPOptimizer: one noised update per global logical batch, the same on every rank.

A subclass of :class:`fxdp.DPOptimizer` (all of its guarantees and refusals
hold); at each real (non-skipped) step, before the noise and the scaling, it

1. checks, collectively, that every rank has its private gradients, the same
   gradient layout, the same σ and the same optimizer hyperparameters (a
   scheduler stepped on one rank only) (:func:`fxdp.distributed.agreement.agree`):
   one rank's failure raises on every rank instead of leaving the others waiting;
2. has rank 0 of the group add the noise of std σ·R to its own share, then
   sums the shares over the ranks in flat buckets
   (:func:`fxdp.distributed.buckets.reduce_private_grads`);
3. lets :class:`DPOptimizer` divide by ``expected_batch_size`` -- which must be
   the GLOBAL expected batch size q·N -- add public gradients, and step the
   inner optimizer.

It does so by overriding the named steps of :meth:`DPOptimizer.release`
(``check``, ``add_noise``, ``reduce``), nothing private: the noise is drawn
by rank 0 only, before the reduction, so it is never added twice.

Every rank therefore applies the same update; only rank 0's noise generator
is ever used (in secure mode it is re-seeded from OS entropy every step), and
a checkpoint of rank 0's optimizer carries the whole noise stream. With the
same generator, the noise equals the single-process DPOptimizer's draw for
the same parameters, so a W-rank run reproduces a one-process run on the same
global batches, noise included, up to floating-point summation order.

Gradient accumulation (``fxdp.BatchMemoryManager``, skipped steps) accumulates
locally; the ranks communicate once per logical batch, whatever the number of
micro-batches on each rank.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from fxdp.core.errors import PrivacyError
from fxdp.training.optimizer import DPOptimizer
from fxdp.distributed.agreement import PeerRankError, agree, digest
from fxdp.distributed.buckets import layout_digest, reduce_private_grads


class DistributedDPOptimizer(DPOptimizer):
    """:class:`fxdp.DPOptimizer` for data-parallel training (module docstring).

    Args (besides DPOptimizer's; ``expected_batch_size`` is the global one):
        process_group: the group whose ranks share the logical batch (None: the default group).
        bucket_cap_mb: size limit of the flat all-reduce buckets, in MiB.
    """

    def __init__(self, optimizer, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: Optional[float] = None, loss_reduction="mean", generator=None,
                 secure_mode: bool = False, *, public_grads: str = "refuse", process_group=None, bucket_cap_mb: float = 25.0,
                 adaptive_clipping=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("fxdp: DistributedDPOptimizer needs an initialised torch.distributed process group "
                             "(torch.distributed.init_process_group); in one process use fxdp.DPOptimizer.")
        if not float(bucket_cap_mb) > 0:
            raise ValueError(f"fxdp: bucket_cap_mb must be positive, got {bucket_cap_mb!r}.")
        super().__init__(optimizer, noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction,
                         generator, secure_mode, public_grads=public_grads, adaptive_clipping=adaptive_clipping)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.bucket_cap_bytes = int(float(bucket_cap_mb) * 2 ** 20)
        self.last_num_buckets = 0
        self._in_reduction = False

    def __repr__(self):
        return f"Distributed{super().__repr__()[:-1]},\n  rank={self.rank}, world_size={self.world_size})"

    def step(self, closure=None):
        """DPOptimizer.step with the cross-rank sum; an error raised on one rank before the
        reduction (e.g. more than one Poisson batch drawn) is reported to the others."""
        self._in_reduction = False
        try:
            return super().step(closure)
        except Exception as exc:
            if not self._in_reduction and not isinstance(exc, PeerRankError):
                agree(exc, "optimizer.step()", group=self.process_group)
            raise

    def check(self, params):
        """Every rank's own checks, then one collective agreement: a refusal on any rank raises on all,
        and the ranks must share the gradient layout, σ and the optimizer's hyperparameters."""
        self._in_reduction = True
        error, public = None, {}
        try:
            self._check_local(params)
            public = super().check(params)
        except PrivacyError as exc:
            error = exc
        agree(error, "optimizer.step()", self._step_digest(params), self.process_group)
        return public

    def add_noise(self, params, grads) -> None:
        """Rank 0 of the group adds the whole noise to its share; the sum then carries it exactly once."""
        if self.rank == 0:
            super().add_noise(params, grads)

    def reduce(self, params, grads) -> None:
        """Sum the (noised) shares over the ranks in flat buckets; every rank receives the same sum (and,
        under adaptive clipping, the same centred unclipped count, so every rank learns the same R)."""
        self.last_num_buckets = reduce_private_grads(params, grads, group=self.process_group,
                                                     bucket_cap_bytes=self.bucket_cap_bytes)
        if self.unclipped_count is not None:
            dist.all_reduce(self.unclipped_count, group=self.process_group)

    def _step_digest(self, params) -> int:
        """What every rank must share at each step: the gradient layout, σ and the optimizer's
        hyperparameters (a noise or LR scheduler stepped on one rank only is caught here)."""
        hyper = [sorted((k, repr(v)) for k, v in g.items() if k != "params") for g in self.param_groups]
        return digest(f"{layout_digest(params)} {self.noise_multiplier!r} {self.max_grad_norm!r} {hyper!r}")

    def _check_local(self, params) -> None:
        missing = [self._name(p) for p in params if getattr(p, "private_grad", None) is None]
        if len(missing) == len(params):
            raise PrivacyError(
                "fxdp: step() without any private gradient since the last step on this rank. Every rank must run "
                "a forward and backward pass of the privatized model on its local batch (an empty batch too) "
                "before each step.")
        if missing:
            raise PrivacyError(
                f"fxdp: {len(missing)} trainable parameter(s) have no private gradient on this rank while others "
                f"do: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Is every parameter of the "
                "optimizer part of the privatized model?")
