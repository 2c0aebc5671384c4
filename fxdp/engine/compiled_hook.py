"""The engine's one interface to compiled forward passes (backend ``"fxdp"``).

Under ``torch.compile(model, backend="fxdp")`` the model's hooks run outside
dynamo and the taps are inside the compiled graphs, so a forward pass is
opened and closed by the engine but fed by graph ops. That handling lives in
the compile layer (:mod:`fxdp.compile.forwards`), above the engine; the
engine only knows this interface, which the compile layer fills in when it is
imported (``import fxdp`` does). A privatized model run under
``torch.compile`` with no compile layer loaded is refused: its gradients
would reach nothing that clips them.
"""
from __future__ import annotations

from typing import Callable, Optional

from fxdp.core.errors import PrivacyError

_FACTORY: list = [None]
# (enter, exit, enter_untraced, exit_untraced) of eager islands, set by the compile layer: called by the hooks
# of every submodule with parameters when it runs eagerly during a compiled forward pass, or (the dynamo-disabled
# pair) when dynamo traces the hooks of a submodule whose forward it will not trace (fxdp.compile.islands)
ISLANDS: list = [None]


def install_compiled_forwards(factory: Callable, islands=None) -> None:
    """Called by :mod:`fxdp.compile`: ``factory(engine)`` makes the engine's compiled-forward handler;
    ``islands`` is ``(enter(module), exit(module), ...)`` for submodules that run eagerly between compiled regions."""
    _FACTORY[0] = factory
    ISLANDS[0] = islands


def new_compiled_forwards(engine):
    factory: Optional[Callable] = _FACTORY[0]
    if factory is None:
        raise PrivacyError("fxdp: the privatized model runs under torch.compile, but fxdp's compile support is not "
                           "loaded; import fxdp (or fxdp.compile) before compiling the model.")
    return factory(engine)


def in_compiled_module() -> bool:
    """True while ``torch.compile(model)`` runs: dynamo then traces the forward itself, and fxdp's
    taps come from the graph (backend "fxdp") instead of the eager interceptor."""
    try:
        from torch._dynamo.eval_frame import _is_in_optimized_module
    except ImportError:  # pragma: no cover - older torch
        return False
    return _is_in_optimized_module()
