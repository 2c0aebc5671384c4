"""Activation checkpointing (``torch.utils.checkpoint``, HF ``gradient_checkpointing_enable``) in eager
private forwards: taps made once per real use, by the forward; recomputations replay them.

The recomputation that a checkpoint runs in backward happens outside the private forward (no
interceptor, no mixing monitor is active then). Each region is therefore *replayed*: the function the
checkpoint will re-run is wrapped, once, when the first call of the forward inside the region is
intercepted (any call, with or without a parameter: a reentrant ``CheckpointFunction.forward`` always
makes one, entering ``torch.no_grad``; a non-reentrant region whose forward makes none saves no tensor, so
backward never recomputes it), so that it runs under fxdp's interceptor with a replay recorder.
What the replay checks, against what the forward recorded for the region (calls in regions nested in it
excluded: they are their own regions):

1. **Parameter uses**: every use of a trainable parameter is bound, in order, to the tap record
   (:class:`~fxdp.engine.tap.LayerUse`) the forward made for it; another op, other parameters, or a use
   the forward did not make (also in a region whose forward used no parameter at all) is refused
   (``PrivacyError``), and a reentrant re-run that makes fewer uses than the forward too.
2. **Mixing-relevant calls**: the forward ran under the structural sample-mixing monitor
   (:mod:`fxdp.analysis.mixing_monitor`); the recomputation does not. The forward records the sequence of
   the region's calls in :data:`~fxdp.analysis.mixing_monitor.MIXING_RELEVANT` (reductions, indexing,
   reordering, contractions, ...) with their non-tensor arguments (dims, indices, slices) and their
   tensor arguments' shapes (:func:`mixing_key`); the recomputation's sequence must be the same, call by
   call (a non-reentrant recomputation may stop early: a prefix), else ``SampleMixingError`` (state
   changed between forward and backward, e.g. a per-batch centering switched on, a reduction moved to
   the batch dim, an index / permutation / mask tensor with other contents). Integer and boolean tensor
   arguments are compared by two checksums (a sum and a position-weighted sum), not element by element;
   above 65536 elements (attention masks) by the memory they are read from and its version, else by their
   sum only (a permutation of such a large index tensor, computed anew, is not seen).
   Not compared: elementwise calls and the *values* of floating-point tensor arguments (those of the
   recomputation are what the forward's ops recompute; a different float computed by an elementwise
   op, e.g. a changed scale, is covered only where it changes the parameter uses or the sequence).

- **Non-reentrant** (``use_reentrant=False``, HF's default): the forward's taps keep their operands
  as autograd saved tensors only (``LayerUse.checkpointed``), so the checkpoint drops them after the
  forward like every other activation of the region. The replay re-applies each tap in the same mode
  on a throw-away record, so the checkpoint's recomputation saves the same tensors in the same order;
  the forward's tap then receives them when its backward unpacks them. The replay's outputs are never
  backpropagated, so nothing is collected twice.
- **Reentrant** (``use_reentrant=True``): the forward runs without grad mode, so its parameter uses are
  bound and *reserved* (a record with its call-site ordinal and batch layout, no tap). The re-run in
  backward applies the real taps on those records, in order; the nested backward the checkpoint then
  runs delivers their output gradients, which the engine attributes to the outer backward pass
  (``LayerUse.backward_task``), finalized once at its end. A reentrant region with parameter uses none
  of whose tensor inputs requires grad is refused at the forward (``UncoveredParameterError``): torch
  skips its backward, so its reserved taps would never fire and its parameters would silently get no
  gradient (use ``use_reentrant=False`` or make an input require grad).

What BK ghost clipping needs at the end of backward -- each tapped op's input and output gradient --
is still held until the clipped sums are formed; the activations between taps (attention scores,
MLP hidden states before the activation function, dropout masks, norm statistics) are not.
Limitations (refused): parameters transformed before they meet the batch (virtual parameters) inside
a region; a checkpoint nested in a reentrant region; a region whose recomputation differs from its
forward as above.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten

from fxdp.analysis.checkpointing import checkpoint_frame, innermost_checkpoint, reentrant_inputs_require_grad
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.analysis.mixing_monitor import MIXING_RELEVANT
from fxdp.core.errors import PrivacyError, SampleMixingError, UncoveredParameterError
from fxdp.engine import forward_checks
from fxdp.engine.tap import LayerUse, TapFunction


def unique_tensors(call) -> list:
    tensors, seen = [], set()
    for t in tree_flatten((call.args, call.kwargs))[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    return tensors


def lift_operand(call, binding, batch_size: int) -> None:
    """Position ids of shape (1, T) expanded over the batch (what the analysis planned at this site)."""
    src = binding.layout_source
    lifted = src.expand(batch_size, *src.shape[1:])
    call.args = tuple(lifted if a is src else a for a in call.args)
    call.kwargs = {k: (lifted if v is src else v) for k, v in call.kwargs.items()}
    binding.saved = {k: (lifted if v is src else v) for k, v in binding.saved.items()}
    binding.layout_source = lifted


class _Contents:
    """The contents of an integer / boolean tensor argument (an index, a permutation, a mask): up to
    ``SMALL`` elements, two checksums (a sum and a position-weighted sum); larger ones (attention masks), the
    memory they are read from and its version counter (equal: the same, unmodified memory), else their sum.
    Checksums stay on the tensor's device: no synchronisation in the forward."""

    SMALL = 1 << 16
    __hash__ = None

    def __init__(self, t: torch.Tensor):
        with torch._C.DisableTorchFunction(), torch.no_grad():
            self.where = None
            if t.numel() <= self.SMALL:
                flat = t.reshape(-1).to(torch.int64)
                weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
                self.sums = torch.stack([flat.sum(), (flat * weights).sum()])
                return
            try:
                self.where = (t.data_ptr(), tuple(t.stride()), t.storage_offset(), t._version)
            except RuntimeError:  # no strided storage
                pass
            self.sums = t.sum(dtype=torch.int64).reshape(1)

    def __eq__(self, other):
        if not isinstance(other, _Contents):
            return NotImplemented
        if self.where is not None and self.where == other.where:
            return True
        with torch._C.DisableTorchFunction():
            return self.sums.device == other.sums.device and self.sums.shape == other.sums.shape \
                and bool(torch.equal(self.sums, other.sums))


