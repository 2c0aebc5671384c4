"""Sample mixing in the forward that actually ran, not only in the analysed one.

The analysis (:mod:`fxdp.analysis.sample_mixing`) probes a few samples numerically: it replaces
one sample and checks that the others' values do not move. That misses mixing the probe does not
trigger -- a min-max scaling over the whole batch (``x.min()``, ``x.max()`` with no dim) when the
replaced sample holds no extreme, a branch taken only for larger batches (``if B > 3``), mixup
switched on after the first forward (the analysis is cached per input structure). Two checks of
every eager training forward close these:

1. Structural (:class:`MixingMonitor`, a ``TorchFunctionMode`` on top of the interceptor): the
   tensors derived from the batched inputs are tracked through every op; a full reduction (no
   ``dim``: sum, mean, min, max, std, norm, ...) of such a floating-point tensor reduces across the
   batch dimension whatever the values, and is refused (``SampleMixingError``) when B >= 2.
2. Re-validation: the monitor hashes the sequence of the forward's mixing-relevant torch calls
   (reductions, indexing, reordering, contractions, random indices: :data:`MIXING_RELEVANT`). The analysis's
   base run is hashed the same way (:func:`fxdp.analysis.capture.probe_run`); a training forward
   whose sequence differs (another branch, mixup switched on) is analysed again on *all* its
   samples before its backward can run, and the sequence is remembered as validated for that
   input structure (:func:`fxdp.engine.forward_checks.revalidate_sequence`).

Reductions with a ``dim`` that includes the batch dimension (``x.mean(0)``) are left to the
numeric probe, which sees them for any sample. Boolean / integer reductions (mask counts, ``any``)
are not refused: they carry no gradient.
"""
from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fxdp.core.errors import SampleMixingError

T = torch.Tensor
FULL_REDUCTIONS = {
    torch.sum, T.sum, torch.mean, T.mean, torch.nansum, T.nansum, torch.nanmean, T.nanmean,
    torch.min, T.min, torch.max, T.max, torch.amin, T.amin, torch.amax, T.amax, torch.aminmax, T.aminmax,
    torch.std, T.std, torch.var, T.var, torch.std_mean, torch.var_mean, torch.norm, T.norm,
    torch.linalg.norm, torch.linalg.vector_norm, torch.median, T.median, torch.nanmedian, T.nanmedian,
    torch.prod, T.prod, torch.logsumexp, T.logsumexp, torch.quantile, T.quantile, torch.nanquantile,
    T.nanquantile, torch.mode, T.mode,
}
DIM_KEYS = ("dim", "axis")


def _ops(*names):
    out = set()
    for n in names:
        for owner in (torch, T, torch.nn.functional):
            f = getattr(owner, n, None)
            if f is not None:
                out.add(f)
    return out


# The calls that can move values across the batch dimension (reductions, indexing, reordering,
# contractions, random indices): the re-validation signature is the sequence of these, so that
# a forward hook calling ``detach`` or ``register_hook`` does not count as another path.
MIXING_RELEVANT = FULL_REDUCTIONS | _ops(
    "cumsum", "cumprod", "cummax", "cummin", "softmax", "log_softmax", "argmax", "argmin", "all", "any",
    "count_nonzero", "__getitem__", "__setitem__", "index_select", "gather", "scatter", "scatter_add", "scatter_",
    "scatter_add_", "scatter_reduce", "index_add", "index_add_", "index_copy", "index_put", "index_put_",
    "index_fill", "masked_select", "masked_scatter", "take", "take_along_dim", "roll", "flip", "sort", "argsort",
    "topk", "kthvalue", "unique", "randperm", "randint", "multinomial", "cat", "concat", "stack", "split",
    "chunk", "unbind", "matmul", "mm", "bmm", "einsum", "tensordot", "permute", "transpose", "t", "movedim",
    "swapaxes", "expand", "expand_as", "repeat", "repeat_interleave", "tile", "where", "nonzero", "linear",
    "batch_norm", "instance_norm", "layer_norm", "group_norm", "scaled_dot_product_attention", "embedding",
    "conv1d", "conv2d", "conv3d", "pad", "interpolate", "unfold", "fold")


def _is_full_reduction(func, args, kwargs) -> bool:
    if func not in FULL_REDUCTIONS or any(kwargs.get(k) is not None for k in DIM_KEYS):
        return False
    rest = args[1:]
    if func in (torch.quantile, T.quantile, torch.nanquantile, T.nanquantile):
        rest = args[2:]
    if func in (torch.norm, T.norm, torch.linalg.norm, torch.linalg.vector_norm):
        rest = args[2:]  # the second argument is the order p
    # a binary min/max (torch.max(a, b)) or a dim given positionally is not a full reduction
    return not any(isinstance(a, (int, torch.Tensor, tuple, list)) and not isinstance(a, bool) for a in rest)


class MixingMonitor(TorchFunctionMode):
    """Tracks batch-derived tensors and hashes the call sequence of one forward (module docstring)."""

    def __init__(self, batch_inputs=(), batch_size: int = 0, structural: bool = True):
        super().__init__()
        self.batch_size = batch_size
        self.structural = structural and batch_size >= 2
        self.signature = 0
        self.calls = 0
        self._derived = weakref.WeakValueDictionary()
        for t in batch_inputs:
            if isinstance(t, torch.Tensor):
                self._derived[id(t)] = t

    def _is_derived(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._derived.get(id(t)) is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MIXING_RELEVANT:
            self.signature = hash((self.signature, func))
            self.calls += 1
        out = func(*args, **kwargs)
        if not self.structural:
            return out
        flat = not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args)
        leaves = args if flat else tree_flatten((args, kwargs))[0]
        if any(self._is_derived(t) for t in leaves):
            if _is_full_reduction(func, args, kwargs) and isinstance(args[0], torch.Tensor) \
                    and self._is_derived(args[0]) and args[0].is_floating_point() and args[0].numel() > 1:
                raise SampleMixingError(
                    f"fxdp: {getattr(func, '__name__', func)} reduces a tensor computed from the batch over all its "
                    "elements, across the batch dimension (e.g. min-max scaling with x.min() / x.max() over the "
                    "whole batch), so each sample's output depends on the other samples and per-sample clipping "
                    "bounds nothing. Reduce over each sample's own dimensions (x.amin(dim=(1, 2), keepdim=True)) "
                    "or normalise with statistics of public data.")
            for t in ((out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]):
                if isinstance(t, torch.Tensor):
                    self._derived[id(t)] = t
        return out
