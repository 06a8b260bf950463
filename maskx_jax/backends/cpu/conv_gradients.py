"""CPU: 2-D convolutions (NHWC activations, HWIO kernels) whose gradients are canonical convolutions.

Why: XLA:CPU rewrites the two gradient convolutions of a convolution (input gradient: kernel
flipped with in/out swapped; filter gradient: a convolution whose "batch" is the input channels
and whose window is the whole output map) into its fast NHWC/HWIO form only in the top-level
computation. Inside a ``lax.cond`` / ``lax.switch`` branch they stay in their raw form and run
through a naive loop: a mask-head filter gradient for 32 RoIs took 16 s there instead of ~0.1 s
(jaxlib 0.10). The mask branch runs inside a ``lax.switch`` (see ``MaskRCNN._mask_loss``), so its
convolutions spell their gradients out in canonical forms with a custom VJP. The forward is XLA's
own (bitwise equal in the tests); the gradients equal XLA's within float rounding (sums in another
order) and are also faster than XLA:CPU's own forms outside control flow.

The custom VJPs cover stride-1 convolutions (every mask-head, FPN, RPN and ResNet 1x1 convolution;
strided 1x1 ones are subsampled first; the 1x1 filter gradient is a matrix product, the others see
``_filter_grad``) and strided ones (ResNet's stride-2 3x3 and the stem), whose gradients are taken per
phase of the input as stride-1 ones (``_conv_strided_bwd``). :func:`maskx_jax.conv.conv2d` takes this path
on CPU when ``model.conv_impl`` is ``auto`` or ``canonical``; other platforms always use JAX's own gradients.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")


def xla_conv2d(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """XLA's own convolution with torch's symmetric zero padding (NHWC, HWIO), JAX's own gradients."""
    p = padding
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)), dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_s1(x: Array, kernel: Array, padding: int) -> Array:
    return xla_conv2d(x, kernel, 1, padding)


def _conv_s1_fwd(x: Array, kernel: Array, padding: int):
    return xla_conv2d(x, kernel, 1, padding), (x, kernel)


def _conv_s1_bwd(padding: int, residuals, g: Array):
    x, kernel = residuals
    k = kernel.shape[0]
    # d/dx: full correlation of g with the spatially flipped kernel, in/out channels swapped.
    gx = xla_conv2d(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), 1, k - 1 - padding)
    if k == 1 and padding == 0:
        # 1x1: d/dkernel[0, 0] = x^T g over every pixel, a plain matrix product. As a convolution
        # XLA:CPU would first transpose x to [in, H, W, N], an elementwise copy with N innermost that ran
        # at well under 1 GB/s on the backbone's activations.
        gk = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))[None, None]
        return gx.astype(x.dtype), gk.astype(kernel.dtype)
    return gx.astype(x.dtype), _filter_grad(x, g, k, kernel.shape[1], padding).astype(kernel.dtype)


# Up to this many images the filter gradient stacks them into one tall image (see _filter_grad).
STACK_MAX_IMAGES = 2


def _filter_grad(x: Array, g: Array, kh: int, kw: int, padding: int) -> Array:
    """d/dkernel of a stride-1 kh x kw convolution: x [N, H, W, I], g [N, Ho, Wo, O] -> [kh, kw, I, O].

    d/dkernel[a, b, i, o] = sum_{n,h,w} x_pad[n, h + a, w + b, i] g[n, h, w, o]: a convolution with
    batch = input channels and window = the output map. With few images (a backbone, FPN or RPN
    convolution at 1-2 images per device) the images are stacked along the height instead of being
    its feature axis: x_pad becomes one [I, N(H+2p), W+2p, 1] image and g one [N(H+2p)-(kh-1), Wo, 1, O]
    window with kh-1 zero rows after each image, so no product crosses two images. XLA:CPU runs that
    form at 1.2-1.8x the rate of the images-as-features one (whose input layout puts the 1-2 images
    innermost: 71-146 vs 134-188 GFLOP/s over ResNet-50-FPN's 3x3 shapes); with many images (mask
    head RoIs) the images-as-features form is the faster one (185-189 vs 91-150 GFLOP/s).
    """
    n, h, w, i = x.shape
    o = g.shape[-1]
    p = padding
    if n > STACK_MAX_IMAGES:
        return xla_conv2d(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), 1, p).transpose(1, 2, 0, 3)
    hp, wp = h + 2 * p, w + 2 * p
    xs = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).reshape(n * hp, wp, i).transpose(2, 0, 1)[..., None]
    gs = jnp.pad(g, ((0, 0), (0, hp - g.shape[1]), (0, 0), (0, 0))).reshape(n * hp, g.shape[2], o)
    gs = gs[: n * hp - (kh - 1), :, None, :]
    return xla_conv2d(xs, gs, 1, 0).transpose(1, 2, 0, 3)


