"""Feature Pyramid Network (P2-P6) with torchvision's semantics and parameter names."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from maskx_jax.canvas import Canvas, zero_outside
from maskx_jax.layers import Conv2d, kaiming_uniform_a1, nearest_resize
from maskx_jax.resnet import ResNet, stage_channels

Array = jax.Array


class FeaturePyramidNetwork(nnx.Module):
    """1x1 lateral ``inner_blocks``, 3x3 output ``layer_blocks``, nearest top-down upsampling,
    and P6 = max_pool(kernel 1, stride 2) of P5 (torchvision ``LastLevelMaxPool``).

    Input [C2..C5] NHWC; output [P2, P3, P4, P5, P6], each [N, H_l, W_l, out_channels].
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, *, rngs: nnx.Rngs):
        self.out_channels: int = out_channels
        init = kaiming_uniform_a1()
        self.inner_blocks = nnx.List([Conv2d(c, out_channels, 1, kernel_init=init, rngs=rngs) for c in in_channels])
        self.layer_blocks = nnx.List(
            [Conv2d(out_channels, out_channels, 3, padding=1, kernel_init=init, rngs=rngs) for _ in in_channels])

    def __call__(self, feats: Sequence[Array], canvas: Canvas | None = None,
                 strides: Sequence[int] = (4, 8, 16, 32)) -> list[Array]:
        """feats: C2..C5 at ``strides``; canvas: optional, then every output is zero outside each image's
        extent (the 3x3 convolutions, the RPN's and RoIAlign read no padding torchvision would not have)."""
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](zero_outside(canvas, last_inner, strides[-1]))]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            top_down = nearest_resize(last_inner, lateral.shape[1:3])
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](zero_outside(canvas, last_inner, strides[idx])))
        # kernel-1 stride-2 max pool is plain subsampling.
        results.append(results[-1][:, ::2, ::2, :])
        if canvas is not None:
            out_strides = (*strides, 2 * strides[-1])
            results = [zero_outside(canvas, r, s) for r, s in zip(results, out_strides)]
        return results


class ResNetFPN(nnx.Module):
    """torchvision ``BackboneWithFPN``: ``body`` (ResNet) then ``fpn``. Strides 4, 8, 16, 32, 64."""

    strides: tuple[int, ...] = (4, 8, 16, 32, 64)

    def __init__(self, depth: int = 50, *, out_channels: int = 256, freeze_at: int = 2, norm: str = "frozen_bn",
                 norm_eps: float = 1e-5, rngs: nnx.Rngs):
        self.body = ResNet(depth, freeze_at=freeze_at, norm=norm, norm_eps=norm_eps, rngs=rngs)
        self.fpn = FeaturePyramidNetwork(stage_channels(depth), out_channels, rngs=rngs)
        self.out_channels: int = out_channels

    def __call__(self, images: Array, canvas: Canvas | None = None) -> list[Array]:
        """images: [N, H, W, 3] normalised, H and W multiples of 32 -> [P2, ..., P6].

        canvas: optional (``model.exact_canvas``): each image's features as torchvision computes them on a
        tensor of its own size rounded up to 32, zero beyond it.
        """
        return self.fpn(self.body(images, canvas), canvas, self.strides[:4])
