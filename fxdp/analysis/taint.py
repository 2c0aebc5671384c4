"""Which tensors of an analysis run depend on the samples' values.

The model's batched inputs are marked; every intercepted call marks its outputs
(and, for an in-place op, its target) when any tensor input is marked. A call
that uses trainable parameters and no marked tensor is *batch-free*: its result
is the same for every sample (it may still have a batch-sized dimension taken
from a shape). The capture makes such results virtual parameters
(:mod:`fxdp.rules.virtual`); the ``check_virtuals`` pass then confirms on the
analysis runs that their values really do not change with the samples (a value
routed through Python, ``x.tolist()``, is invisible here).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils._pytree import tree_flatten


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.startswith("__i") or name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))


class BatchTaint:
    """The set of tensors that depend on the batch, by identity (the tensors are kept alive for the run)."""

    def __init__(self):
        self._marked: Dict[int, torch.Tensor] = {}

    def mark(self, tree):
        for t in _tensors(tree):
            self._marked[id(t)] = t

    def any(self, tree) -> bool:
        return any(self._marked.get(id(t)) is t for t in _tensors(tree))

    def propagate(self, func, args, kwargs, out):
        if self.any((args, kwargs)):
            self.mark(out)
            if _is_inplace(func) and args and isinstance(args[0], torch.Tensor):
                self.mark(args[0])