def _plain(a):
    if isinstance(a, torch.Tensor):
        if a.is_floating_point() or a.is_complex():
            return ("tensor", tuple(a.shape), a.dtype)
        return ("tensor", tuple(a.shape), a.dtype, _Contents(a))
    if isinstance(a, slice):
        return ("slice", _plain(a.start), _plain(a.stop), _plain(a.step))
    if isinstance(a, (list, tuple)):
        return tuple(_plain(x) for x in a)
    if a is None or a is Ellipsis or isinstance(a, (bool, int, str, torch.dtype, torch.device)):
        return a
    if isinstance(a, float):
        return repr(a)  # nan compares equal to itself
    return type(a).__name__


def mixing_key(func, args, kwargs) -> tuple:
    """A mixing-relevant call (:data:`~fxdp.analysis.mixing_monitor.MIXING_RELEVANT`) as the replay compares
    it: the function, its non-tensor arguments (dims, indices, slices), its tensor arguments' shapes and
    dtypes, and the contents of its integer / boolean tensor arguments (checksums, :class:`_Contents`)."""
    return (func, _plain(tuple(args)), tuple(sorted((k, _plain(v)) for k, v in kwargs.items())))


class Region:
    """One checkpointed call in one forward: the tap records its parameter uses made, in order, and the
    mixing-relevant calls it made (:func:`mixing_key`), in order, outside regions nested in it."""

    def __init__(self, param_names: Dict[int, str], reentrant: bool, inputs_require_grad: bool = True):
        self.param_names = dict(param_names)
        self.reentrant = reentrant
        self.inputs_require_grad = inputs_require_grad
        self.uses: List[LayerUse] = []
        self.lifts: List[bool] = []
        self.mixing: List[tuple] = []

    def add(self, use: LayerUse, lift: bool) -> None:
        self.uses.append(use)
        self.lifts.append(bool(lift))

    def observe(self, func, args, kwargs) -> None:
        if func in MIXING_RELEVANT:
            self.mixing.append(mixing_key(func, args, kwargs))

    def replay(self, function, args, kwargs, recorder):
        interceptor = ParameterInterceptor(self.param_names, recorder)
        with forward_checks.open_forward(), interceptor:
            out = function(*args, **kwargs)
        recorder.done()
        return out


class _Replaying:
    """What a checkpoint re-runs in backward, wrapped: the original function under a replay recorder."""

    def __init__(self, function, region: Region):
        self.function = function
        self.region = region

    def __call__(self, *args, **kwargs):
        region = self.region
        if region.reentrant:
            return region.replay(self.function, args, kwargs, ReentrantReplay(region))
        return region.replay(self.function, args, kwargs, NonReentrantReplay(region))


def region_of(owner, param_names: Dict[int, str], reentrant: bool) -> Region:
    """The region of a checkpoint (``_CheckpointFrame`` or reentrant ``CheckpointFunction`` context), made
    and its re-run wrapped the first time a parameter is used inside it (the wrapper holds it, so the region
    lives exactly as long as the checkpoint's part of the autograd graph)."""
    attr = "run_function" if reentrant else "recompute_fn"
    function = getattr(owner, attr)
    if isinstance(function, _Replaying):
        return function.region
    region = Region(param_names, reentrant, reentrant_inputs_require_grad(owner) if reentrant else True)
    setattr(owner, attr, _Replaying(function, region))
    return region


