"""Package attributes imported on first use (``import fxdp`` stays light; optional extras stay optional)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict


def lazy_attributes(package: str, table: Dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``name`` in ``table`` is imported from the module
    ``table[name]`` when first looked up; any other name raises ``AttributeError`` as usual."""

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
