"""Making the ranks agree -- or fail together, with a clear error, instead of hanging.

A collective that only some ranks reach waits forever (until the process
group's timeout). fxdp's distributed layer therefore puts a small collective
in front of every place where ranks could take different paths:

- :func:`check_same_setup`: at setup, every rank digests what must be equal
  everywhere (model structure, DP configuration, optimizer, sampling, world
  size) field by field; an ``all_gather`` of the digests (8 bytes per field)
  finds the fields that differ, and then *every* rank raises
  :class:`RankMismatchError` naming them and showing each rank's value.
- :func:`agree`: before and after the gradient reduction of a step, every
  rank reports whether its local checks failed (and a digest of the layout
  of what it is about to reduce); if one rank failed, it raises its own
  error and the others raise :class:`PeerRankError` quoting it.
- :func:`broadcast_state` copies parameters and buffers from rank 0, and
  :func:`verify_replicas` checks that every rank holds rank 0's values bit for bit.

What it cannot catch: a rank that dies or never calls into fxdp (say, an
exception in the user's own code before setup). Those are bounded by the
process group's timeout (``init_process_group(timeout=...)``); torchrun also
tears the job down when one worker exits with an error.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from fxdp.core.errors import PrivacyError


class RankMismatchError(ValueError):
    """The ranks were set up differently (model, DP configuration, optimizer, sampling)."""


class PeerRankError(RuntimeError):
    """Another rank failed inside a collective step of fxdp; this rank stops too."""


def control_device(group=None) -> torch.device:
    """Where small control tensors must live for the group's backend (CUDA for NCCL-only groups)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def digest(text: str) -> int:
    """A signed 64-bit digest of ``text`` (SHA-256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def all_gather_ints(values: List[int], group=None) -> torch.Tensor:
    """``(world_size, len(values))`` int64 tensor of every rank's ``values`` (on the CPU)."""
    device = control_device(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def all_gather_bytes(data: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's 1-D uint8 tensor ``data`` (lengths may differ), on the CPU, in rank order."""
    data = data.reshape(-1).to(torch.uint8)
    lengths = all_gather_ints([data.numel()], group)[:, 0].tolist()
    device = control_device(group)
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    out = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(out, padded, group=group)
    return [t[:n].cpu() for t, n in zip(out, lengths)]


def broadcast_bytes(data: Optional[bytes], src: int, group=None) -> bytes:
    """``data`` of global rank ``src`` on every rank (other ranks pass None)."""
    device = control_device(group)
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    if data:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    return payload.cpu().numpy().tobytes()


def _gather_strings(text: str, group=None) -> List[str]:
    out: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, text, group=group)
    return [str(t) for t in out]


def _around_difference(text: str, reference: str, width: int) -> str:
    """``text`` cut to ``width`` characters around its first difference from ``reference``."""
    first = next((i for i, (a, b) in enumerate(zip(text, reference)) if a != b), min(len(text), len(reference)))
    start = max(0, first - width // 3)
    return ("..." if start else "") + text[start: start + width] + ("..." if start + width < len(text) else "")


def check_same_setup(fields: Dict[str, str], group=None, width: int = 240) -> None:
    """Raise :class:`RankMismatchError` on every rank if any field's text differs between ranks.

    ``fields`` maps a field name to a text description; each rank must pass the
    same field names in the same order (the names are part of the digest). The
    error shows, for each differing field, rank 0's text and every differing
    rank's text around the first difference."""
    names = list(fields)
    values = [digest(repr(names))] + [digest(fields[n]) for n in names]
    table = all_gather_ints(values, group)
    if bool((table == table[0]).all()):
        return
    if not bool((table[:, 0] == table[0, 0]).all()):
        raise RankMismatchError("fxdp: the ranks run different versions of the distributed setup (different "
                                "fields were compared); run the same code on every rank.")
    differing = [n for i, n in enumerate(names) if not bool((table[:, i + 1] == table[0, i + 1]).all())]
    lines = []
    for name in differing:
        texts = _gather_strings(fields[name], group)
        for r, t in enumerate(texts[1:], start=1):
            if t != texts[0]:
                lines.append(f"  {name} on rank 0: {_around_difference(texts[0], t, width)}")
                lines.append(f"  {name} on rank {r}: {_around_difference(t, texts[0], width)}")
    raise RankMismatchError(
        f"fxdp: the ranks disagree on {', '.join(differing)}; every rank must build the same model, privatize "
        "it with the same configuration and pass the same DP arguments (noise, clipping bound, sampling, "
        "optimizer). Differences:\n" + "\n".join(dict.fromkeys(lines)))


def agree(error: Optional[BaseException], what: str, layout: int = 0, group=None) -> None:
    """Collective: raise on every rank if any rank passes an ``error`` or a different ``layout`` digest
    (what the ranks must share at this point).

    The rank that failed re-raises its own error; the others raise :class:`PeerRankError`
    with its message. Returns normally only when every rank is fine and the layouts match."""
    table = all_gather_ints([1 if error is not None else 0, int(layout)], group)
    failed = [r for r in range(table.shape[0]) if int(table[r, 0])]
    if failed:
        message = "" if error is None else f"{type(error).__name__}: {error}"
        texts = _gather_strings(message, group)
        if error is not None:
            raise error
        quoted = "\n".join(f"  rank {r}: {texts[r]}" for r in failed)
        raise PeerRankError(f"fxdp: {what} failed on rank(s) {failed}; this rank stops as well:\n{quoted}")
    if not bool((table[:, 1] == table[0, 1]).all()):
        raise PrivacyError(
            f"fxdp: {what}: the ranks disagree on what this step sums or applies: different trainable parameters "
            "or private gradient shapes (a parameter frozen or unfrozen on one rank only?), or a different noise "
            "multiplier or optimizer hyperparameter (a noise or learning-rate scheduler stepped on one rank only?).")


def _flat_groups(tensors: Iterable[torch.Tensor]):
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups.values()


@torch.no_grad()
def broadcast_state(tensors: Iterable[torch.Tensor], src: int, group=None) -> None:
    """Overwrite ``tensors`` (parameters, buffers) with the values of global rank ``src``,
    one flat broadcast per (device, dtype)."""
    for ts in _flat_groups(t.detach() for t in tensors):
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def verify_replicas(tensors: Iterable[torch.Tensor], src: int, group=None) -> None:
    """Collective: raise :class:`RankMismatchError` on every rank unless every rank holds exactly
    (bitwise) the values of global rank ``src``. Costs one broadcast of the tensors."""
    tensors = [t.detach() for t in tensors]
    same = True
    for ts in _flat_groups(tensors):
        mine = torch.cat([t.reshape(-1) for t in ts])
        theirs = mine.clone()
        dist.broadcast(theirs, src=src, group=group)
        same = same and torch.equal(mine.view(torch.uint8) if mine.is_floating_point() else mine,
                                    theirs.view(torch.uint8) if theirs.is_floating_point() else theirs)
    table = all_gather_ints([int(same)], group)
    bad = [r for r in range(table.shape[0]) if not int(table[r, 0])]
    if bad:
        raise RankMismatchError(f"fxdp: the parameters/buffers of rank(s) {bad} differ from rank {src}'s; the "
                                "replicas have diverged.")
