"""A batch-free call that writes a (virtual) parameter into a tensor in place: refused.

A call with no input that depends on the samples becomes a *virtual parameter* (:mod:`fxdp.rules.virtual`):
its *result* is replaced by a fresh leaf whose per-sample gradients fxdp forms where it meets the batch. An
in-place op has a second result, its destination, which the user's code keeps using, and which is not that
leaf:

    pos = torch.zeros(T, d); pos[mask] = p      # or pos += p, pos.copy_(torch.where(mask, p, pos)),
    return head(h + pos)                        # pos.scatter_(0, idx, p), pos.index_put_(...), pos[0].add_(p)

``pos`` then holds ``p``'s values but no gradient edge to ``p``: ``p.private_grad`` would be a silent zero
(and every other parameter's clipping factor too large). Detected for every op, whatever its spelling, by the
version counter: a tensor argument of the call (shared with its detached aliases and with its views' base)
whose version moved while the call ran was written in place. Refused, naming the parameters, with the
out-of-place spelling to use (``torch.where(mask, p, pos)`` / ``pos + p``: exact, a virtual parameter).
A batched destination (``h[mask] = p`` on activations, SpecAugment) never reaches here: its call is not
batch-free.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules import func_name
from fxdp.rules.base import root_names_of


def versions(leaves: Iterable) -> List[Tuple[torch.Tensor, int]]:
    """(tensor, version) for every tensor among a call's flattened arguments."""
    return [(t, t._version) for t in leaves if isinstance(t, torch.Tensor)]


def written(before: List[Tuple[torch.Tensor, int]]) -> bool:
    """Whether any tensor of ``before`` was modified in place since."""
    return any(t._version != v for t, v in before)


def batch_free_write_refusal(op: str, names: Iterable[str]) -> UncoveredParameterError:
    roots = root_names_of(names)
    exc = UncoveredParameterError(
        f"fxdp: {op} writes a value computed from trainable parameter(s) {', '.join(roots)} in place into a "
        "tensor that does not depend on the samples (e.g. pos = torch.zeros(T, d); pos[mask] = p, pos += p, "
        "pos.copy_(...), pos.scatter_(...)): fxdp follows a parameter through batch-free code only by the "
        "tensors an op returns, so the gradient reaching that tensor would never reach the parameter (a silent "
        "zero gradient). Write it out of place: pos = torch.where(mask[:, None], p, pos), pos = pos + p, "
        "pos = pos.scatter(...); or freeze the parameter.")
    exc.param_names = roots
    return exc


def refuse_batch_free_write(recorder, func, args, kwargs, trainable: Dict[int, str], before, out):
    """``out`` when the virtual call ``func`` wrote no argument in place; else the recorder's refusal, or, for a
    recorder with ``batch_free_write(func)`` (the analysis runs, which decide which batch-free sites stay
    virtual only after their runs), what that returns (``out``: the analysis refuses the site later,
    :func:`refuse_written_sites`)."""
    if not written(before):
        return out
    defer = getattr(recorder, "batch_free_write", None)
    if defer is not None:
        defer(func)
        return out
    return recorder.refuse(batch_free_write_refusal(func_name(func), trainable.values()), func, args, kwargs, out)


def refuse_written_sites(analysis, records) -> None:
    """The analysis's refusal of every virtual call site of the base run that wrote in place (``records``: the
    base run's, aligned with ``analysis.entries``)."""
    for entry, record in zip(analysis.entries, records):
        if record.virtual and record.writes:
            entry.reason = "writes a parameter in place into a batch-free tensor"
            analysis.problem(batch_free_write_refusal(record.op, record.param_names))
