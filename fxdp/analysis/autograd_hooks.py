"""User autograd hooks inside a private forward: saved-tensor hooks refused, ``grad_fn`` hooks observe-only.

Both kinds run in backward, where fxdp's checks do not see them, and both moved the clipped update of
neighbouring batches by more than R (noise off, D vs D minus one example):

1. **Saved-tensor hooks** (``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``): an ``unpack`` that
   alters a saved activation (scales it, adds ``t.sum(0)``) changes the gradients backward computes from it --
   the input gradients of earlier layers mix samples, and a tap's operands differ from the forward's
   (2.0 R eager, 4.1 R compiled). Refused (``PrivacyError``) while a private forward (or analysis run,
   checkpoint replay) is open, except torch's own value-preserving pairs, recognised by the identity of
   their code (the nested functions of ``torch.utils.checkpoint._checkpoint_hook`` /
   ``_recomputation_hook`` -- non-reentrant activation checkpointing, HF gradient checkpointing, whose
   recomputation fxdp replays and checks, :mod:`fxdp.engine.checkpointing` -- and of
   ``torch.autograd.graph.save_on_cpu``, which copies each saved tensor to the CPU and back unchanged:
   allowed, so CPU offloading keeps working). Any other pair is refused, ``allow_mutation_on_saved_tensors``
   included. Checked when a forward starts (hooks around the call), at every push while a forward is open
   (``saved_tensors_hooks.__enter__``), and by :func:`refuse_saved_tensor_hooks` at every torch call of an
   eager forward (:class:`~fxdp.analysis.mixing_monitor.MixingMonitor`) and at the start of every compiled
   region (the top of torch's hook stack, whatever pushed it). Per-tensor hooks set through a node
   (``t.grad_fn._raw_saved_self.register_hooks(pack, unpack)``) are refused the same way.
2. **Hooks on autograd nodes** (``t.grad_fn.register_hook(fn)`` / ``register_prehook(fn)``, on any node,
   reached through ``next_functions`` too): registered while a forward is open, a hook is wrapped so that it
   may read the gradients (logging, inspection: it runs, its result is ignored when it is ``None`` or the
   very gradients it was given) but a hook returning new gradients (``g + g.sum(0)``: 2.9 R) or changing
   them in place (``g.add_(g.sum(0))``: 4.1 R; seen by their version counters) raises
   ``SampleMixingError`` in backward, before they are used. ``Tensor.register_hook`` (and what is built on it,
   ``register_multi_grad_hook``) in eager code of the forward gets the same wrapping
   (:func:`observe_only_tensor_hook`); traced by dynamo into a compiled graph, it is refused when the graph
   is compiled (:mod:`fxdp.compile.backend`).

How: while any private forward is open (:func:`guard` / :func:`unguard`, counted, from
:class:`fxdp.engine.forward_checks.open_forward`), four torch attributes are replaced process-wide and
restored when the last one closes: ``torch.autograd.Function._register_hook`` (every node hook registration,
C++ and Python nodes, goes through it), ``torch.Tensor.register_hook``,
``torch._C._autograd._push_saved_tensors_default_hooks`` and ``SavedTensor.register_hooks``. Hooks that another thread registers meanwhile are guarded too.

Not seen: hooks registered *outside* the forward on nodes it made (after it returns, through
``output.grad_fn``): like a loss, that is the training loop's code, outside the model. Nor code that
deliberately goes around torch's own bookkeeping: writes through ``.data`` (no version counter), hooks set
through private autograd internals (``_backward_hooks`` with ``_register_hook_dict``), or torch functions
called under ``torch._C.DisableTorchFunction`` (which hides them from every torch-function mode, fxdp's
structural check included) -- fxdp guards against mistakes in an honest training program, not against code
written to defeat it.
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.autograd.graph as _graph
import torch.utils.checkpoint as _ckpt

from fxdp.core.errors import PrivacyError, SampleMixingError

_autograd = torch._C._autograd
_top = _autograd._top_saved_tensors_default_hooks


def _nested_codes(*functions) -> frozenset:
    """The code objects of the functions defined inside ``functions`` (closures made at each call)."""
    out, stack = set(), [f.__code__ for f in functions]
    while stack:
        code = stack.pop()
        for c in code.co_consts:
            if isinstance(c, type(code)):
                out.add(c)
                stack.append(c)
    return frozenset(out)


# torch's value-preserving saved-tensor hooks: (code objects, the globals they must run with)
_TORCH_HOOKS = (
    (_nested_codes(_ckpt._checkpoint_hook.__init__, _ckpt._recomputation_hook.__init__), vars(_ckpt)),
    (_nested_codes(_graph.save_on_cpu.__init__), vars(_graph)),
)


def _torchs(obj) -> bool:
    """``obj`` is something torch's own hooks close over: torch's objects, functions, modules, or plain constants."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, weakref.ref):
        return _torchs(obj())
    if isinstance(obj, types.ModuleType):
        return obj.__name__.split(".")[0] == "torch"
    module = getattr(obj, "__module__", None) if isinstance(obj, types.FunctionType) else type(obj).__module__
    return isinstance(module, str) and module.split(".")[0] == "torch"


