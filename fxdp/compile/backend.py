"""The ``"fxdp"`` backend of ``torch.compile``: DP training compiled end to end.

Usage::

    model = fxdp.privatize(model, style="all-layer", max_grad_norm=1.0)
    model = torch.compile(model, backend="fxdp")       # options={"compiler": "inductor"}

``torch.compile(model)`` runs the model's forward hooks outside dynamo, so the
engine opens each forward pass (batch size, the eager analysis of this input
structure) before the compiled graph runs, and closes it after. Inside, the
forward is one graph: every covered parameter use is rewritten in place by the
passes of :mod:`fxdp.compile.region` and :mod:`fxdp.compile.insert_taps`, then
the graph goes to the inner compiler (inductor by default; "aot_eager" or
"eager" for debugging). No graph break is caused by fxdp; ``fullgraph=True``
works (for a root module of your own class: torch.nn containers such as
``nn.Sequential`` have their hooks traced, which breaks the graph).

Graph breaks of the model's own split the forward into regions; their call
sites are numbered across regions and every norm is combined at the end of
backward, so all-layer and block-wise clipping stay exact. Code dynamo does not
trace falls back to eager taps (:mod:`fxdp.compile.islands`): a submodule that
runs eagerly between regions (a ``torch.compiler.disable``'d module or forward,
a disabled function calling submodules, a frame dynamo gives up on) goes
through the same interceptor and rules as eager ``privatize``, numbered with
the regions' call sites; a region fxdp cannot tap inside the graph (a (1, T)
position-id input without the batch) runs its graph eagerly the same way. A
graph dynamo compiled once for a block's forward runs, checked and renamed,
for every block.

Refusals, never silent non-private training, raised as their fxdp error type
(not wrapped in dynamo's ``BackendCompilerFailed``): a region using trainable
parameters of an unprivatized model; a privatized model compiled with another
backend, or whose parameters are used by untraced code outside any submodule
(detected when its forward ends); ``torch.compile(model.forward)`` (the hooks
are bypassed); a call no rule covers; a double backward (``create_graph=True``).
Under ``torch.no_grad`` regions are compiled as they are (nothing to clip).

Debugging: with ``FXDP_DEBUG=2`` every region's graph is written after each
pass, ``$FXDP_DUMP_DIR/compile_<k>/<NN>_<pass>.txt`` (``print_readable``).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, List, Optional

import torch

from fxdp.compile.composite_taps import release_plans
from fxdp.core.errors import PrivacyError
from fxdp.compile.islands import eager_region
from fxdp.compile.graph_ops import EagerFallback, marked_region, release_sites

INNER = ("inductor", "aot_eager", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _inner_compiler(name: str, mode: Optional[str], example_inputs):
    if name not in INNER:
        raise ValueError(f"fxdp backend: unknown inner compiler {name!r}; expected one of {INNER}.")
    if mode is not None and mode not in MODES:
        raise ValueError(f"fxdp backend: unknown mode {mode!r}; expected one of {MODES}.")
    if mode not in (None, "default") and name != "inductor":
        raise ValueError(f"fxdp backend: mode={mode!r} tunes inductor; it does not apply to the {name!r} compiler.")
    if name == "eager":
        return lambda gm, inputs: gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(name)
    from torch._inductor import list_mode_options
    patches = dict(list_mode_options(mode or "default"))
    if patches.pop("triton.cudagraphs", False) and any(
            isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        warnings.warn(f"fxdp backend: mode={mode!r} asks for CUDA graphs, which fxdp turns off: a graph replay "
                      "would skip the taps' hand-over of gradients to the engine. The rest of the mode applies.",
                      UserWarning, stacklevel=2)
    patches["triton.cudagraphs"] = False  # also when turned on globally (see the warning above)
    # fxdp::stash hands the engine references to backward buffers (output gradients, saved or recomputed
    # activations) that live until the end of backward; inductor must not write another result into them.
    patches["allow_buffer_reuse"] = False
    patches["inplace_buffers"] = False

    def compile_inductor(gm, inputs):
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, inputs, config_patches=patches)
    return compile_inductor


def fxdp_backend(gm: torch.fx.GraphModule, example_inputs: List[Any], options: Optional[Dict[str, Any]] = None,
                 mode: Optional[str] = None):
    """Rewrite one dynamo region's parameter uses into taps, then compile it with the inner compiler.

    ``mode`` is ``torch.compile``'s (``"reduce-overhead"``, ``"max-autotune"``, ...): inductor's settings for
    it apply, except CUDA graphs (see :func:`_inner_compiler`)."""
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    if options:
        raise ValueError(f"fxdp backend: unknown options {sorted(options)}; supported: 'compiler'.")
    inner = _inner_compiler(compiler, mode, example_inputs)
    from fxdp.compile.region import Region, run_region_passes

    from fxdp.compile.graph_checks import check_graph_mixing
    from fxdp.compile.refusals import surfaced

    if not torch.is_grad_enabled() and not any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes):
        return inner(gm, example_inputs)  # no gradient, nothing to clip (evaluation under torch.no_grad)
    original = _copy(gm)
    try:
        _refuse_closed_forward(example_inputs)
        _refuse_traced_tensor_hooks(gm)
        check_graph_mixing(gm, example_inputs)  # the eager structural sample-mixing check, on every graph
        region = run_region_passes(Region(gm, list(example_inputs)))
    except EagerFallback:
        positions = tuple(i for i, v in enumerate(example_inputs)
                          if isinstance(v, torch.nn.Parameter) and v.requires_grad)
        return eager_region(original, positions)
    except PrivacyError as exc:
        raise surfaced(exc, example_inputs).with_traceback(exc.__traceback__) from None
    if region.site_uids:
        weakref.finalize(region.gm, release_sites, list(region.site_uids))
    if region.plan_ids:
        weakref.finalize(region.gm, release_plans, list(region.plan_ids))
    return marked_region(inner(region.gm, example_inputs), *_plan_inputs(region.gm))


def _refuse_traced_tensor_hooks(gm: torch.fx.GraphModule) -> None:
    """A ``Tensor.register_hook`` that dynamo traced into the graph (``higher_order.register_hook``) runs in
    backward as graph code, where fxdp's observe-only wrapping of eager hooks does not reach it: a hook that
    replaces or rewrites the gradient (``g + g.sum(0)``) mixed samples' gradients (4.1 R in a review)."""
    hop = getattr(torch.ops.higher_order, "register_hook", None)
    if hop is not None and any(n.op == "call_function" and n.target is hop for n in gm.graph.nodes):
        raise PrivacyError(
            "fxdp backend: the compiled privatized forward registers a gradient hook on a tensor "
            "(Tensor.register_hook / register_multi_grad_hook); torch.compile runs it inside its graph in "
            "backward, where fxdp cannot check that it only reads the gradient (a hook that changes it can mix "
            "samples' gradients after the per-sample norms). Register such hooks outside the forward, or train "
            "this model with eager fxdp.privatize (where hooks inside the forward may read gradients).")


