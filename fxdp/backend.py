"""The ``"fxdp"`` backend of ``torch.compile``.

Usage: ``torch.compile(fxdp.privatize(model), backend="fxdp", options={"compiler": "inductor"})``.

What it guarantees today: every compiled region is free of trainable
parameters. fxdp's taps run eagerly (they are excluded from dynamo tracing, so
each covered parameter use is a graph break) and the regions between them --
attention, activations, residuals, the loss -- are compiled by the inner
compiler. The engine combines the norms of all taps of a backward pass at its
end, so all-layer and block-wise clipping stay exact across graph breaks.

A region that would use a trainable parameter directly would compute its
ordinary, unclipped gradient; the backend refuses it with an error instead of
compiling it. This is also what happens when an unprivatized model is
compiled with ``backend="fxdp"``: it is refused (call ``fxdp.privatize`` first),
never trained without privacy.

Options (``torch.compile(..., options={...})``): ``compiler`` -- "inductor"
(default), "aot_eager" or "eager".

Not yet: fxdp's taps inside the compiled graph (one graph, ``fullgraph=True``);
see the project notes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .errors import PrivacyError

INNER = ("inductor", "aot_eager", "eager")


def _inner_compiler(name: str):
    if name not in INNER:
        raise ValueError(f"fxdp backend: unknown inner compiler {name!r}; expected one of {INNER}.")
    if name == "eager":
        return lambda gm, inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend(name)


def fxdp_backend(gm: torch.fx.GraphModule, example_inputs: List[Any], options: Optional[Dict[str, Any]] = None):
    """Compile one dynamo region after checking it holds no trainable parameter."""
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    if options:
        raise ValueError(f"fxdp backend: unknown options {sorted(options)}; supported: 'compiler'.")
    _dump_region(gm)
    trainable = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter) and t.requires_grad]
    if trainable:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        shown = ", ".join(str(names[i]) if i < len(names) else f"input {i}" for i in trainable[:5])
        raise PrivacyError(
            f"fxdp backend: a compiled region uses trainable parameters directly ({shown}); their gradients "
            "would bypass per-sample clipping. Privatize the model first (fxdp.privatize(model)), or freeze "
            "these parameters.")
    return _inner_compiler(compiler)(gm, example_inputs)


def _dump_region(gm: torch.fx.GraphModule) -> None:
    """With FXDP_DEBUG >= 2, write each compiled region's graph (``print_readable``) to
    ``$FXDP_DUMP_DIR/compile_<k>/00_dynamo_graph.txt``."""
    from .report.debug import new_dump_folder, debug_level

    if debug_level() >= 2:
        folder = new_dump_folder("compile")
        (folder / "00_dynamo_graph.txt").write_text(gm.print_readable(print_output=False))


def register() -> None:
    """Register the backend under the name "fxdp" (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "fxdp" not in _BACKENDS or _BACKENDS.get("fxdp") is not fxdp_backend:
        if "fxdp" in _BACKENDS:
            del _BACKENDS["fxdp"]
        register_backend(name="fxdp")(fxdp_backend)
