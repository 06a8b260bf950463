"""Basic layers with torchvision's semantics and parameter names.

Conventions (stated once for the whole library):
  * activations are NHWC float arrays;
  * conv kernels are HWIO (torch OIHW is transposed by ``convert/``);
  * dense kernels are [in, out] (torch [out, in] is transposed by ``convert/``);
  * attribute names mirror torchvision's module names so that a torch key such as
    ``backbone.body.layer1.0.conv1.weight`` maps to the NNX path
    ``('backbone', 'body', 'layer1', 0, 'conv1', 'kernel')`` by a table, not by code.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maskx_jax.conv import conv2d

Array = jax.Array
Initializer = Callable[..., Array]


class FrozenStat(nnx.Variable):
    """A variable that is never trained: FrozenBatchNorm buffers and the weights of frozen stages.

    Kept apart from ``nnx.Param`` so that optimisers (which filter on ``nnx.Param``) never see it
    and hold no state for it, as torchvision's FrozenBatchNorm2d registers buffers. Checkpoint
    paths do not depend on the type, so a frozen and a trainable model load the same files.
    """


def variable(value: Array, frozen: bool) -> nnx.Variable:
    """``nnx.Param(value)``, or a :class:`FrozenStat` when the owning layer is frozen."""
    return FrozenStat(value) if frozen else nnx.Param(value)


class FrozenBatchNorm(nnx.Module):
    """torchvision ``FrozenBatchNorm2d``: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Computed as torchvision does (scale = weight * rsqrt(var + eps); bias' = bias - mean * scale)
    so converted weights give the same numbers. ``eps`` is 1e-5 by default; torchvision sets it
    to 0.0 when it loads its legacy COCO v1 Mask R-CNN weights.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        self.num_features: int = num_features
        self.eps: float = eps
        self.weight = FrozenStat(jnp.ones((num_features,), jnp.float32))
        self.bias = FrozenStat(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = FrozenStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = FrozenStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: Array, valid: Array | None = None) -> Array:
        """x: [..., C] -> [..., C]. ``valid`` (the extent mask GroupNorm takes) is not needed: no statistics."""
        del valid
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
        shift = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class GroupNorm(nnx.Module):
    """torch ``nn.GroupNorm`` over the channel axis of NHWC inputs (``weight``/``bias`` like torch).

    Normalises per sample, so it trains from scratch with any per-device batch size and needs no
    cross-device statistics (the reason it is offered beside FrozenBN).
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, frozen: bool = False):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: {num_features} channels are not divisible into {num_groups} groups")
        self.num_groups: int = num_groups
        self.eps: float = eps
        self.weight = variable(jnp.ones((num_features,), jnp.float32), frozen)
        self.bias = variable(jnp.zeros((num_features,), jnp.float32), frozen)

    def __call__(self, x: Array, valid: Array | None = None) -> Array:
        """x: [N, H, W, C] -> [N, H, W, C].

        valid: optional [N, H, W, 1] bool; the statistics then cover only these positions (an image's extent
        on a larger canvas, see :mod:`maskx_jax.canvas`). Outputs outside it are computed but meaningless.
        """
        n, h, w, c = x.shape
        g = x.reshape(n, h, w, self.num_groups, c // self.num_groups).astype(jnp.float32)
        if valid is None:
            mean = g.mean(axis=(1, 2, 4), keepdims=True)
            var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        else:
            m = valid[..., None].astype(jnp.float32)  # [N, H, W, 1, 1]
            count = jnp.maximum(m.sum(axis=(1, 2), keepdims=True), 1.0) * (c // self.num_groups)
            mean = (g * m).sum(axis=(1, 2, 4), keepdims=True) / count
            var = (jnp.square(g - mean) * m).sum(axis=(1, 2, 4), keepdims=True) / count
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c).astype(x.dtype)
        return y * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def kaiming_normal_fan_out() -> Initializer:
    """torch ``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` for HWIO kernels."""
    return nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def kaiming_uniform_a1() -> Initializer:
    """torch ``kaiming_uniform_(a=1)`` (used by torchvision's FPN): U(-sqrt(3/fan_in), sqrt(3/fan_in))."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


class Conv2d(nnx.Module):
    """2-D convolution with torch's explicit symmetric zero padding (never 'SAME').

    kernel: [kh, kw, in, out] (HWIO); bias: [out] or absent. ``impl``: how :func:`maskx_jax.conv.conv2d`
    computes it (``model.conv_impl``; the detector sets it on every Conv2d when it is built).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        kernel_init: Initializer = kaiming_normal_fan_out(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        frozen: bool = False,
        rngs: nnx.Rngs,
    ):
        self.in_features: int = in_features
        self.out_features: int = out_features
        self.kernel_size: int = kernel_size
        self.stride: int = stride
        self.padding: int = padding
        self.impl: str = "auto"
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = variable(kernel_init(rngs.params(), shape, jnp.float32), frozen)
        self.bias = variable(bias_init(rngs.params(), (out_features,), jnp.float32), frozen) if use_bias else None

    def __call__(self, x: Array) -> Array:
        """x: [N, H, W, in] -> [N, H', W', out]."""
        y = conv2d(x, self.kernel[...].astype(x.dtype), self.stride, self.padding, self.impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Linear(nnx.Module):
    """Fully connected layer. kernel: [in, out]; bias: [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        self.in_features: int = in_features
        self.out_features: int = out_features
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        """x: [..., in] -> [..., out]."""
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class ConvTranspose2x2(nnx.Module):
    """torch ``ConvTranspose2d(kernel_size=2, stride=2, padding=0)``: exact 2x upsampling.

    With kernel 2 and stride 2 the output windows do not overlap, so
    out[n, 2i+a, 2j+b, o] = sum_c x[n, i, j, c] * kernel[a, b, c, o] + bias[o].
    kernel: [2, 2, in, out] (torch stores [in, out, 2, 2]).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.in_features: int = in_features
        self.out_features: int = out_features
        # torchvision initialises conv5_mask with kaiming_normal(fan_out, relu); for a transposed
        # conv torch's "fan_out" is in_channels * k * k.
        std = (2.0 / (in_features * 4)) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (2, 2, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        """x: [N, H, W, in] -> [N, 2H, 2W, out]."""
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,abco->nhawbo", x, self.kernel[...].astype(x.dtype))
        y = y.reshape(n, 2 * h, 2 * w, self.out_features)
        return y + self.bias[...].astype(y.dtype)


def max_pool(x: Array, kernel: int, stride: int, padding: int) -> Array:
    """torch ``max_pool2d`` with explicit padding (pads with -inf). x: [N, H, W, C]."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )


def nearest_resize(x: Array, size: Sequence[int]) -> Array:
    """torch ``F.interpolate(mode='nearest', size=size)``: src = floor(dst * in / out).

    x: [N, H, W, C] -> [N, size[0], size[1], C]. Static index tables, so it jit-compiles to gathers.
    """
    import numpy as np

    h, w = x.shape[1], x.shape[2]
    oh, ow = int(size[0]), int(size[1])
    # torch computes the scale in float32 (in / out) and floors dst * scale.
    iy = np.minimum(np.floor(np.arange(oh, dtype=np.float32) * np.float32(h / oh)).astype(np.int64), h - 1)
    ix = np.minimum(np.floor(np.arange(ow, dtype=np.float32) * np.float32(w / ow)).astype(np.int64), w - 1)
    return x[:, iy][:, :, ix]
