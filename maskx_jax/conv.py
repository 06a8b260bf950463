"""The model's 2-D convolution (NHWC activations, HWIO kernels, torch's symmetric zero padding) and the choice
of implementation, ``model.conv_impl``, fixed when the model is built (``MaskRCNN`` sets it on every
``layers.Conv2d``):

* ``"auto"`` (default): the backend's fast paths where they help. On CPU: Winograd F(4x4, 3x3) for large
  stride-1 3x3 float32 convolutions (:mod:`maskx_jax.backends.cpu.winograd`) and, for the others, gradients
  spelled out as canonical convolutions (:mod:`maskx_jax.backends.cpu.conv_gradients`; without them a
  convolution's gradient inside ``lax.switch`` runs as a naive loop on XLA:CPU, ~100x slower). Elsewhere
  XLA's own.
* ``"canonical"``: on CPU, the canonical gradients without Winograd (rounding ~1e-7 instead of ~5e-6 relative);
  elsewhere XLA's own.
* ``"xla"``: XLA's convolution and JAX's gradients everywhere.

Every choice computes the same function (the tests bound the differences); only speed and rounding differ.
"""
from __future__ import annotations

import jax

from maskx_jax.backends.cpu import conv_gradients, winograd

Array = jax.Array

CONV_IMPLS = ("auto", "canonical", "xla")


def conv2d(x: Array, kernel: Array, stride: int = 1, padding: int = 0, impl: str = "auto") -> Array:
    """torch ``conv2d`` with symmetric zero padding: x [N, H, W, I], kernel [kh, kw, I, O] -> [N, H', W', O].

    impl: one of :data:`CONV_IMPLS` (see the module docstring); the platform is JAX's default backend when
    the function is traced.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "xla" or jax.default_backend() != "cpu" or kernel.shape[0] != kernel.shape[1]:
        return conv_gradients.xla_conv2d(x, kernel, stride, padding)
    if impl == "auto" and winograd.applies(x.shape, kernel.shape, stride, padding, x.dtype):
        return winograd.conv2d(x, kernel, padding)
    return conv_gradients.conv2d(x, kernel, stride, padding)