def _refuse_closed_forward(example_inputs) -> None:
    """A region using a privatized model's parameters while that model has no forward pass open: its hooks,
    where fxdp opens each forward pass, were bypassed -- ``torch.compile(model.forward)``, or a compiled
    function calling ``model.forward`` directly."""
    from fxdp.engine.install import _ROOTS, get_engine

    ids = {id(v) for v in example_inputs if isinstance(v, torch.nn.Parameter) and v.requires_grad}
    for root in list(_ROOTS):
        engine = get_engine(root)
        if engine is None or not any(id(p) in ids for p in root.parameters()):
            continue
        if engine.current_forward is None:
            raise PrivacyError(
                f"fxdp backend: parameters of the privatized {type(root).__name__} are used in grad mode by code "
                "compiled outside a forward pass of the model, where nothing would clip their gradients: "
                "torch.compile(model.forward) (or a compiled function calling model.forward directly) bypasses the "
                "module's hooks, where fxdp opens each forward pass; a compiled loss using the parameters outside "
                "the model (a regulariser) is not a per-sample use. Compile the module itself: "
                "torch.compile(model, backend=\"fxdp\") or model.compile(backend=\"fxdp\"), and call the model.")


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The dynamo graph as it came, for :func:`~fxdp.compile.islands.eager_region` (the passes rewrite it)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def _plan_inputs(gm: torch.fx.GraphModule):
    """The region's plan id and the positions, among the graph's inputs, of the parameters its
    ``fxdp::forward_token`` names (None, () for a region without call sites)."""
    token = next((n for n in gm.graph.nodes if n.target is torch.ops.fxdp.forward_token.default), None)
    if token is None:
        return None, ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return token.args[0], tuple(placeholders.index(p) for p in token.args[1])


def register() -> None:
    """Register the backend under the name "fxdp" (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "fxdp" not in _BACKENDS or _BACKENDS.get("fxdp") is not fxdp_backend:
        if "fxdp" in _BACKENDS:
            del _BACKENDS["fxdp"]
        register_backend(name="fxdp")(fxdp_backend)
