"""A trainable vector written into a batched tensor at masked positions: ``h[mask] = p``.

HuggingFace's SpecAugment (Wav2Vec2, HuBERT, WavLM...) replaces the masked time steps of the features
by a learned vector: ``hidden_states[mask_time_indices] = self.masked_spec_embed``. ``Tensor.__setitem__``
has no rule (its result is None, so the interceptor cannot tap it, and the forward's graph walk refuses
the parameter). The interceptor re-spells it, before the rules, as

    h.copy_(torch.where(mask[..., None, ...], p, h))

-- the values ``h[mask] = p`` writes -- where ``torch.where(cond, p, x)`` is the broadcast rule's: the
parameter broadcast to ``h``'s shape, each sample's gradient the sum of the output gradient over that
sample's masked positions. Exact. Covered form: ``mask`` a bool tensor of the shape of ``h``'s leading
dimensions, ``p`` broadcastable to ``h``'s remaining dimensions (a vector of the feature size); any other
assignment of a parameter is left to the interceptor (refused). Inside a graph the ``fxdp`` backend
compiles it is refused by name (a graph node is tapped as one call).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch._guards

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.virtual import root_names


def masked_assignment(func, args, kwargs, param_ids) -> Optional[Callable[[], None]]:
    """The re-spelling of ``h[mask] = p`` (see module docstring) for a ``p`` among ``param_ids``, else None."""
    if func is not torch.Tensor.__setitem__ or len(args) != 3 or kwargs:
        return None
    h, mask, value = args
    if not (isinstance(value, torch.Tensor) and id(value) in param_ids) or not isinstance(h, torch.Tensor):
        return None
    if id(h) in param_ids or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return None
    rest = h.dim() - mask.dim()
    if rest < 0 or tuple(mask.shape) != tuple(h.shape[:mask.dim()]) or value.dim() > rest:
        return None
    try:
        torch.broadcast_shapes(value.shape, h.shape[mask.dim():])
    except RuntimeError:
        return None
    if torch._guards.TracingContext.try_get() is not None:
        roots = sorted(root_names(param_ids[id(value)]))
        exc = UncoveredParameterError(
            f"fxdp backend: {', '.join(roots)} is written into a batched tensor at masked positions (h[mask] = p, "
            "e.g. SpecAugment's masked_spec_embed); fxdp cannot tap that assignment inside a compiled graph (eager "
            "fxdp.privatize re-spells it: exact). Train this model with eager fxdp.privatize.")
        exc.param_names = tuple(roots)
        raise exc

    def run():
        cond = mask.reshape(tuple(mask.shape) + (1,) * rest)
        h.copy_(torch.where(cond, value, h))
    return run
