"""Sample mixing in the forward that actually ran, not only in the analysed one.

The analysis (:mod:`fxdp.analysis.sample_mixing`) probes a few samples numerically: it replaces
one sample and checks that the others' values do not move. That misses mixing the probe does not
trigger -- a min-max scaling over the whole batch (``x.min()``, ``x.max()`` with no dim) when the
replaced sample holds no extreme, a branch taken only for larger batches (``if B > 3``) or for
some values (``if cond: h = h + h.sum(0)``), mixing only in rows beyond the probed samples
(``h[4:] + h[:1]``), mixup switched on after the first forward (the analysis is cached per input
structure). Two checks of every eager training forward close these:

1. Structural (:class:`MixingMonitor`, a ``TorchFunctionMode`` on top of the interceptor): every
   tensor derived from the batched inputs is tracked through the ops that actually ran, with
   *where its batch dimension is* (:mod:`fxdp.analysis.batch_dims`: elementwise and broadcast ops
   with rank shifts, view / reshape / flatten / unflatten while the batch stays the leading factor
   of a dimension, permute / transpose / movedim, (un)squeeze, matmul / linear / conv / bmm /
   einsum batch dimensions, softmax and norms along other dims, pooling, embedding, attention,
   indexing along other dims). When B >= 2, an op on a floating-point batch-derived tensor is
   refused (``SampleMixingError``, naming the op, the dim and what to do) if it reduces along the
   batch dimension (sum, mean, max, std, norm, logsumexp, cumsum, sort, topk, argmax, softmax ...),
   slices or indexes it other than by the identity (``:`` or ``arange(B)``), gathers / rolls /
   flips / splits / concatenates / repeats rows along it, contracts it (``h.T @ h``), or
   normalises / convolves / attends across it. A full reduction (no ``dim``) of such a tensor is
   refused whether or not its batch position is known.
2. Re-validation: the monitor hashes the sequence of the forward's mixing-relevant torch calls
   (reductions, indexing, reordering, contractions, random indices: :data:`MIXING_RELEVANT`). The analysis's
   base run is hashed the same way (:func:`fxdp.analysis.capture.probe_run`); a training forward
   whose sequence differs (another branch, mixup switched on) is analysed again on *all* its
   samples before its backward can run, and the sequence is remembered as validated for that
   input structure (:func:`fxdp.engine.forward_checks.revalidate_sequence`).

Not refused: boolean / integer tensors (masks, counts, indices: no gradient), reduced losses
(``F.cross_entropy(..., reduction="mean")``: the training loss), BatchNorm (refused in training
mode by the interceptor, per channel with running statistics).

Ops without a rule. An op that :data:`~fxdp.analysis.batch_dims.RULES` does not know (a custom kernel,
``masked_scatter``, ``torch.histc``), or whose rule cannot read the call, and that gets a tensor whose
batch position is known and returns a floating-point tensor, is refused
(:func:`~fxdp.analysis.batch_dims.untracked`; a short allow-list of ops proven per-sample is exempt):
behind it the position would be unknown, and mixing there gated on the batch size (``if B > 3``) is
seen by neither check (a review measured up to 3.3 R through ``embedding_bag``, ``F.linear`` with a
batch-derived weight, ``h.t().reshape(h.shape)``, writes into a fresh tensor, pooling / ``fft`` /
``trapezoid`` / ``cdist`` / ``linalg.solve`` across the batch, ``sum_to_size``, ``h[None] * h[:, None]``:
each now has a rule that follows its per-sample uses and refuses the batch dimension being touched).

Limits: the position is still lost, without a refusal, where a rule cannot represent it but the op is
per-sample or known only to be routed: rows of a ``(B*T, d)`` tensor selected by an index computed from
the batch (mixture-of-experts token routing), seq-first rows merged behind the time dimension
(``(T, B, d).reshape(T*B, d)``) or a split of the batch dimension, a reduced training loss, an input
whose position is already unknown. For such tensors and everything derived from them only the full-reduction refusal and
the numeric probe / re-validation above apply. Integer and boolean results of ops without a rule are
not refused (no gradient). Values leaving the tracked graph (``.item()``, ``.tolist()``, Python
control flow on values) are not followed: a branch they select is covered by re-validation of the call
sequence.
"""
from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fxdp.analysis.autograd_hooks import refuse_saved_tensor_hooks
from fxdp.analysis.batch_dims import RULES, fresh_ops, rule_key, untracked
from fxdp.analysis.batch_rules import ABSENT, Mixing, Untracked
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
MASK_FULL_REDUCTIONS = {torch.any, T.any, torch.all, T.all, torch.count_nonzero, T.count_nonzero}
_FRESH = fresh_ops()
_top_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks


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
    """Tracks batch-derived tensors and their batch dimension, and hashes the call sequence of one
    forward (module docstring), and refuses, at every call, user saved-tensor hooks found on top of torch's
    stack (:func:`fxdp.analysis.autograd_hooks.refuse_saved_tensor_hooks`). ``batch_dims[i]`` is the batch
    dimension of ``batch_inputs[i]`` (None: unknown); ``strict`` re-raises a failing propagation rule (tests)
    instead of losing the position."""

    KEEP = object()

    def __init__(self, batch_inputs=(), batch_size: int = 0, structural: bool = True, batch_dims=None,
                 strict: bool = False):
        super().__init__()
        self.B = batch_size
        self.batch_size = batch_size
        self.structural = structural and batch_size >= 2
        self.strict = strict
        self.signature = 0
        self.calls = 0
        self._derived = weakref.WeakValueDictionary()
        self._places = {}
        self._any_held = 0
        dims = list(batch_dims) if batch_dims is not None else [None] * len(batch_inputs)
        for t, d in zip(batch_inputs, dims):
            if isinstance(t, torch.Tensor):
                ok = d is not None and 0 <= d < t.dim() and t.shape[d] == batch_size
                self.set(t, (d, 1) if ok else None)

    # ---------------------------------------------------------- the context the rules see
    def place(self, t):
        """ABSENT (not derived from the batch), None (derived, position unknown) or (dim, k)."""
        if isinstance(t, torch.Tensor) and self._derived.get(id(t)) is t:
            return self._places.get(id(t))
        return ABSENT

    def set(self, t, place) -> None:
        self._derived[id(t)] = t
        self._places[id(t)] = place

    def mix(self, t, what: str):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            raise Mixing(what, t.requires_grad)
        return None

    def _is_derived(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._derived.get(id(t)) is t

    # --------------------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _top_saved_hooks(False) is not None:
            refuse_saved_tensor_hooks()
        if func in MIXING_RELEVANT:
            self.signature = hash((self.signature, func))
            self.calls += 1
        out = func(*args, **kwargs)
        if not self.structural:
            return out
        flat = not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args)
        leaves = args if flat else tree_flatten((args, kwargs))[0]
        if not any(self._is_derived(t) for t in leaves):
            return out
        with torch._C.DisableTorchFunction():
            self._propagate(func, args, kwargs, out)
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", str(func))
        if func in LEAVING and isinstance(args[0], torch.Tensor) and self._is_derived(args[0]):
            _refuse_leaving(name, args[0], self.place(args[0]))
        if (_is_full_reduction(func, args, kwargs) or func in MASK_FULL_REDUCTIONS and len(args) == 1
                and kwargs.get("dim") is None) and isinstance(args[0], torch.Tensor) \
                and self._is_derived(args[0]) and not args[0].is_floating_point() and args[0].numel() > 1:
            self._hold_outputs(out, _message(name, "reduces a mask or count computed from the batch over all its "
                                             "elements, across the batch dimension", self.B))
            return
        if _is_full_reduction(func, args, kwargs) and isinstance(args[0], torch.Tensor) \
                and self._is_derived(args[0]) and args[0].is_floating_point() and args[0].numel() > 1:
            raise SampleMixingError(
                f"fxdp: {name} reduces a tensor computed from the batch over all its "
                "elements, across the batch dimension (e.g. min-max scaling with x.min() / x.max() over the "
                "whole batch), so each sample's output depends on the other samples and per-sample clipping "
                "bounds nothing. Reduce over each sample's own dimensions (x.amin(dim=(1, 2), keepdim=True)) "
                "or normalise with statistics of public data.")
        if func in _FRESH:
            return
        held = self._held(args, kwargs)
        if held is not None:
            place = held
        else:
            place = self._rule_place(func, name, args, kwargs, out)
        if place is self.KEEP:
            return
        outs = [out] if isinstance(out, torch.Tensor) else [t for t in tree_flatten(out)[0]
                                                             if isinstance(t, torch.Tensor)]
        places = place if isinstance(place, list) else [place] * len(outs)
        for t, pl in zip(outs, places):
            self.set(t, pl if _fits(t, pl, self.B) else None)


    def _rule_place(self, func, name, args, kwargs, out):
        rule = RULES.get(rule_key(func), untracked)
        try:
            try:
                return rule(self, func, args, kwargs, out)
            except Mixing:
                raise
            except Exception:
                if self.strict:
                    raise
                return untracked(self, func, args, kwargs, out)  # a rule that cannot read this call
        except Mixing as m:
            build = _untracked_message if isinstance(m, Untracked) else _message
            if torch.is_grad_enabled() and m.requires_grad:
                raise SampleMixingError(build(name, m.what, self.B)) from None
            # on a tensor without gradient (detached, under no_grad: statistics for a buffer, a copy of
            # an example): held, and refused when the result meets per-sample values or enters the
            # differentiated computation; not when it only feeds a buffer (BufferWatch names that)
            self._any_held += 1
            how = " (under torch.no_grad)" if not torch.is_grad_enabled() else " (on a tensor without gradient)"
            return _Held(build(name, m.what + how, self.B), self._any_held)

    def _hold_outputs(self, out, message: str) -> None:
        self._any_held += 1
        for t in ([out] if isinstance(out, torch.Tensor) else tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor):
                self.set(t, _Held(message, self._any_held))

    def _held(self, args, kwargs):
        """The held mixing result among the inputs: refused if it meets a tensor with a batch place."""
        if not self._any_held:
            return None
        leaves = tree_flatten((args, kwargs))[0]
        places = [self.place(t) for t in leaves if isinstance(t, torch.Tensor)]
        held = min((p for p in places if isinstance(p, _Held)), key=lambda h: h.order, default=None)
        if held is not None and (any(isinstance(p, tuple) for p in places)
                                 or any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)):
            raise SampleMixingError(held.message)
        return held


