"""Checks of every compiled private forward pass (``torch.compile(model, backend="fxdp")``) that the
graph rewrite cannot make at compile time (issue #13: the compiled path applies the eager checks).

Unseen parameter uses (as :func:`fxdp.engine.forward_checks.unseen_uses` in eager mode): after each
compiled forward the autograd graph of its outputs is walked; every path to a trainable parameter's
gradient accumulator must go through a tap. Taps here are the eager :class:`~fxdp.engine.tap.TapFunction`,
the graph captures registered by the compile layer (:func:`register_tap_class`; under the inner compiler
``"eager"`` they are autograd nodes of their own) and, under aot_autograd (``"aot_eager"``, inductor), the
whole compiled region's node: its *direct* edges to parameters carry no gradient, which the backend proves
at compile time (every parameter placeholder is read only by a detach, a capture or a node seen to carry no
gradient: :func:`fxdp.compile.insert_taps.check_no_direct_use`). Every other edge of a compiled node is
followed, so a tensor derived from a parameter *before* the forward (a view cached at ``__init__``,
``self.wt = self.fc.weight.t()``), which reaches the graph as an ordinary input, is refused, naming the
parameter. A compiled region of a backend other than ``"fxdp"`` inside the forward is not told apart from
an fxdp one here; its parameter uses are refused by the count of tapped uses against the analysis when
the forward closes (:mod:`fxdp.compile.forwards`).

Double backward (``create_graph=True``): aot_autograd defers its own refusal to the *second* backward, as
a raw ``RuntimeError``; the first one (``torch.autograd.grad(loss, x, create_graph=True)``) would hand the
penalty a gradient whose parameter part fxdp never sees. A pre-hook on every compiled region's node of
this forward (and on every capture, under the inner compiler ``"eager"``, whose hand-over to the engine runs
with grad mode off inside a custom op) refuses any backward pass with ``create_graph=True`` through it.

Refused graphs: a graph the backend refuses while compiling marks the open forward refused
(:func:`record_compile_refusal`), so that a forward dynamo completes anyway, partly uncompiled, is refused
when it ends; under ``torch._dynamo.config.suppress_errors`` every later compiled forward of the model is
refused too (privatize the fixed model again to clear it).
"""
from __future__ import annotations

import weakref
from typing import Dict, List

import torch

from fxdp.core.errors import PrivacyError
from fxdp.engine import forward_checks
from fxdp.engine.tap import TapFunction, VirtualLink

_TAP_CLASSES: set = {TapFunction, VirtualLink}
# Open compiled forwards for which backend "fxdp" refused a graph (ForwardContext -> the refusal), and
# engines refused under torch._dynamo.config.suppress_errors (Engine -> the refusal)
_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STICKY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def record_compile_refusal(ctx, exc: PrivacyError) -> None:
    """The backend refused a graph of the forward ``ctx``. dynamo normally re-raises the refusal (and
    compiles the frame again, and refuses again, at every call). With
    ``torch._dynamo.config.suppress_errors`` it instead runs the frame uncompiled -- now and at every later
    call -- and compiles the frames it calls, so the refused code would run unchecked: this forward is
    refused when it ends, and under ``suppress_errors`` every later compiled forward of the model too."""
    _REFUSED[ctx] = exc
    engine = ctx.engine_ref() if ctx.engine_ref is not None else None
    if engine is not None and getattr(torch._dynamo.config, "suppress_errors", False):
        _STICKY[engine] = exc


def register_tap_class(cls) -> None:
    """A ``torch.autograd.Function`` whose backward returns no parameter gradient (a graph capture)."""
    _TAP_CLASSES.add(cls)


def is_compiled_region(node) -> bool:
    """The autograd node of one aot_autograd-compiled graph (``CompiledFunctionBackward``)."""
    return type(node).__name__ == "CompiledFunctionBackward"


def _is_tap(node) -> bool:
    return getattr(node, "_forward_cls", None) in _TAP_CLASSES or is_compiled_region(node)


def _compiled_nodes(output) -> List:
    out, stack, seen = [], [t.grad_fn for t in forward_checks.tensors_of(output) if t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_tap(node):
            out.append(node)
        stack.extend(n for n, _ in node.next_functions if n is not None and getattr(n, "variable", None) is None)
    return out


def _refuse_create_graph(grad_outputs):
    if torch.is_grad_enabled():
        raise PrivacyError(
            "fxdp: a backward pass with create_graph=True (double backward, e.g. an input-gradient penalty) "
            "reached the privatized model compiled with torch.compile(model, backend=\"fxdp\"). fxdp's taps give "
            "first-order gradients only (and aot_autograd does not differentiate a compiled backward): the "
            "penalty's gradient with respect to the parameters would be missing. Compute input gradients with "
            "torch.autograd.grad(loss, x) without create_graph (adversarial examples), or train without the "
            "penalty.")
    return None


def check_compiled_output(output, trainable: Dict[int, str], ctx=None) -> None:
    """Refuse a forward the backend refused a graph of, and unseen parameter uses of a compiled forward's
    output; guard its compiled nodes against double backward (module docstring)."""
    refused = _REFUSED.pop(ctx, None) if ctx is not None else None
    if refused is None and ctx is not None and ctx.engine_ref is not None:
        refused = _STICKY.get(ctx.engine_ref())
    if refused is not None:
        raise type(refused)(
            f"{refused} (fxdp refused a graph of this forward pass while compiling it, and dynamo ran the forward "
            "anyway -- torch._dynamo.config.suppress_errors -- partly uncompiled, where the refused code is not "
            "checked; the forward is refused.)")
    forward_checks.refuse_unseen_uses(output, trainable, is_tap=_is_tap)
    for node in _compiled_nodes(output):
        node.register_prehook(_refuse_create_graph)
