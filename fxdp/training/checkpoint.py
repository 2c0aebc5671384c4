"""Checkpoints of a DP training run that resume exactly and never replay noise.

A checkpoint (a dict of plain containers, numbers, strings and tensors, so
``torch.load(weights_only=True)`` reads it) holds:

- ``module_state_dict``, ``optimizer_state_dict`` (the inner optimizer's, plus
  the DP state under ``"fxdp"``: noise generator states, step count, the
  accounting hook's state), ``privacy_accountant_state_dict`` (Opacus format),
  ``noise_scheduler_state_dict`` if given;
- ``fxdp_state``: the Poisson sampler's generator state and torch's global RNG
  states (CPU, and CUDA when initialised), so that batches, dropout and noise
  after the resume are those of the uninterrupted run;
- your own entries from ``checkpoint_dict``.

Bit-exact resumption holds for checkpoints taken at an epoch boundary (a new
loader iterator draws its base seed from the sampler's generator, so a
mid-epoch resume continues with fresh, equally valid Poisson batches instead).

Noise after a resume continues the saved stream: it never repeats an earlier
draw. Loading the same checkpoint twice does replay the same continuation (that
is what makes resumption exact); if two such forks trained on different data
were both released, subtracting them would cancel the noise -- use
``secure_mode=True`` for that situation: then no generator state is saved and
every resume draws fresh OS-seeded noise (and resumption is not bit-exact).
"""
from __future__ import annotations

import warnings

import torch

FORMAT = 1
RESERVED = ("module_state_dict", "optimizer_state_dict", "privacy_accountant_state_dict",
            "noise_scheduler_state_dict", "fxdp_state")


def save(engine, *, path, module, optimizer=None, noise_scheduler=None, checkpoint_dict=None,
         module_state_dict_kwargs=None, torch_save_kwargs=None) -> None:
    """Write the checkpoint of ``engine`` (a PrivacyEngine) to ``path`` (see the module docstring)."""
    out = dict(checkpoint_dict or {})
    clash = [k for k in RESERVED if k in out]
    if clash:
        raise ValueError(f"fxdp: checkpoint_dict uses reserved key(s) {clash}.")
    out["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
    out["privacy_accountant_state_dict"] = engine.accountant.state_dict()
    if optimizer is not None:
        out["optimizer_state_dict"] = optimizer.state_dict()
    if noise_scheduler is not None:
        out["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
    sampler_state = None
    if not engine.secure_mode and engine.sampler_generator is not None:
        sampler_state = engine.sampler_generator.get_state()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    out["fxdp_state"] = {"format": FORMAT, "secure_mode": engine.secure_mode,
                         "sampler_generator_state": sampler_state, "rng_state": rng}
    torch.save(out, path, **(torch_save_kwargs or {}))


def load(engine, *, path, module, optimizer=None, noise_scheduler=None, module_load_dict_kwargs=None,
         torch_load_kwargs=None, restore_rng_state=True) -> dict:
    """Restore a checkpoint into ``engine``, ``module``, ``optimizer``; return the user's entries."""
    load_kwargs = dict(torch_load_kwargs or {})
    if load_kwargs.pop("weights_only", True) is not True:
        raise ValueError("fxdp: checkpoints are loaded with weights_only=True (no arbitrary code on load).")
    data = torch.load(path, weights_only=True, **load_kwargs)
    state = data.pop("fxdp_state", None)
    if state is None or state.get("format") != FORMAT:
        raise ValueError("fxdp: not an fxdp checkpoint (no fxdp_state of a known format); it would not restore the "
                         "noise and sampler streams.")
    if state["secure_mode"] and not engine.secure_mode:
        raise ValueError("fxdp: this checkpoint was written in secure mode and carries no generator state; load it "
                         "with PrivacyEngine(secure_mode=True).")
    module.load_state_dict(data.pop("module_state_dict"), **(module_load_dict_kwargs or {}))
    engine.accountant.load_state_dict(data.pop("privacy_accountant_state_dict"))
    optimizer_state = data.pop("optimizer_state_dict", None)
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    elif (optimizer is None) != (optimizer_state is None):
        warnings.warn("fxdp: the checkpoint has " + ("no optimizer state" if optimizer_state is None else
                      "an optimizer state but no optimizer was given") + "; the noise stream is not restored.",
                      UserWarning)
    scheduler_state = data.pop("noise_scheduler_state_dict", None)
    if noise_scheduler is not None and scheduler_state is not None:
        noise_scheduler.load_state_dict(scheduler_state)
    if not engine.secure_mode:
        sampler_state = state["sampler_generator_state"]
        if sampler_state is not None and engine.sampler_generator is not None:
            engine.sampler_generator.set_state(sampler_state)
        elif (sampler_state is None) != (engine.sampler_generator is None):
            warnings.warn("fxdp: the sampler's generator could not be restored (the checkpoint and this run "
                          "disagree on whether the sampler has its own generator); the batches after the resume "
                          "differ from the uninterrupted run's.", UserWarning)
    if restore_rng_state:
        torch.set_rng_state(state["rng_state"]["cpu"])
        if "cuda" in state["rng_state"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_state"]["cuda"])
    return data
