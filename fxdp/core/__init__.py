"""Layer 0 -- the vocabulary every other layer speaks, with no torch.fx and no engine.

- :mod:`~fxdp.core.config`: the typed configuration (``DPConfig``); the only place where strings such as
  ``"block-wise"`` are parsed.
- :mod:`~fxdp.core.errors`: the error types (every refusal is a ``PrivacyError`` subclass or a ``ValueError``).
- :mod:`~fxdp.core.layout`: where the samples of a batch sit inside a tensor (``BatchLayout``).
- :mod:`~fxdp.core.inputs`: the batch size and batch dimension of a forward call's inputs.
"""
