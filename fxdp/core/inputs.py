"""Batch size and the batch dimension of every tensor input of a forward call.

``batch_dim`` is an int (the default dimension of every input) or a dict
mapping an input -- a positional index or a keyword name -- to its batch
dimension, or to None for an input without one. For an input not named in the
dict: the default dimension if it has size B there; otherwise the one
dimension of size B (seq-first attention: x is (T, B, E) while the key padding
mask is (B, S)); no dimension of size B means no batch dimension; several
means the input is ambiguous and must be named in ``batch_dim``. B comes from
the first tensor input; an unnamed input with a larger size along the default
dimension and no dimension of size B (or any larger input when B is 1: a
shared (1,)-shaped timestep passed before the images) makes B ambiguous and is
refused: taking the smaller size would clip the whole batch as one sample.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten_with_path

from fxdp.core.errors import BatchLayoutError

BatchDimSpec = Union[int, Dict[Union[int, str], Optional[int]]]


def _top_key(path):
    """(args, kwargs) path -> positional index or keyword name of the input."""
    if len(path) < 2:
        return None
    first, second = path[0], path[1]
    if isinstance(first, SequenceKey) and first.idx == 0 and isinstance(second, SequenceKey):
        return second.idx
    if isinstance(first, SequenceKey) and first.idx == 1 and isinstance(second, MappingKey):
        return second.key
    return None


def split_spec(spec: BatchDimSpec):
    if isinstance(spec, dict):
        return 0, dict(spec)
    return int(spec), {}


def input_batch_dims(args, kwargs, spec: BatchDimSpec):
    """Return (B, leaves, dims): dims[i] is the batch dim of tensor leaf i or None."""
    default, overrides = split_spec(spec)
    flat, _ = tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in flat]
    keys = [_top_key(path) for path, _ in flat]
    B = None
    for key, t in zip(keys, leaves):
        if isinstance(t, torch.Tensor) and key in overrides and overrides[key] is not None:
            B = int(t.shape[overrides[key]])
            break
    if B is None:
        first = None
        for key, t in zip(keys, leaves):
            if isinstance(t, torch.Tensor) and key not in overrides and t.dim() > default:
                if B is None:
                    B, first = int(t.shape[default]), key
                elif int(t.shape[default]) > B and (B == 1 or B not in tuple(t.shape)):
                    raise BatchLayoutError(
                        f"fxdp: the batch size is ambiguous: input {first!r} has {B} along dimension {default} but "
                        f"input {key!r} has {int(t.shape[default])}. Say where the batch is, e.g. "
                        f"batch_dim={{{first!r}: None, {key!r}: {default}}} (None: no batch dimension).")
    if B is None:
        raise BatchLayoutError(
            f"fxdp: cannot find the batch size: no tensor argument has a dimension {default}. "
            "Pass the batch as a tensor, or say where it is with batch_dim.")
    dims: List[Optional[int]] = []
    for key, t in zip(keys, leaves):
        if not isinstance(t, torch.Tensor):
            dims.append(None)
        elif key in overrides:
            dims.append(overrides[key])
        elif t.dim() > default and t.shape[default] == B:
            dims.append(default)
        else:
            hits = [k for k in range(t.dim()) if t.shape[k] == B]
            if len(hits) > 1:
                raise BatchLayoutError(
                    f"fxdp: input {key!r} of shape {tuple(t.shape)} has several dimensions of the batch size "
                    f"{B}; say which one is the batch with batch_dim={{{key!r}: dim}} (or None).")
            dims.append(hits[0] if hits else None)
    return B, leaves, dims
