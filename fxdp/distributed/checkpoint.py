"""Checkpoints of a distributed DP run: written by rank 0, read by rank 0, resumed exactly.

The file is an ordinary fxdp checkpoint (:mod:`fxdp.training.checkpoint`: model,
optimizer with rank 0's noise stream, accountant; ``torch.load(weights_only=True)``)
plus one entry, ``"fxdp_distributed"``, with what differs between ranks:

- ``world_size`` and the sampler's ``epoch`` (the public shard permutation);
- ``sampler_states[r]``: rank r's Poisson selection generator (not in secure
  mode: those generators are OS-seeded and never saved);
- ``rng_states[r]`` / ``cuda_rng_states[r]``: rank r's global RNG states
  (dropout and other randomness of the forward pass).

Both functions are collective (every rank calls them). Saving gathers the
per-rank states to rank 0, which writes the file; loading lets rank 0 read the
file and broadcast its bytes, so the other ranks need no shared file system.
Resuming on the same world size continues exactly as the uninterrupted run
(same batches on every rank, same noise, same updates), provided the
checkpoint was taken between steps at the end of a pass over the loader (a
new iteration of the loader starts a new pass). On another world size (or
from a single-process checkpoint) the model, optimizer, noise stream and
accountant are restored, each rank keeps its fresh sampler generator, and a
warning says that the batches differ from the uninterrupted run's.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from fxdp.training import checkpoint as ckpt
from fxdp.distributed.agreement import agree, all_gather_bytes, broadcast_bytes

KEY = "fxdp_distributed"


@dataclass
class _EngineView:
    """What :mod:`fxdp.training.checkpoint` reads from an engine; the per-rank sampler state goes under KEY."""

    accountant: object
    secure_mode: bool
    sampler_generator: Optional[torch.Generator] = None


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def save(dp, *, path, module, optimizer=None, noise_scheduler=None, checkpoint_dict=None,
         module_state_dict_kwargs=None, torch_save_kwargs=None) -> None:
    """Collective: gather the per-rank states and write the checkpoint from rank 0 (module docstring)."""
    group = dp.process_group
    user = dict(checkpoint_dict or {})
    if KEY in user:
        raise ValueError(f"fxdp: checkpoint_dict uses the reserved key {KEY!r}.")
    sampler = dp.data_loader.batch_sampler if dp.data_loader is not None else None
    keep_sampler = not dp.secure_mode and dp.sampler_generator is not None
    sampler_states = all_gather_bytes(dp.sampler_generator.get_state() if keep_sampler else torch.empty(0,
                                      dtype=torch.uint8), group)
    rng_states = all_gather_bytes(torch.get_rng_state(), group)
    cuda_states = all_gather_bytes(torch.cuda.get_rng_state() if _cuda_in_use() else torch.empty(0, dtype=torch.uint8),
                                   group)
    error = None
    if dp.rank == 0:
        try:
            user[KEY] = {
                "world_size": dp.world_size,
                "epoch": int(getattr(sampler, "epoch", 0)),
                "sampler_states": sampler_states if keep_sampler else None,
                "rng_states": rng_states,
                "cuda_rng_states": cuda_states if all(t.numel() for t in cuda_states) else None,
            }
            ckpt.save(_EngineView(dp.accountant, dp.secure_mode), path=path, module=module, optimizer=optimizer,
                      noise_scheduler=noise_scheduler, checkpoint_dict=user,
                      module_state_dict_kwargs=module_state_dict_kwargs, torch_save_kwargs=torch_save_kwargs)
        except Exception as exc:
            error = exc
    agree(error, "save_checkpoint", group=group)


def load(dp, *, path, module, optimizer=None, noise_scheduler=None, module_load_dict_kwargs=None,
         torch_load_kwargs=None, restore_rng_state: bool = True) -> dict:
    """Collective: rank 0 reads ``path`` and broadcasts it; every rank restores its state and
    receives the user's own entries (module docstring)."""
    group = dp.process_group
    data, error = None, None
    if dp.rank == 0:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except Exception as exc:
            error = exc
    agree(error, "load_checkpoint (reading the file on rank 0)", group=group)
    payload = broadcast_bytes(data, src=dp.root, group=group)
    error, entries = None, None
    try:
        entries = ckpt.load(_EngineView(dp.accountant, dp.secure_mode), path=io.BytesIO(payload), module=module,
                            optimizer=optimizer, noise_scheduler=noise_scheduler,
                            module_load_dict_kwargs=module_load_dict_kwargs, torch_load_kwargs=torch_load_kwargs,
                            restore_rng_state=False)
        _restore_rank_state(dp, entries.pop(KEY, None), restore_rng_state)
    except Exception as exc:
        error = exc
    agree(error, "load_checkpoint", group=group)
    return entries


def _restore_rank_state(dp, state: Optional[dict], restore_rng_state: bool) -> None:
    if state is None or int(state["world_size"]) != dp.world_size:
        saved = "a single process" if state is None else f"world size {state['world_size']}"
        warnings.warn(f"fxdp: this checkpoint was written by {saved}, this run has world size {dp.world_size}: the "
                      "model, optimizer, noise stream and accountant are restored, but every rank keeps its fresh "
                      "sampler generator, so the batches after the resume differ from an uninterrupted run's.",
                      UserWarning)
        return
    sampler = dp.data_loader.batch_sampler if dp.data_loader is not None else None
    if sampler is not None:
        sampler.set_epoch(int(state["epoch"]))
    if not dp.secure_mode and state["sampler_states"] is not None and dp.sampler_generator is not None:
        dp.sampler_generator.set_state(state["sampler_states"][dp.rank])
    if restore_rng_state:
        torch.set_rng_state(state["rng_states"][dp.rank])
        if state["cuda_rng_states"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng_states"][dp.rank])