def _is_torch_hook(fn) -> bool:
    """Torch's hook by the identity of its code and globals, and closing over torch's objects only (a function
    built from torch's code around a frame of the caller's making is not torch's hook)."""
    code, globs = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if not any(code in codes and globs is g for codes, g in _TORCH_HOOKS):
        return False
    return all(_torchs(cell.cell_contents) for cell in (fn.__closure__ or ()))


def allowed_saved_hooks(pack, unpack) -> bool:
    """Both functions are torch's own checkpoint or ``save_on_cpu`` hooks (by code identity, module doc)."""
    return _is_torch_hook(pack) and _is_torch_hook(unpack)


def _saved_hooks_refusal(pack, unpack, where: str) -> PrivacyError:
    name = getattr(unpack, "__qualname__", None) or type(unpack).__name__
    return PrivacyError(
        f"fxdp: saved-tensor hooks (unpack {name}) are active {where}. Backward computes the gradients from what "
        "unpack returns; one that alters a saved activation (rescales it, mixes rows across the batch) changes "
        "the gradients after fxdp's per-sample checks, so clipping no longer bounds each sample's contribution. "
        "Remove torch.autograd.graph.saved_tensors_hooks around and inside the privatized forward. Allowed: "
        "torch.utils.checkpoint (use_reentrant=False, HF gradient checkpointing) and "
        "torch.autograd.graph.save_on_cpu (CPU offloading), whose hooks return the saved values unchanged.")


def refuse_saved_tensor_hooks(where: str = "in a private forward") -> None:
    """Refuse the innermost saved-tensor hooks unless they are torch's value-preserving ones (module doc)."""
    hooks = _top(False)
    if hooks is not None and not allowed_saved_hooks(*hooks):
        raise _saved_hooks_refusal(hooks[0], hooks[1], where)


# ------------------------------------------------------------------ guards while a forward is open
_ORIGINAL = {}
_DEPTH = [0]


def guarding() -> bool:
    """A private forward (or analysis run, checkpoint replay) is open: the guards below are installed."""
    return _DEPTH[0] > 0


def _same(out, given) -> bool:
    if not isinstance(out, (tuple, list)) or not isinstance(given, (tuple, list)) or len(out) != len(given):
        return False
    return all(a is b for a, b in zip(out, given))


def _versions(grads) -> tuple:
    """The version counters of the tensors among ``grads`` (a tensor, or tuples / lists of them, None allowed)."""
    if isinstance(grads, torch.Tensor):
        return (grads._version,)
    if isinstance(grads, (tuple, list)):
        return tuple(v for g in grads for v in _versions(g))
    return ()