# Values leaving torch (to Python or NumPy), where the tracking cannot follow them.
# (Storage access is not: it serves identity checks -- data_ptr, untyped_storage -- more than values.)
LEAVING = {T.numpy, T.tolist, T.item, T.__float__, T.__int__, T.__index__, T.__array__, T.__dlpack__,
           T.__format__, T.__repr__}


def _refuse_leaving(name: str, t: torch.Tensor, place) -> None:
    """A floating-point value computed from the batch taken out of torch (``x.detach().numpy()``,
    ``tolist()``, ``item()``, ``float(x)``) can steer every sample's computation from Python (min-max
    scaling with NumPy: 2.1 R): refused in a training forward. (Python control flow on ``bool(t)``
    is not followed: masks are tested that way, ``if torch.all(mask == 1)``.)"""
    if isinstance(place, _Held):
        raise SampleMixingError(place.message + f" (and {name}() takes the mixed value out of torch)")
    if not (t.is_floating_point() or t.is_complex()):
        return
    raise SampleMixingError(
        f"fxdp: {name}() takes a floating-point value computed from the batch out of torch inside the privatized "
        "forward; fxdp cannot follow it there, and a statistic of the batch computed in Python or NumPy (a min-max "
        "scaling, a threshold) would make each sample's output depend on the other samples. Compute it with "
        "torch ops along each sample's own dimensions, or outside the model from public data.")


