"""2-D convolution (NHWC activations, HWIO kernels) whose gradients are canonical convolutions on CPU.

Why: XLA:CPU rewrites the two gradient convolutions of a convolution (input gradient: kernel
flipped with in/out swapped; filter gradient: a convolution whose "batch" is the input channels
and whose window is the whole output map) into its fast NHWC/HWIO form only in the top-level
computation. Inside a ``lax.cond`` / ``lax.switch`` branch they stay in their raw form and run
through a naive loop: a mask-head filter gradient for 32 RoIs took 16 s there instead of ~0.1 s
(jaxlib 0.10). The mask branch runs inside a ``lax.switch`` (see ``MaskRCNN._mask_loss``), so its
convolutions spell their gradients out in the canonical form with a custom VJP. The numbers are
the ones XLA computes itself (bitwise equal on CPU in the tests), at the same speed outside
control flow.

The custom VJP covers stride-1 convolutions (every mask-head, FPN, RPN and ResNet 1x1 convolution;
strided 1x1 ones are subsampled first); its 1x1 filter gradient is a matrix product. Strided 3x3/7x7
convolutions keep JAX's own gradient. Other platforms always use JAX's own gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    p = padding
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)), dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_s1(x: Array, kernel: Array, padding: int) -> Array:
    return _conv(x, kernel, 1, padding)


def _conv_s1_fwd(x: Array, kernel: Array, padding: int):
    return _conv(x, kernel, 1, padding), (x, kernel)


def _conv_s1_bwd(padding: int, residuals, g: Array):
    x, kernel = residuals
    k = kernel.shape[0]
    # d/dx: full correlation of g with the spatially flipped kernel, in/out channels swapped.
    gx = _conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), 1, k - 1 - padding)
    if k == 1 and padding == 0:
        # 1x1: d/dkernel[0, 0] = x^T g over every pixel, a plain matrix product. As a convolution
        # XLA:CPU would first transpose x to [in, H, W, N], an elementwise copy with N innermost that ran
        # at well under 1 GB/s on the backbone's activations.
        gk = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))[None, None]
        return gx.astype(x.dtype), gk.astype(kernel.dtype)
    return gx.astype(x.dtype), _filter_grad(x, g, k, padding).astype(kernel.dtype)


# Up to this many images the filter gradient stacks them into one tall image (see _filter_grad).
STACK_MAX_IMAGES = 2


def _filter_grad(x: Array, g: Array, k: int, padding: int) -> Array:
    """d/dkernel of a stride-1 k x k convolution: x [N, H, W, I], g [N, Ho, Wo, O] -> [k, k, I, O].

    d/dkernel[a, b, i, o] = sum_{n,h,w} x_pad[n, h + a, w + b, i] g[n, h, w, o]: a convolution with
    batch = input channels and window = the output map. With few images (a backbone, FPN or RPN
    convolution at 1-2 images per device) the images are stacked along the height instead of being
    its feature axis: x_pad becomes one [I, N(H+2p), W+2p, 1] image and g one [N(H+2p)-(k-1), Wo, 1, O]
    window with k-1 zero rows after each image, so no product crosses two images. XLA:CPU runs that
    form at 1.2-1.8x the rate of the images-as-features one (whose input layout puts the 1-2 images
    innermost: 71-146 vs 134-188 GFLOP/s over ResNet-50-FPN's 3x3 shapes); with many images (mask
    head RoIs) the images-as-features form is the faster one (185-189 vs 91-150 GFLOP/s).
    """
    n, h, w, i = x.shape
    o = g.shape[-1]
    p = padding
    if n > STACK_MAX_IMAGES:
        return _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), 1, p).transpose(1, 2, 0, 3)
    hp, wp = h + 2 * p, w + 2 * p
    xs = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).reshape(n * hp, wp, i).transpose(2, 0, 1)[..., None]
    gs = jnp.pad(g, ((0, 0), (0, hp - g.shape[1]), (0, 0), (0, 0))).reshape(n * hp, g.shape[2], o)
    gs = gs[: n * hp - (k - 1), :, None, :]
    return _conv(xs, gs, 1, 0).transpose(1, 2, 0, 3)


_conv_s1.defvjp(_conv_s1_fwd, _conv_s1_bwd)


def canonical_gradients(platform: str | None = None) -> bool:
    """Whether :func:`conv2d` spells out its gradients on ``platform`` (default: JAX's default backend)."""
    return (platform or jax.default_backend()) == "cpu"


def conv2d(x: Array, kernel: Array, stride: int = 1, padding: int = 0) -> Array:
    """torch ``conv2d`` with symmetric zero padding: x [N, H, W, I], kernel [kh, kw, I, O] -> [N, H', W', O]."""
    k = kernel.shape[0]
    if not canonical_gradients() or kernel.shape[1] != k:
        return _conv(x, kernel, stride, padding)
    if k == 1 and padding == 0 and stride > 1:
        # A strided 1x1 convolution (ResNet's downsample) reads every stride-th pixel: subsample, then
        # the stride-1 path (same products and sums; XLA's own filter gradient for it is a dilated
        # convolution behind a slow transpose of the activations).
        x, stride = x[:, ::stride, ::stride, :], 1
    if stride == 1 and 0 <= padding <= k - 1:
        return _conv_s1(x, kernel, padding)
    return _conv(x, kernel, stride, padding)
