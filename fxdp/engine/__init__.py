"""Layer 3 -- the gradient engine: one backward pass gives per-sample-clipped gradient sums.

Read in this order:

- :mod:`~fxdp.engine.install`: ``privatize`` / ``unprivatize`` (the engine-level entry point: the model
  object stays the same, two forward hooks and an :class:`~fxdp.engine.engine.Engine` are attached).
- :mod:`~fxdp.engine.tap`: the records of one parameter use (glossary there) and the tap that captures its
  output gradient without letting autograd compute the plain weight gradient.
- :mod:`~fxdp.engine.recorder`: routes the interceptor's bound calls of a training forward through taps, with
  the batch layouts the analysis found.
- :mod:`~fxdp.engine.engine`: opens a forward pass per batch, receives the taps in backward, finalizes once at
  the end of backward.
- :mod:`~fxdp.engine.clipping`: per-group clip factors for each clipping function (pure).
- :mod:`~fxdp.engine.compiled_hook`: the engine's only interface to compiled forward passes (the compile layer
  fills it in).

Guarantee: after ``loss.backward()`` every trainable parameter ``p`` holds
``p.private_grad += Σ_b C_b(group(p)) · ∇_p ℓ_b`` with each sample's whole clipped contribution of norm ≤ R.
"""
