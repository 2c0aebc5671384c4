"""Activation checkpointing (``torch.utils.checkpoint``, HF ``gradient_checkpointing_enable``) in eager
private forwards: taps made once per real use, by the forward; recomputations replay them.

The recomputation that a checkpoint runs in backward happens outside the private forward (no
interceptor is active then). Each region is therefore *replayed*: the function the checkpoint will
re-run is wrapped, once, when the forward first uses a trainable parameter inside the region, so that
it runs under fxdp's interceptor with a replay recorder that binds every parameter use, in order, to
the tap record (:class:`~fxdp.engine.tap.LayerUse`) the forward made for it. A recomputation whose
parameter uses differ from the forward's (another op, other parameters, more uses) is refused.

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
  (``LayerUse.backward_task``), finalized once at its end.

What BK ghost clipping needs at the end of backward -- each tapped op's input and output gradient --
is still held until the clipped sums are formed; the activations between taps (attention scores,
MLP hidden states before the activation function, dropout masks, norm statistics) are not.
Limitations (refused): parameters transformed before they meet the batch (virtual parameters) inside
a region; a region whose recomputation differs from its forward.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten

from fxdp.analysis.checkpointing import checkpoint_frame
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.core.errors import PrivacyError, UncoveredParameterError
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


class Region:
    """One checkpointed call in one forward: the tap records its parameter uses made, in order."""

    def __init__(self, param_names: Dict[int, str], reentrant: bool):
        self.param_names = dict(param_names)
        self.reentrant = reentrant
        self.uses: List[LayerUse] = []
        self.lifts: List[bool] = []

    def add(self, use: LayerUse, lift: bool) -> None:
        self.uses.append(use)
        self.lifts.append(bool(lift))

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
    region = Region(param_names, reentrant)
    setattr(owner, attr, _Replaying(function, region))
    return region


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
        self.plain = 0  # inside the no-grad forward of a reentrant checkpoint nested in this region

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
                f"({', '.join(binding.param_names)} in {call.name}) more often than its forward did; fxdp cannot "
                "tell which forward use it stands for. Make the checkpointed function deterministic.")
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
        return None


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
        if self.next != len(self.region.uses):
            raise PrivacyError(
                f"fxdp: the recomputation of a reentrant torch.utils.checkpoint region used trainable parameters "
                f"{self.next} times, its forward {len(self.region.uses)} times; the uses it skipped would get no "
                "gradient. Make the checkpointed function deterministic.")
