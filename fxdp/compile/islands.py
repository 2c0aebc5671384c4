"""Eager islands: code that dynamo runs untraced inside a compiled forward pass (backend "fxdp") goes
through the eager interceptor, rules and taps of eager ``privatize``, its call sites numbered in program
order with the compiled regions' (one counter), so norms are combined across compiled and eager uses.

An island opens

1. around a submodule owning trainable parameters whose hooks run eagerly (its call is not traced: a
   ``torch.compiler.disable``'d function calls it, or a frame dynamo runs uncompiled), for that call;
2. around a ``torch.compiler.disable``'d submodule called from traced code (dynamo traces its hooks; their
   dynamo-disabled pair opens the island eagerly), for that call;
3. around the rest of the forward pass -- the *root island* -- when dynamo runs the root module's forward
   frame untraced (:func:`untraced_root`: the forward is disabled, or dynamo's cache for its code is full,
   ``recompile_limit``), from the forward's start, so that the root's own code before its first submodule
   (a mixup, a root parameter) is intercepted and checked like the rest. (A full cache could still have
   served the call from an entry compiled for it; the open island makes that entry miss -- dynamo guards on
   the torch-function mode stack -- so such a call runs eagerly under the island: exact, not compiled.
   Opening the island only at the first eager submodule left the code before it unchecked: a review
   measured 2.7 R for a mixup there.)
   The root island sees what per-submodule islands do not: code between submodules, submodules without
   parameters of their own, virtual parameters made in one submodule and meeting the batch in another
   (T5's relative attention bias, Swin's relative position bias), and a checkpointed block's forward
   whole, as its recomputation replays it (``fxdp.engine.checkpointing`` compares the two call by call).

Inside an island, code dynamo compiles has this mode traced into its graph: there (``is_compiling()``) and
while a compiled region runs (:func:`~fxdp.compile.graph_ops.in_compiled_region`) the island only forwards
the call -- the region taps its own uses in the graph. Parameter uses an island does not see are refused
when the forward ends (:meth:`fxdp.compile.forwards.CompiledForwards.close`, by their count).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch

from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.analysis.mixing_monitor import MixingMonitor
from fxdp.compile.graph_ops import in_compiled_region
from fxdp.compile.refusals import untraced_recurrent
from fxdp.core.errors import PrivacyError

DISABLED = "its forward is torch.compiler.disable'd"


class EagerIslands(ParameterInterceptor):
    """The eager interceptor of one compiled forward pass (module docstring). ``root`` (weakly) is the
    privatized model, ``untraced`` why dynamo runs its forward frame untraced (:func:`untraced_root`) or
    None, ``root_open`` whether the root island is open."""

    def __init__(self, param_names, recorder, root=None, untraced: Optional[str] = None):
        super().__init__(param_names, recorder)
        self.root = weakref.ref(root) if root is not None else (lambda: None)
        self.untraced = untraced
        self.root_open = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.compiler.is_compiling() or in_compiled_region():
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


_OPEN_ISLANDS: "dict[int, EagerIslands]" = {}  # forward id -> the islands of an open compiled forward pass
_STACK = threading.local()


def _stack() -> list:
    if not hasattr(_STACK, "entries"):
        _STACK.entries = []
    return _STACK.entries


def _batch_args(args, batch_size: int):
    """Floating-point tensor arguments and their batch dimension: the unique one of size B (else unknown)."""
    tensors, dims = [], []
    for t in args if isinstance(args, (tuple, list)) else ():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            sized = [d for d in range(t.dim()) if t.shape[d] == batch_size]
            tensors.append(t)
            dims.append(sized[0] if len(sized) == 1 else None)
    return tensors, dims


class IslandMonitor(MixingMonitor):
    """The structural sample-mixing check of eager forwards, over an eager island: its batch inputs are
    the island's arguments (:func:`_batch_args`), and for the root island the model's batch inputs too;
    like :class:`EagerIslands` it only forwards calls that dynamo traces or a compiled region issues."""

    def __init__(self, args, batch_size: int, batch_inputs=()):
        tensors, dims = _batch_args(args, batch_size)
        super().__init__([t for t, _ in batch_inputs] + tensors, batch_size,
                         batch_dims=[d for _, d in batch_inputs] + dims)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.compiler.is_compiling() or in_compiled_region():
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def _forward_chain(model):
    """The root's forward and the functions it wraps (``functools.wraps``: HuggingFace's decorators)."""
    fn = model.__dict__.get("forward", None) or type(model).forward
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        yield fn
        fn = getattr(fn, "__wrapped__", None)


def past_recompile_limit(code) -> bool:
    """Dynamo's cache for ``code`` is full: a call none of its entries' guards accept runs uncompiled (and
    so do the frames it calls that have no entry of their own)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        limit = torch._dynamo.config.recompile_limit
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return False
    return len(_debug_get_cache_entry_list(code)) >= limit


