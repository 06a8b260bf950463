"""Feature Pyramid Network (P2-P6) with torchvision's semantics and parameter names."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

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

    def __call__(self, feats: Sequence[Array]) -> list[Array]:
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            top_down = nearest_resize(last_inner, lateral.shape[1:3])
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        # kernel-1 stride-2 max pool is plain subsampling.
        results.append(results[-1][:, ::2, ::2, :])
        return results


class ResNetFPN(nnx.Module):
    """torchvision ``BackboneWithFPN``: ``body`` (ResNet) then ``fpn``. Strides 4, 8, 16, 32, 64."""

    strides: tuple[int, ...] = (4, 8, 16, 32, 64)

    def __init__(self, depth: int = 50, *, out_channels: int = 256, freeze_at: int = 2, norm: str = "frozen_bn",
                 norm_eps: float = 1e-5, rngs: nnx.Rngs):
        self.body = ResNet(depth, freeze_at=freeze_at, norm=norm, norm_eps=norm_eps, rngs=rngs)
        self.fpn = FeaturePyramidNetwork(stage_channels(depth), out_channels, rngs=rngs)
        self.out_channels: int = out_channels

    def __call__(self, images: Array) -> list[Array]:
        """images: [N, H, W, 3] normalised, H and W multiples of 32 -> [P2, ..., P6]."""
        return self.fpn(self.body(images))
