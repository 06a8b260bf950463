"""Backend-specific fast paths, kept out of the model code.

The model computes the same function on every backend; what lives here only makes one backend faster and is
chosen explicitly: ``model.conv_impl`` (read when the model is built, see :mod:`maskx_jax.conv`) and
:func:`maskx_jax.backends.cpu.xla_flags.apply_cpu_defaults` (called by the entry points, never on import).

| module | job |
|---|---|
| ``cpu.conv_gradients`` | convolutions with canonical-convolution gradients (fast on XLA:CPU, in ``lax.switch`` too) |
| ``cpu.winograd`` | Winograd F(4x4, 3x3) for large stride-1 3x3 float32 convolutions |
| ``cpu.xla_flags`` | the XLA:CPU flag that takes convolutions out of YNNPACK, set before the backend starts |
"""