def describe(code) -> str:
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def untraced_root(model) -> Optional[str]:
    """Why dynamo runs the root module's forward frame untraced, or None: the forward is
    ``torch.compiler.disable``'d (:data:`DISABLED`; on the class or the instance), or dynamo's cache for its
    code, or for a function it wraps, is full (HuggingFace's ``can_return_tuple`` wrapper, shared by every
    model class, reaches ``torch._dynamo.config.recompile_limit`` after about a dozen models in one process).
    """
    for fn in _forward_chain(model):
        if getattr(fn, "_torchdynamo_disable", False):
            return DISABLED
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None and past_recompile_limit(code):
            return (f"dynamo hit its recompile limit (torch._dynamo.config.recompile_limit = "
                    f"{torch._dynamo.config.recompile_limit}) on {describe(code)}")
    return None


def open_forward_islands(ctx, islands: EagerIslands) -> None:
    """A compiled forward pass starts: its islands are registered; the root island opens now if dynamo runs
    the root's forward untraced (module docstring, 3)."""
    _OPEN_ISLANDS[ctx.cid] = islands
    if islands.untraced is not None:
        _open_root(islands, ())


def _open_root(islands: EagerIslands, args) -> None:
    islands.root_open = True
    islands.__enter__()
    ctx = islands.recorder.context
    monitor = IslandMonitor(args, ctx.batch_size, batch_inputs=ctx.batch_inputs)
    monitor.__enter__()
    _stack().append((islands.root(), islands, monitor))


def enter_island(module, args=(), traced: bool = False) -> None:
    """Pre-hook side, ``module`` runs eagerly: inside a compiled forward pass that owns its parameters,
    its forward (and everything it calls) runs under that pass's :class:`EagerIslands` and under the
    structural mixing check (:class:`IslandMonitor`) of its arguments -- or, if the root's forward frame is
    past the recompile limit and ``module`` is not called from traced code, the rest of the forward does
    (the root island)."""
    if not _OPEN_ISLANDS or in_compiled_region():
        return
    stack = _stack()
    islands, monitor = None, None
    if not any(mode is not None for _, mode, _ in stack):
        own = [id(p) for p in module.parameters(recurse=False)]
        islands = next((i for i in _OPEN_ISLANDS.values() if any(k in i.param_names for k in own)), None)
        if islands is not None and isinstance(module, torch.nn.RNNBase) \
                and not getattr(torch._dynamo.config, "allow_rnn", True):
            # dynamo left the layer untraced, and no region with parameters compiled before it refused the model
            names = [n for n, m in islands.root().named_modules() if m is module] if islands.root() else []
            raise untraced_recurrent(names or [type(module).__name__])
        if islands is not None and not traced and islands.untraced is not None and not islands.root_open:
            _open_root(islands, args)
            islands = None
    if islands is not None:
        islands.__enter__()
        monitor = IslandMonitor(args, islands.recorder.context.batch_size)
        monitor.__enter__()
    stack.append((module, islands, monitor))


def enter_island_from_traced(module, args=()) -> None:
    """:func:`enter_island` for a disabled submodule whose hooks dynamo traces (its caller is compiled)."""
    enter_island(module, args, traced=True)


def _close(islands, monitor) -> None:
    if monitor is not None:
        monitor.__exit__(None, None, None)
    if islands is not None:
        islands.__exit__(None, None, None)


def close_islands(cid: int) -> Optional[EagerIslands]:
    """The root forward pass ends: its root island, and islands a submodule that raised left open, are
    closed. Returns the pass's islands."""
    stack = _stack()
    while stack:
        _, islands, monitor = stack.pop()
        _close(islands, monitor)
    return _OPEN_ISLANDS.pop(cid, None)


def drop_islands(cid: int) -> None:
    _OPEN_ISLANDS.pop(cid, None)


def exit_island(module) -> None:
    """Forward-hook side: the island ``module`` opened (if any) ends."""
    stack = _stack()
    if stack and stack[-1][0] is module:
        _, islands, monitor = stack.pop()
        _close(islands, monitor)


def eager_region(gm, positions):
    """A region fxdp cannot tap in the graph (:class:`~fxdp.compile.graph_ops.EagerFallback`), run uncompiled
    under the eager interceptor of the forward pass that owns its parameters (at ``positions`` among its
    inputs): the same rules and taps as eager ``privatize``."""
    from fxdp.compile.graph_ops import owner_of

    def run(*args):
        if any(mode is not None for _, mode, _ in _stack()):
            return gm(*args)  # already inside an island
        engine, _ = owner_of([args[i] for i in positions])
        islands = _OPEN_ISLANDS.get(engine.current_forward.cid)
        if islands is None:
            raise PrivacyError("fxdp: a compiled region ran outside its model's forward pass; call the compiled "
                               "model itself.")
        with islands:
            return gm(*args)
    return run
