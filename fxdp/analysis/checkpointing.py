"""Where an intercepted call sits with respect to ``torch.utils.checkpoint`` (activation checkpointing).

Both flavours of ``torch.utils.checkpoint`` run the checkpointed function twice: once in the forward
and once more in backward (the recomputation). fxdp's taps must be made once per real use, by the
forward, and the recomputation must reproduce exactly what the forward saved (see
:mod:`fxdp.engine.checkpointing`). This module only *locates* a call:

- :func:`checkpoint_frame` -- inside the forward of a non-reentrant checkpoint: the
  ``_CheckpointFrame`` whose saved-tensor hooks are the innermost ones (its ``recompute_fn`` is what
  backward runs), or None;
- :func:`in_recomputation` -- inside a non-reentrant recomputation (its recomputation hooks are the
  innermost saved-tensor hooks);
- :func:`reentrant_checkpoint` -- inside the (no-grad) forward of a reentrant checkpoint: the
  autograd context of its ``CheckpointFunction`` (its ``run_function`` is what backward re-runs under
  grad mode), or None; :func:`reentrant_inputs_require_grad` -- whether torch will run its backward;
- :func:`innermost_checkpoint` -- the region (either flavour) the current call belongs to;
- :func:`transparent_checkpoints` -- for fxdp's analysis runs: checkpointed functions run as plain
  calls (grad mode, no hooks), so the analysis sees the same calls, in the same order, as a forward
  without checkpointing.

These read torch internals (``torch.utils.checkpoint`` of torch 2.13): the closure of the
checkpoint's pack hook and the locals of ``CheckpointFunction.forward``. Where they are not found
as expected, the callers refuse (a checkpoint fxdp cannot see into is never trained).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Optional

import torch
import torch.utils.checkpoint as _ckpt

_CHECKPOINT_FILE = os.path.join("utils", "checkpoint.py")


def _top_pack_hook():
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if hooks is None else hooks[0]


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _is_checkpoint_hook(fn, owner: str) -> bool:
    return fn is not None and getattr(fn, "__module__", "") == _ckpt.__name__ \
        and getattr(fn, "__qualname__", "").startswith(owner + ".")


def in_checkpoint() -> bool:
    """Innermost saved-tensor hooks are a non-reentrant checkpoint's (its forward or its recomputation)."""
    hook = _top_pack_hook()
    return hook is not None and "checkpoint" in (getattr(hook, "__module__", "") or "")


def checkpoint_frame() -> Optional[Any]:
    """The ``_CheckpointFrame`` of the non-reentrant checkpoint whose forward is running, or None (also None
    when checkpoint hooks are active but their frame cannot be read: callers then refuse)."""
    hook = _top_pack_hook()
    if not _is_checkpoint_hook(hook, "_checkpoint_hook"):
        return None
    frame = _closure(hook).get("frame")
    return frame if frame is not None and hasattr(frame, "recompute_fn") else None


def in_recomputation() -> bool:
    """Inside the recomputation of a non-reentrant checkpoint (its recomputation hooks are innermost)."""
    return _is_checkpoint_hook(_top_pack_hook(), "_recomputation_hook")


def _reentrant_frames():
    """The frames of running ``CheckpointFunction.forward`` calls whose ``run_function`` is set, innermost first."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename.endswith(_CHECKPOINT_FILE) \
                and getattr(code, "co_qualname", "CheckpointFunction.forward") == "CheckpointFunction.forward":
            ctx = frame.f_locals.get("ctx")
            if ctx is not None and hasattr(ctx, "run_function"):
                yield frame, ctx
        frame = frame.f_back


def reentrant_checkpoint() -> Optional[Any]:
    """The autograd context of the innermost reentrant ``CheckpointFunction`` whose forward is running (its
    ``run_function`` is re-run in backward), or None. Walks the whole Python stack (no depth limit: a use
    deep inside a checkpointed block must not be missed); only no-grad calls inside a private forward ask."""
    for _, ctx in _reentrant_frames():
        return ctx
    return None


def reentrant_inputs_require_grad(owner) -> bool:
    """Whether a tensor input of the running reentrant checkpoint ``owner`` requires grad. When none does,
    torch never runs the region's backward (nor its re-run): what it reserved would never be tapped. True
    when the forward's frame cannot be found, and for a region nested in the no-grad forward of another
    reentrant one (its inputs never require grad there; the outer region's re-run makes it again, refused)."""
    frames = _reentrant_frames()
    for frame, ctx in frames:
        if ctx is owner:
            if next(frames, None) is not None:
                return True
            args = frame.f_locals.get("args", ())
            return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return True


def innermost_checkpoint() -> Optional[tuple]:
    """``(owner, reentrant)`` of the checkpoint region whose forward is running the current call (its
    ``_CheckpointFrame``, or its reentrant ``CheckpointFunction`` context), or None outside any. Without
    grad mode (inside a reentrant forward) the Python stack says which is innermost: the first frame that
    is a ``CheckpointFunction.forward`` or a non-reentrant ``checkpoint`` call (which, run without grad
    mode, sets no hooks and makes no region: its calls then belong to none)."""
    frame = checkpoint_frame()
    if torch.is_grad_enabled():
        return None if frame is None else (frame, False)
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_filename.endswith(_CHECKPOINT_FILE):
            if code.co_name == "forward" and getattr(code, "co_qualname", "CheckpointFunction.forward") \
                    == "CheckpointFunction.forward":
                ctx = f.f_locals.get("ctx")
                if ctx is not None and hasattr(ctx, "run_function"):
                    return ctx, True
            elif code.co_name == "checkpoint" and f.f_locals.get("use_reentrant") is False:
                # run without grad mode, a non-reentrant checkpoint sets no hooks and is no region
                gen_frame = getattr(f.f_locals.get("gen"), "gi_frame", None)
                own = gen_frame.f_locals.get("new_frame") if gen_frame is not None else None
                return (frame, False) if frame is not None and own is frame else None
        f = f.f_back
    return None if frame is None else (frame, False)


def in_reentrant_checkpoint() -> bool:
    """Inside the (no-grad) forward of a reentrant ``torch.utils.checkpoint``."""
    return reentrant_checkpoint() is not None


class _PlainFunction:
    """Stands in for ``CheckpointFunction`` in analysis runs: the function, called as is."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        return function(*args)


def _plain_generator(*args, **kwargs):
    yield  # checkpoint() runs the function between the two next() calls of this generator


@contextlib.contextmanager
def transparent_checkpoints():
    """Within this block, ``torch.utils.checkpoint.checkpoint`` (both flavours, and everything built on it:
    ``checkpoint_sequential``, HF ``gradient_checkpointing_enable``) calls its function directly.

    For fxdp's analysis runs only: they must see the forward's calls in grad mode and a graph without
    recomputation (the gradient-reach check backpropagates through it). Checkpointing changes where
    activations live, not which calls run or what they compute. The two module attributes are swapped for
    the block (process-wide): a checkpoint another thread calls meanwhile runs as a plain call too -- the same
    gradients, without its memory saving."""
    saved = _ckpt.CheckpointFunction, _ckpt._checkpoint_without_reentrant_generator
    _ckpt.CheckpointFunction, _ckpt._checkpoint_without_reentrant_generator = _PlainFunction, _plain_generator
    try:
        yield
    finally:
        _ckpt.CheckpointFunction, _ckpt._checkpoint_without_reentrant_generator = saved