class _Held:
    """The place of a value mixed across the batch under no_grad (see ``_rule_place``)."""

    def __init__(self, message: str, order: int):
        self.message, self.order = message, order  # order: the earliest held op is the one reported


def _fits(t, place, B) -> bool:
    if isinstance(place, _Held):
        return True
    if place is None or place is ABSENT:
        return False
    bd, k = place
    return 0 <= bd < t.dim() and k >= 1 and t.shape[bd] == B * k


def _message(name: str, what: str, B: int) -> str:
    return (f"fxdp: samples are mixed in the training forward: {name} {what} (batch of {B}), so one sample's "
            "output depends on other samples and per-sample clipping bounds nothing; each sample's output must "
            "depend on that sample only. Compute it per sample: reduce, index, sort and normalise along each "
            "sample's own dimensions (dim >= 1 for batch-first tensors), loop over samples outside the model, "
            "and mix examples (mixup) in the data pipeline, not inside the privatized forward. If several rows "
            "of the batch are one example or one user, declare them one privacy unit "
            "(with fxdp.privacy_units(model, ids=...) or views=K) instead of mixing them inside the model.")


def _untracked_message(name: str, what: str, B: int) -> str:
    return (f"fxdp: {name} {what} in the training forward (batch of {B}), and fxdp has no rule for where the samples "
            "go through it: it cannot tell whether the op mixes samples (pooling, an FFT, a solve or a custom kernel "
            "across the batch), and mixing there, gated on the batch size, would escape per-sample clipping, so the "
            "forward is refused. Express the computation with torch ops fxdp follows along each sample's own "
            "dimensions (reshape / permute keeping the batch dimension, reductions and transforms over dim >= 1, "
            "matmul, indexing), or apply the op outside the privatized model to public data; if the op is per-sample, "
            "report it so that a batch-dimension rule can be added (fxdp.analysis.batch_dims).")