def _observe_only(hook, what: str, unchanged):
    """``hook`` wrapped so that it may read the gradients it is given, not replace them (its result must be
    None or, by ``unchanged(result, args)``, the gradients it was given) nor change them in place (their
    version counters): either raises ``SampleMixingError`` in backward, before the gradients are used."""
    def guarded(*args):
        before = _versions(args)
        out = hook(*args)
        changed = "changed the gradients it was given in place" if _versions(args) != before else \
            "returned new gradients" if out is not None and not unchanged(out, args) else None
        if changed:
            raise SampleMixingError(
                f"fxdp: a {what} {changed}; fxdp's checks cannot see what it computes, and it can mix samples' "
                "gradients (g + g.sum(0), g.add_(g.sum(0))) or rescale them after the per-sample norms. Hooks inside "
                "the forward may only read the gradients (return None); compute any change in the forward instead.")
        return None
    guarded.__wrapped__ = hook
    return guarded


def observe_only_node_hook(hook):
    """A node hook (``register_hook(fn(grad_inputs, grad_outputs))`` or ``register_prehook(fn(grad_outputs))``)
    that may read, not replace: its result must be ``None`` or the gradients it was given, which it must not
    change in place (module doc)."""
    return _observe_only(hook, "hook registered inside the privatized forward on an autograd node "
                               "(grad_fn.register_hook / register_prehook)", lambda out, args: _same(out, args[0]))


def observe_only_tensor_hook(hook):
    """A ``Tensor.register_hook`` hook registered while a private forward is open runs in backward, where
    fxdp's checks do not see it: it may read the gradient (logging, inspection), not replace it -- ``g +
    g.sum(0)`` mixes samples' gradients (2.9 R) -- nor change it in place (``g.add_(g.sum(0))``: 4.1 R)."""
    return _observe_only(hook, "gradient hook registered inside the privatized forward (Tensor.register_hook)",
                         lambda out, args: out is args[0])


def _register_tensor_hook(tensor, hook):
    return _ORIGINAL["tensor"](tensor, observe_only_tensor_hook(hook))


def _register_node_hook(backward_hooks, hook):
    return _ORIGINAL["register"](backward_hooks, observe_only_node_hook(hook))


def _push_saved_hooks(pack, unpack):
    if not allowed_saved_hooks(pack, unpack):
        raise _saved_hooks_refusal(pack, unpack, "inside a private forward (pushed by saved_tensors_hooks)")
    return _ORIGINAL["push"](pack, unpack)


def _saved_tensor_register_hooks(self, *args, **kwargs):
    raise PrivacyError(
        "fxdp: SavedTensor.register_hooks (through grad_fn._raw_saved_*) was called inside a private forward: its "
        "unpack hook would replace an activation that backward computes gradients from, after fxdp's per-sample "
        "checks (it can rescale it or mix rows across the batch). Do not set hooks on saved tensors while training "
        "privately.")


def guard() -> None:
    """A forward opens: install the guards (on the first of nested / concurrent ones)."""
    if _DEPTH[0] == 0:
        owner = torch.autograd.Function
        _ORIGINAL.update(register=owner._register_hook, own=owner.__dict__.get("_register_hook"),
                         push=_autograd._push_saved_tensors_default_hooks, saved=_autograd.SavedTensor.register_hooks,
                         tensor=torch.Tensor.register_hook)
        owner._register_hook = staticmethod(_register_node_hook)
        torch.Tensor.register_hook = _register_tensor_hook
        _autograd._push_saved_tensors_default_hooks = _push_saved_hooks
        _autograd.SavedTensor.register_hooks = _saved_tensor_register_hooks
    _DEPTH[0] += 1


def unguard() -> None:
    """A forward closes: the last one restores torch's functions."""
    if _DEPTH[0] == 0:
        return
    _DEPTH[0] -= 1
    if _DEPTH[0] == 0:
        owner = torch.autograd.Function
        if _ORIGINAL["own"] is None:
            del owner._register_hook  # inherited from torch's _HookMixin
        else:
            owner._register_hook = _ORIGINAL["own"]
        _autograd._push_saved_tensors_default_hooks = _ORIGINAL["push"]
        _autograd.SavedTensor.register_hooks = _ORIGINAL["saved"]
        torch.Tensor.register_hook = _ORIGINAL["tensor"]
        _ORIGINAL.clear()
