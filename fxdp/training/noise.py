"""Gaussian noise for DP-SGD: where the randomness comes from, and how it is drawn.

Guarantees:

- Every draw is made in float32 (whatever the parameter dtype; the caller
  casts afterwards), with standard deviation exactly ``std``.
- ``std == 0`` draws nothing and leaves the generator untouched.
- Without a user generator and outside secure mode, noise comes from
  dedicated ``torch.Generator`` objects (one per device type), each seeded
  from torch's global RNG when first used: a run seeded with
  ``torch.manual_seed`` is reproducible, and the noise stream is separate
  from the one dropout or data shuffling use.
- ``state_dict()`` captures the generators' states (uint8 tensors, loadable
  with ``torch.load(weights_only=True)``); ``load_state_dict`` continues the
  stream exactly where it stopped, so a resumed run never replays an earlier
  draw (replayed noise cancels when two releases are subtracted).

Secure mode (``secure=True``), and what it does and does not protect against:

- Each step's generators are re-seeded with 64 fresh bits from the operating
  system (``secrets.randbits``), so the noise cannot be predicted from the
  program's seed, from an earlier step, or from a checkpoint: no generator
  state is ever saved, and loading a checkpoint never replays noise.
- Each noise value is ``(z1 + z2 + z3 + z4) / 2`` with four independent
  Gaussian draws: the mitigation of floating-point attacks on the Gaussian
  sampler (Holohan & Braghin 2021, section 5.1; used by Opacus's secure mode).
- It does NOT make torch's generators cryptographic: Mersenne Twister (CPU)
  or Philox (CUDA) expand each 64-bit seed deterministically, so an adversary
  with unbounded computation could in principle search the seeds. It does not
  protect against an attacker who can read the process memory, and it does
  not apply to randomness this module does not produce (the data sampler
  needs its own OS-seeded generator; ``fxdp.PrivacyEngine(secure_mode=True)``
  gives it one). Resumed runs are not bit-identical in secure mode.
"""
from __future__ import annotations

import secrets
from typing import Dict, Optional

import torch

_SEED_BOUND = 2 ** 63 - 1


def seed_from_global_rng() -> int:
    """A 63-bit seed drawn from torch's (CPU) global generator: reproducible under ``torch.manual_seed``."""
    return int(torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64))


def generator_from_global_rng(device="cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded from torch's global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_from_global_rng())
    return g


def generator_from_os_entropy(device="cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with 64 bits from the operating system."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(64))
    return g


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    index = device.index if device.index is not None else torch.empty(0, device=device).device.index
    return f"{device.type}:{index}"


class NoiseSource:
    """Draws float32 Gaussian noise; owns the generator state that a checkpoint must carry.

    Args:
        generator: a user ``torch.Generator``; all noise comes from it (drawn on
            its device, then moved). None: one dedicated generator per device,
            seeded from the global RNG when first needed.
        secure: secure mode (see the module docstring); refuses a user generator.
    """

    def __init__(self, generator: Optional[torch.Generator] = None, secure: bool = False):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"fxdp: generator must be a torch.Generator, got {type(generator).__name__}.")
        if secure and generator is not None:
            raise ValueError("fxdp: secure_mode draws its own OS-seeded noise; passing a generator (a seed) "
                             "is refused in secure mode.")
        self.secure = bool(secure)
        self.user_generator = generator
        self.generators: Dict[str, torch.Generator] = {}
        self.pending_states: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ generators
    def _generator_for(self, device) -> torch.Generator:
        if self.user_generator is not None:
            return self.user_generator
        key = _device_key(device)
        g = self.generators.get(key)
        if g is None:
            if self.secure:
                g = generator_from_os_entropy(key)
            else:
                g = torch.Generator(device=key)
                if key in self.pending_states:
                    g.set_state(self.pending_states.pop(key))
                else:
                    g.manual_seed(seed_from_global_rng())
            self.generators[key] = g
        return g

    def begin_step(self) -> None:
        """Called once per logical step before the draws: re-seeds from the OS in secure mode."""
        if self.secure:
            for g in self.generators.values():
                g.manual_seed(secrets.randbits(64))

    def draw(self, shape, std: float, device) -> Optional[torch.Tensor]:
        """N(0, std^2) of ``shape`` in float32 on ``device``; None when ``std == 0``."""
        if std == 0:
            return None
        g = self._generator_for(device)
        if self.secure:
            # four draws combined: the floating-point attack mitigation (sum / 2 keeps the std)
            total = torch.zeros(shape, dtype=torch.float32, device=g.device)
            for _ in range(4):
                total += torch.normal(0.0, std, size=tuple(shape), generator=g, dtype=torch.float32,
                                      device=g.device)
            noise = total / 2
        else:
            noise = torch.normal(0.0, std, size=tuple(shape), generator=g, dtype=torch.float32, device=g.device)
        return noise.to(device)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Generator states (uint8 tensors); empty states in secure mode (nothing may be replayed)."""
        if self.secure:
            return {"kind": "secure"}
        if self.user_generator is not None:
            return {"kind": "user", "state": self.user_generator.get_state()}
        states = dict(self.pending_states)
        states.update({k: g.get_state() for k, g in self.generators.items()})
        return {"kind": "per-device", "states": states}

    def load_state_dict(self, state: dict) -> None:
        """Continue the noise stream of ``state``. Secure mode ignores it (fresh OS entropy)."""
        kind = state.get("kind")
        if self.secure:
            return
        if kind == "secure":
            raise ValueError("fxdp: this checkpoint was written in secure mode and carries no noise state; "
                             "load it with secure_mode=True (fresh OS-seeded noise).")
        if kind == "user":
            if self.user_generator is None:
                raise ValueError("fxdp: the checkpoint's noise came from a user generator; pass a "
                                 "torch.Generator (generator=/noise_generator=) to load it into.")
            self.user_generator.set_state(state["state"])
            return
        if kind == "per-device":
            if self.user_generator is not None:
                raise ValueError("fxdp: the checkpoint's noise came from fxdp's own generators, but a user "
                                 "generator was given; drop it to resume this noise stream.")
            self.generators = {}
            self.pending_states = dict(state["states"])  # restored when each device first draws
            return
        raise ValueError(f"fxdp: unknown noise state kind {kind!r}.")
