"""Layer 5 -- the DP training stack over the engine's private gradients.

- :mod:`~fxdp.training.noise`: Gaussian noise sources (seeded or OS-entropy, secure mode).
- :mod:`~fxdp.training.optimizer`: ``DPOptimizer`` (check -> reduce -> add noise -> scale -> inner step).
- :mod:`~fxdp.training.loaders`: Poisson data loaders and ``BatchMemoryManager`` (virtual steps).
- :mod:`~fxdp.training.accounting`: what one step costs for the sampling actually used (over Opacus's
  accountants), hooked onto the optimizer by the entry points.
- :mod:`~fxdp.training.checkpoint`: weights-only-safe checkpoints with accountant, sampler and noise state.
- :mod:`~fxdp.training.losses`: per-sample losses (``per_sample_loss``).
- :mod:`~fxdp.training.privacy_engine`: ``PrivacyEngine`` with Opacus's calling conventions.
"""