def observe_forward_call(func, args, kwargs, param_names: Dict[int, str], reentrant: Optional[Region] = None) -> None:
    """Every call of a private forward: inside a checkpoint region, the region is made (so that its re-run is
    replayed, whether or not the forward used a parameter in it) and its mixing-relevant calls recorded.
    ``reentrant``: the reentrant region whose parameter use is being bound (in grad mode, as its re-run will
    be): the calls a rule decomposes that use into belong to it."""
    if reentrant is not None:
        reentrant.observe(func, args, kwargs)
        return
    found = innermost_checkpoint()
    if found is not None:
        region_of(found[0], param_names, found[1]).observe(func, args, kwargs)


def no_grad_input_refusal(names) -> UncoveredParameterError:
    names = tuple(sorted(set(names)))
    exc = UncoveredParameterError(
        f"fxdp: trainable parameter(s) {', '.join(names)} are used inside a reentrant torch.utils.checkpoint region "
        "(use_reentrant=True) none of whose inputs requires grad: torch skips the backward of such a region, so "
        "these parameters would silently get no gradient. Use use_reentrant=False, or make an input of the region "
        "require grad (HuggingFace: model.enable_input_require_grads()).")
    exc.param_names = names
    return exc


def current_region(param_names: Dict[int, str]) -> Optional[Region]:
    """The region of the non-reentrant checkpoint whose forward is running, or None outside any."""
    frame = checkpoint_frame()
    if frame is None:
        return None
    return region_of(frame, param_names, reentrant=False)


def checkpoint_virtual_refusal(call) -> UncoveredParameterError:
    names = ", ".join(sorted(set(call.trainable.values())))
    exc = UncoveredParameterError(
        f"fxdp: trainable parameter(s) {names} are transformed by {call.name} before they meet the batch, inside "
        "a torch.utils.checkpoint region; fxdp does not replay such virtual parameters in the recomputation yet. "
        "Move the transformation out of the checkpointed function, or disable checkpointing for this module.")
    exc.param_names = tuple(sorted(set(call.trainable.values())))
    return exc


class _Replay:
    """Recorder of a recomputation: parameter uses bound, in order, to the forward's records."""

    replays_checkpoints = True

    def __init__(self, region: Region):
        self.region = region
        self.next = 0
        self.mixing_next = 0
        self.plain = 0  # inside the no-grad forward of a reentrant checkpoint nested in this region

    def observe(self, func, args, kwargs, out) -> None:
        """The recomputation's own mixing-relevant calls must be the forward's, in order (a non-reentrant
        recomputation may stop early: a prefix)."""
        if func not in MIXING_RELEVANT or self.plain or innermost_checkpoint() is not None:
            return
        seq, k = self.region.mixing, self.mixing_next
        key = mixing_key(func, args, kwargs)
        if k >= len(seq) or seq[k] != key:
            was = "nothing (the forward made fewer)" if k >= len(seq) else _call_name(seq[k][0])
            raise SampleMixingError(
                f"fxdp: the recomputation of a torch.utils.checkpoint region differs from its forward in a call that "
                f"can mix samples: mixing-relevant call {k} of the region was {was} in the forward and is "
                f"{_call_name(func)} (or the same op with other arguments) in the recomputation (state changed "
                "between forward and backward?). The forward's sample-mixing checks do not cover the recomputation's "
                "values. Make the checkpointed function deterministic (no branch on data or on state changed "
                "between forward and backward).")
        self.mixing_next += 1

    def substitute(self, func, args, kwargs):
        return None

    def refuse(self, exc, func, args, kwargs, out=None):
        raise exc

    def virtual(self, call, interceptor):
        return None  # the forward refused virtual parameters inside checkpoint regions

    @contextlib.contextmanager
    def reentrant(self, owner):
        """A reentrant checkpoint nested in the region, made again by its re-run (see the subclasses)."""
        raise PrivacyError(
            "fxdp: a reentrant torch.utils.checkpoint nested inside a reentrant checkpoint region is not supported "
            "(its re-run in backward could not be matched to the forward's records); use one level of "
            "checkpointing, or the non-reentrant flavour (use_reentrant=False) for the outer one.")
        yield  # pragma: no cover

    def match(self, call, binding):
        region = self.region
        if self.next >= len(region.uses):
            raise PrivacyError(
                f"fxdp: the recomputation of a torch.utils.checkpoint region uses trainable parameters "
                f"({', '.join(binding.param_names)} in {call.name}) more often than its forward did "
                f"({len(region.uses)} uses): a parameter use the forward did not make (state changed between "
                "forward and backward?) would get a gradient fxdp never clipped. Make the checkpointed function "
                "deterministic.")
        use, lift = region.uses[self.next], region.lifts[self.next]
        if use.op != call.name or tuple(use.binding.param_names) != tuple(binding.param_names):
            raise PrivacyError(
                f"fxdp: the recomputation of a torch.utils.checkpoint region differs from its forward: use "
                f"{self.next} of the region was {use.op} ({', '.join(use.binding.param_names)}) in the forward and "
                f"is {call.name} ({', '.join(binding.param_names)}) in the recomputation. Make the checkpointed "
                "function deterministic (no branch on data or on state changed between forward and backward).")
        self.next += 1
        return use, lift

    def done(self) -> None:
        if self.mixing_next != len(self.region.mixing):
            raise SampleMixingError(
                f"fxdp: the recomputation of a torch.utils.checkpoint region made {self.mixing_next} mixing-relevant "
                f"calls, its forward {len(self.region.mixing)}: it differs from its forward (state changed between "
                "forward and backward?). Make the checkpointed function deterministic.")


