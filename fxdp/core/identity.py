"""Which tensors are a model's trainable parameters, under every identity they take.

Normally a parameter is one ``nn.Parameter`` object: the layers use it, the optimizer holds it, and
fxdp writes ``p.private_grad`` on it. Under sharded data parallelism (FSDP2,
``torch.distributed.fsdp.fully_shard``) a parameter has two identities: the *sharded* DTensor
parameter registered on the module outside forward (what the optimizer holds: private gradients are
written there), and the *unsharded* tensor registered inside forward (what the layers see). A layer
call on an identity the engine does not know would bypass clipping, so the distributed layer
attaches a :class:`ParameterView` to such a model (``set_view``) that names every identity.

Guarantee: :func:`trainable_ids` maps ``id(tensor)`` to the canonical parameter name (as in
``model.named_parameters()``) for every identity of every trainable parameter; :func:`write_targets`
maps each name to the parameter its private gradient belongs to. Without a view both are read from
``model.named_parameters()``. The view is kept in the model's ``__dict__`` (nothing is stored on
Parameter objects).
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol

import torch

VIEW_ATTR = "_fxdp_parameter_view"


class ParameterView(Protocol):
    def aliases(self) -> Dict[int, str]:
        """``id(tensor) -> name`` for the other identities of the trainable parameters."""

    def targets(self) -> Dict[str, torch.nn.Parameter]:
        """``name -> parameter`` on which the private gradient is written (the optimizer's)."""


def get_view(model: torch.nn.Module) -> Optional[ParameterView]:
    return model.__dict__.get(VIEW_ATTR)


def set_view(model: torch.nn.Module, view: Optional[ParameterView]) -> None:
    if view is None:
        model.__dict__.pop(VIEW_ATTR, None)
    else:
        model.__dict__[VIEW_ATTR] = view


def trainable_ids(model: torch.nn.Module) -> Dict[int, str]:
    """``id(tensor) -> name`` for every identity of every trainable parameter (module docstring)."""
    out = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    view = get_view(model)
    if view is not None:
        out.update(view.aliases())
    return out


def write_targets(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """``name -> parameter`` whose ``private_grad`` receives the clipped sum (module docstring)."""
    view = get_view(model)
    return view.targets() if view is not None else dict(model.named_parameters())
