"""Which engine last wrote each parameter's ``private_grad``.

The optimizer asks (through :func:`fxdp.engine.install.engine_of`) so that it
can check it calibrates the noise to the bound the model clipped with -- a
mismatch is how Opacus #664 broke its guarantee. The registry is keyed by
parameter identity and weak on both sides: it keeps neither a parameter nor
an engine alive, and stores nothing on the Parameter object.
"""
from __future__ import annotations

import weakref
from typing import Dict


class WriterRegistry:
    """Parameter -> weak reference to the engine that last wrote its private_grad (tensors
    cannot be WeakKeyDictionary keys: their ``==`` is elementwise)."""

    def __init__(self):
        self._refs: Dict[int, tuple] = {}

    def record(self, param, engine_ref) -> None:
        key = id(param)
        entry = self._refs.get(key)
        if entry is not None and entry[0]() is param:
            self._refs[key] = (entry[0], engine_ref)
            return
        self._refs[key] = (weakref.ref(param, lambda _, k=key: self._refs.pop(k, None)), engine_ref)

    def get(self, param):
        entry = self._refs.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1]


WRITERS = WriterRegistry()