def _call_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


class NonReentrantReplay(_Replay):
    """Re-applies each tap on a throw-away record: the checkpoint's recomputation then saves the same
    tensors as the forward did, and the forward's taps receive them (nothing is collected here)."""

    @contextlib.contextmanager
    def reentrant(self, owner):
        """Made again by a non-reentrant recomputation, a nested reentrant checkpoint only runs without grad
        (its inputs are what the recomputation saves); backward re-runs the forward's own nested region."""
        self.plain += 1
        try:
            yield
        finally:
            self.plain -= 1

    def handle(self, call, binding):
        if self.plain:
            with torch.no_grad():
                return call.func(*call.args, **call.kwargs)
        if checkpoint_frame() is not None:
            # a checkpoint nested in this region, made again by the recomputation: its saved tensors are not
            # the ones backward will read, and its own taps belong to the forward's inner region
            use, lift = None, False
        else:
            use, lift = self.match(call, binding)
        if lift:
            lift_operand(call, binding, use.context.batch_size)
        ordinal = use.ordinal if use is not None else -1
        throwaway = LayerUse(ordinal, call.name, binding, None if use is None else use.layout,
                             None if use is None else use.context, checkpointed=True)
        out = TapFunction.apply(throwaway, call, *unique_tensors(call))
        binding.layout_source, binding.saved = None, {}
        return out


class ReentrantReplay(_Replay):
    """Applies the real taps, on the records the no-grad forward reserved, in order; their gradients arrive
    in the checkpoint's nested backward and are attributed to the outer backward pass."""

    def __init__(self, region: Region):
        super().__init__(region)
        self.task = torch._C._current_graph_task_id()
        uses = region.uses
        engine = uses[0].context.engine_ref() if uses else None
        if engine is not None and self.task >= 0:
            engine.expect_backward(self.task)

    def observe(self, func, args, kwargs, out) -> None:
        """A checkpoint nested in the region, made again by the re-run, is refused at its first call, parameter or
        not: its own recomputation would run later, in the nested backward, under no interceptor."""
        if innermost_checkpoint() is not None:
            raise PrivacyError(
                "fxdp: a torch.utils.checkpoint nested inside a reentrant checkpoint region is not supported (its "
                "own recomputation, in the nested backward, would run unchecked); use one level of checkpointing, "
                "or the non-reentrant flavour (use_reentrant=False) for the outer one.")
        super().observe(func, args, kwargs, out)

    def handle(self, call, binding):
        if checkpoint_frame() is not None:
            raise PrivacyError(
                f"fxdp: a non-reentrant torch.utils.checkpoint nested inside a reentrant checkpoint region uses "
                f"{', '.join(binding.param_names)} ({call.name}); fxdp does not replay such nesting. Use one level of "
                "checkpointing, or the non-reentrant flavour (use_reentrant=False) for the outer one.")
        use, lift = self.match(call, binding)
        if lift:
            lift_operand(call, binding, use.context.batch_size)
        layouts = use.binding.options.get("input_layouts")
        if layouts is not None and "input_layouts" in binding.options:
            binding.options["input_layouts"] = layouts
        use.binding = binding
        use.backward_task = self.task if self.task >= 0 else None
        out = TapFunction.apply(use, call, *unique_tensors(call))
        binding.layout_source, binding.saved = None, {}
        return out

    def done(self) -> None:
        super().done()
        if self.next != len(self.region.uses):
            raise PrivacyError(
                f"fxdp: the recomputation of a reentrant torch.utils.checkpoint region used trainable parameters "
                f"{self.next} times, its forward {len(self.region.uses)} times; the uses it skipped would get no "
                "gradient. Make the checkpointed function deterministic.")
