"""XLA:CPU fast paths (see :mod:`maskx_jax.backends`)."""
