"""The ``torch.optim.Optimizer`` face of an optimizer wrapper (the base of :class:`fxdp.DPOptimizer`).

A :class:`WrappedOptimizer` owns no parameters or state of its own: ``param_groups``, ``state``
and ``defaults`` are the inner optimizer's (reads and writes), so LR schedulers and code that
inspects either object see the same groups. It also names parameters for error messages.

Edge cases:

- ``inner_class_methods = True`` calls the inner optimizer's *class-level* ``step`` / ``zero_grad``,
  ignoring instance attributes -- needed when the inner optimizer's own ``step`` is redirected to
  the wrapper (``fxdp.compat.fastdp``'s ``attach``), which would otherwise recurse.
- The module given to :meth:`set_param_names` is held by a weak reference (never pickled; a copy
  is relinked by calling :meth:`set_param_names` again).
"""
from __future__ import annotations

import weakref
from typing import Dict, List

import torch
from torch.optim import Optimizer


class WrappedOptimizer(Optimizer):
    """Delegates groups, state and inner calls to ``self.original_optimizer`` (set by the subclass)."""

    original_optimizer: Optimizer
    inner_class_methods: bool  # True: the inner optimizer's class-level step / zero_grad (module docstring)
    param_names: Dict[int, str]

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    @property
    def params(self) -> List[torch.nn.Parameter]:
        """Trainable parameters of the inner optimizer, in param_groups order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def _call_inner(self, name: str, **kwargs):
        inner = self.original_optimizer
        if self.inner_class_methods:
            return getattr(type(inner), name)(inner, **kwargs)
        return getattr(inner, name)(**kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_module", None)  # a weak reference: relinked by set_param_names
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def set_param_names(self, module: torch.nn.Module) -> None:
        """Use ``module``'s parameter names in error messages."""
        self.param_names = {id(p): n for n, p in module.named_parameters()}
        self._module = weakref.ref(module)

    def _name(self, p) -> str:
        if id(p) in self.param_names:
            return self.param_names[id(p)]
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"parameter of shape {tuple(p.shape)}"