_conv_s1.defvjp(_conv_s1_fwd, _conv_s1_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_strided(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    return xla_conv2d(x, kernel, stride, padding)


def _conv_strided_fwd(x: Array, kernel: Array, stride: int, padding: int):
    return xla_conv2d(x, kernel, stride, padding), (x, kernel)


def _conv_strided_bwd(stride: int, padding: int, residuals, g: Array):
    """Both gradients of a stride-s convolution as s x s stride-1 ones, one per phase of the input.

    Tap (a, b) of the kernel only ever reads padded-input pixels (s*i + a, s*j + b), so with a = s*q + r
    and b = s*t + c the convolution is a sum over phases (r, c) of stride-1 VALID convolutions of the
    phase image x_pad[r::s, c::s] with the sub-kernel kernel[r::s, c::s]: the same k*k taps and products
    as the strided convolution, none of them on zeros. XLA:CPU's own gradients of a strided convolution
    are a convolution of the zero-dilated cotangent (input gradient) and a dilated-window one (filter
    gradient), both on a generic loop at 45-80 GFLOP/s for ResNet's stride-2 3x3 convolutions; per phase
    they are the canonical stride-1 forms (``_filter_grad`` and a padded correlation).
    """
    x, kernel = residuals
    s, p = stride, padding
    n, h, w, i = x.shape
    _, ho, wo, o = g.shape
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    mh, mw = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)  # phase-image size (rows/cols of x_pad per phase)
    gk = jnp.zeros(kernel.shape, jnp.float32)
    phases = []
    for r in range(s):
        for c in range(s):
            sub = kernel[r::s, c::s]
            kr, kc = sub.shape[:2]
            if kr == 0 or kc == 0:  # kernel smaller than the stride: this phase is never read
                phases.append(jnp.zeros((n, mh, mw, i), jnp.float32))
                continue
            xrc = xp[:, r::s, c::s][:, : ho + kr - 1, : wo + kc - 1]
            gk = gk.at[r::s, c::s].set(_filter_grad(xrc, g, kr, kc, 0).astype(jnp.float32))
            gx = jax.lax.conv_general_dilated(g, jnp.flip(sub, (0, 1)).swapaxes(2, 3), (1, 1),
                                              ((kr - 1, kr - 1), (kc - 1, kc - 1)), dimension_numbers=_DN)
            phases.append(jnp.pad(gx.astype(jnp.float32),
                                  ((0, 0), (0, mh - gx.shape[1]), (0, mw - gx.shape[2]), (0, 0))))
    # interleave: x_pad[s*m + r, s*u + c] = phase (r, c) [m, u]
    gxp = jnp.stack(phases).reshape(s, s, n, mh, mw, i).transpose(2, 3, 0, 4, 1, 5).reshape(n, mh * s, mw * s, i)
    gx = gxp[:, p: p + h, p: p + w]
    return gx.astype(x.dtype), gk.astype(kernel.dtype)


_conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def conv2d(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """torch ``conv2d`` (square kernel, symmetric zero padding) with the canonical gradients above.

    x [N, H, W, I], kernel [k, k, I, O] -> [N, H', W', O]; the forward equals :func:`xla_conv2d` bitwise.
    """
    k = kernel.shape[0]
    if k == 1 and padding == 0 and stride > 1:
        # A strided 1x1 convolution (ResNet's downsample) reads every stride-th pixel: subsample, then
        # the stride-1 path (same products and sums; XLA's own filter gradient for it is a dilated
        # convolution behind a slow transpose of the activations).
        x, stride = x[:, ::stride, ::stride, :], 1
    if 0 <= padding <= k - 1:
        return _conv_s1(x, kernel, padding) if stride == 1 else _conv_strided(x, kernel, stride, padding)
    return xla_conv2d(x, kernel, stride, padding)
