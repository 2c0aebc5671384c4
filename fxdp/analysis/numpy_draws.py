"""numpy's global RNG in analysis runs: every draw is a function of the call's own arguments.

Some models draw from ``np.random`` in training mode -- HuggingFace's SpecAugment time masks
(Wav2Vec2, HuBERT, ...: ``_compute_mask_indices`` loops over the samples, ``np.random.choice`` per sample).
Seeding numpy alike for every analysis run is not enough: a loop over the batch gives the mask drawn
*k*-th to whichever sample sits at position *k*, so the run with the samples reordered would see each
sample with another mask, which looks exactly like a model that mixes samples. Inside
:func:`argument_seeded_numpy`, each call of a module-level ``np.random`` function (``np.random.choice``,
``rand``, ``permutation``...) first reseeds numpy's global generator from the function's name and its
arguments: a draw per sample (arguments from the sample's own length) follows the sample, and a draw over
the batch (``np.random.permutation(B)``) is still a real, fixed shuffle, which the analysis sees move
samples across the batch (as with torch's ``randperm``, seeded alike for every run).

The user's stream is untouched: :func:`fxdp.analysis.capture.quiet_state` saves numpy's global state
before the analysis and restores it after, so the training forward draws what it would have drawn without
fxdp. A generator object the model holds (``np.random.default_rng(...)``) is not redirected: its draws
differ between runs and the analysis refuses such a model as randomness that differs per call.
"""
from __future__ import annotations

import contextlib
import hashlib

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional for torch
    np = None


def _token(x, h) -> None:
    if isinstance(x, (list, tuple)):
        h.update(b"(")
        for y in x:
            _token(y, h)
        h.update(b")")
    elif isinstance(x, dict):
        _token(sorted(x.items(), key=lambda kv: kv[0]), h)
    elif isinstance(x, np.ndarray):
        h.update(repr((x.dtype.str, x.shape)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        h.update(repr(x).encode())


def _seeded(name, fn, state, base):
    def draw(*args, **kwargs):
        h = hashlib.blake2b(repr((base, name)).encode(), digest_size=8)
        _token((args, kwargs), h)
        state.seed(int.from_bytes(h.digest(), "little") % 2 ** 32)
        return fn(*args, **kwargs)
    return draw


@contextlib.contextmanager
def argument_seeded_numpy(base: int):
    """While open, the module-level ``np.random`` functions reseed numpy's global generator from ``base``,
    their name and their arguments before each draw (see module docstring)."""
    if np is None:
        yield
        return
    state = np.random.mtrand._rand
    saved = {name: fn for name, fn in vars(np.random).items()
             if callable(fn) and getattr(fn, "__self__", None) is state and name not in
             ("seed", "get_state", "set_state", "get_bit_generator", "set_bit_generator")}
    for name, fn in saved.items():
        setattr(np.random, name, _seeded(name, fn, state, base))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(np.random, name, fn)
