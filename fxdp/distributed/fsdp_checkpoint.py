"""Checkpoints of an FSDP2 DP run: sharded model and optimizer through torch.distributed.checkpoint (DCP).

``path`` is a directory (on a file system every rank can read and write, as DCP requires). It holds:

- the DCP checkpoint of ``{"model": ..., "optim": ...}``: the sharded state dicts of
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` (each rank writes its own shards;
  the inner optimizer's states are DTensors like the parameters);
- ``fxdp_state.pt`` (written by rank 0, ``torch.load(weights_only=True)``): the accountant, the
  world size, the sampler's epoch, and per rank: the DP state of its optimizer (its own noise
  generator's state, steps taken, the accounting hook), its Poisson selection generator and its
  global RNG states; your ``checkpoint_dict`` entries.

Both functions are collective. A resume at the same world size continues exactly (same batches,
same noise on every shard, same updates; for a checkpoint taken at the end of a pass over the
loader, as with :mod:`fxdp.distributed.checkpoint`); every rank's noise stream continues where it
stopped and is never replayed. Another world size is refused: the noise streams belong to the
shards of the saving ranks. In secure mode no generator state is saved and the resume draws fresh
OS-seeded noise.
"""
from __future__ import annotations

import io
import os

import torch

from fxdp.distributed.agreement import agree, all_gather_bytes

STATE_FILE = "fxdp_state.pt"
FORMAT = 1


def _to_bytes(obj) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _rank_state(dp, optimizer) -> dict:
    keep = not dp.secure_mode and dp.sampler_generator is not None
    return {"optimizer": optimizer.dp_state_dict() if optimizer is not None else None,
            "sampler": dp.sampler_generator.get_state() if keep else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None}


def save(dp, *, path, module, optimizer=None, noise_scheduler=None, checkpoint_dict=None,
         module_state_dict_kwargs=None, torch_save_kwargs=None) -> None:
    """Collective: DCP-save the shards, gather the per-rank DP states to rank 0 (module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if module_state_dict_kwargs:
        raise ValueError("fxdp: module_state_dict_kwargs is not supported for FSDP2 checkpoints (DCP state dicts).")
    group = dp.process_group
    inner_opt = optimizer.original_optimizer if optimizer is not None else None
    model_sd, optim_sd = get_state_dict(module, inner_opt if inner_opt is not None else [])
    state = {"model": model_sd}
    if inner_opt is not None:
        state["optim"] = optim_sd
    error = None
    try:
        os.makedirs(path, exist_ok=True)
    except Exception as exc:
        error = exc
    agree(error, "save_checkpoint (creating the directory)", group=group)
    dcp.save(state, checkpoint_id=path, process_group=group)
    per_rank = all_gather_bytes(_to_bytes(_rank_state(dp, optimizer)), group)
    error = None
    if dp.rank == 0:
        try:
            out = dict(checkpoint_dict or {})
            out["fxdp_fsdp_state"] = {
                "format": FORMAT, "world_size": dp.world_size, "secure_mode": dp.secure_mode,
                "epoch": int(getattr(dp.data_loader.batch_sampler, "epoch", 0)) if dp.data_loader else 0,
                "accountant": dp.accountant.state_dict(), "ranks": per_rank,
                "noise_scheduler": noise_scheduler.state_dict() if noise_scheduler is not None else None,
            }
            torch.save(out, os.path.join(path, STATE_FILE), **(torch_save_kwargs or {}))
        except Exception as exc:
            error = exc
    agree(error, "save_checkpoint", group=group)


def load(dp, *, path, module, optimizer=None, noise_scheduler=None, module_load_dict_kwargs=None,
         torch_load_kwargs=None, restore_rng_state: bool = True) -> dict:
    """Collective: DCP-load the shards into ``module`` / ``optimizer`` and restore this rank's DP state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    group = dp.process_group
    error, data = None, None
    try:
        data = torch.load(os.path.join(path, STATE_FILE), weights_only=True, **(torch_load_kwargs or {}))
        meta = data.pop("fxdp_fsdp_state")
        if meta.get("format") != FORMAT:
            raise ValueError("fxdp: unknown FSDP checkpoint format.")
        if int(meta["world_size"]) != dp.world_size:
            raise ValueError(f"fxdp: this FSDP checkpoint was written by {meta['world_size']} ranks, this run has "
                             f"{dp.world_size}: the noise streams belong to the saving ranks' shards. Resume on "
                             "the same world size.")
        if meta["secure_mode"] != dp.secure_mode:
            raise ValueError("fxdp: the checkpoint and this run differ in secure_mode.")
    except Exception as exc:
        error = exc
    agree(error, "load_checkpoint (reading fxdp_state.pt)", group=group)
    inner_opt = optimizer.original_optimizer if optimizer is not None else None
    model_sd, optim_sd = get_state_dict(module, inner_opt if inner_opt is not None else [])
    state = {"model": model_sd}
    if inner_opt is not None:
        state["optim"] = optim_sd
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_state_dict(module, inner_opt if inner_opt is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    error = None
    try:
        mine = torch.load(io.BytesIO(meta["ranks"][dp.rank].numpy().tobytes()), weights_only=True)
        dp.accountant.load_state_dict(meta["accountant"])
        if optimizer is not None and mine["optimizer"] is not None:
            optimizer.load_dp_state_dict(mine["optimizer"])
        if noise_scheduler is not None and meta["noise_scheduler"] is not None:
            noise_scheduler.load_state_dict(meta["noise_scheduler"])
        if dp.data_loader is not None:
            dp.data_loader.batch_sampler.set_epoch(int(meta["epoch"]))
        if mine["sampler"] is not None and dp.sampler_generator is not None:
            dp.sampler_generator.set_state(mine["sampler"])
        if restore_rng_state:
            torch.set_rng_state(mine["rng"])
            if mine["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(mine["cuda_rng"])
    except Exception as exc:
        error = exc
    agree(error, "load_checkpoint", group=group)
    return data
