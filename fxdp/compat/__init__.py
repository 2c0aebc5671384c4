"""Entry points with other libraries' calling conventions, over fxdp's engine.

- ``fxdp.compat.fastdp.PrivacyEngine``: fastDP's ``PrivacyEngine(module, batch_size=, sample_size=, ...)``
  with ``attach(optimizer)`` / ``detach()``.
- Opacus: ``fxdp.PrivacyEngine`` itself follows Opacus's API (``make_private``,
  ``make_private_with_epsilon``, ``get_epsilon``, checkpoints), and
  ``fxdp.BatchMemoryManager`` Opacus's virtual steps.

The differences from the originals are the privacy fixes; each module lists them.
"""
from fxdp.compat import fastdp

__all__ = ["fastdp"]
