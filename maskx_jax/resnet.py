"""ResNet-18/34/50/101 backbones with torchvision's layout (stride on the 3x3 conv, "ResNet v1.5").

Attribute names mirror torchvision (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``downsample``) so
that converting a torchvision checkpoint is a renaming table. Input images are NHWC.

Every block takes an optional :class:`~maskx_jax.canvas.Canvas` and the stride of its input: with one, the
inputs of its 3x3 convolutions are zero outside each image's extent and GroupNorm's statistics cover the
extent only (torchvision's numbers on a larger canvas; ``model.exact_canvas``).
"""
from __future__ import annotations


import jax
from flax import nnx

from maskx_jax.canvas import Canvas, inside, zero_outside
from maskx_jax.layers import Conv2d, FrozenBatchNorm, GroupNorm, max_pool

Array = jax.Array

# depth -> (block kind, blocks per stage)
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def stage_channels(depth: int) -> tuple[int, int, int, int]:
    """Output channels of layer1..layer4 (C2..C5) for a ResNet depth."""
    kind, _ = RESNET_SPECS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    return tuple(64 * 2**i * expansion for i in range(4))  # type: ignore[return-value]


def make_norm(kind: str, channels: int, eps: float, frozen: bool = False) -> nnx.Module:
    """Normalisation layer by name: 'frozen_bn' (torchvision FrozenBatchNorm2d, for pretrained
    backbones) or 'group_norm' (32 groups; trains from scratch)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm(channels, eps=eps)
    if kind == "group_norm":
        return GroupNorm(channels, 32, eps=eps, frozen=frozen)
    raise ValueError(f"unknown norm {kind!r}; expected 'frozen_bn' or 'group_norm'")


def _downsample(in_ch: int, out_ch: int, stride: int, norm: str, eps: float, frozen: bool,
                rngs: nnx.Rngs) -> nnx.List | None:
    """torchvision's ``downsample = Sequential(conv1x1(stride), norm)`` or None when shapes match."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nnx.List([Conv2d(in_ch, out_ch, 1, stride=stride, use_bias=False, frozen=frozen, rngs=rngs),
                     make_norm(norm, out_ch, eps, frozen)])


class BasicBlock(nnx.Module):
    """Two 3x3 convs (ResNet-18/34). x: [N,H,W,in] -> [N,H/stride,W/stride,planes]."""

    def __init__(self, in_ch: int, planes: int, stride: int, norm: str, eps: float, frozen: bool = False, *,
                 rngs: nnx.Rngs):
        self.stride: int = stride
        self.conv1 = Conv2d(in_ch, planes, 3, stride=stride, padding=1, use_bias=False, frozen=frozen, rngs=rngs)
        self.bn1 = make_norm(norm, planes, eps, frozen)
        self.conv2 = Conv2d(planes, planes, 3, padding=1, use_bias=False, frozen=frozen, rngs=rngs)
        self.bn2 = make_norm(norm, planes, eps, frozen)
        self.downsample = _downsample(in_ch, planes, stride, norm, eps, frozen, rngs)

    def __call__(self, x: Array, canvas: Canvas | None = None, stride_in: int = 1) -> Array:
        """x at ``stride_in`` (of the input image) -> the block's output at ``stride_in * stride``."""
        s_out = stride_in * self.stride
        identity = x
        out = self.conv1(zero_outside(canvas, x, stride_in))
        out = jax.nn.relu(self.bn1(out, inside(canvas, s_out, out)))
        out = self.conv2(zero_outside(canvas, out, s_out))
        out = self.bn2(out, inside(canvas, s_out, out))
        if self.downsample is not None:
            identity = self.downsample[0](x)
            identity = self.downsample[1](identity, inside(canvas, s_out, identity))
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50/101)."""

    def __init__(self, in_ch: int, planes: int, stride: int, norm: str, eps: float, frozen: bool = False, *,
                 rngs: nnx.Rngs):
        out_ch = planes * 4
        self.stride: int = stride
        self.conv1 = Conv2d(in_ch, planes, 1, use_bias=False, frozen=frozen, rngs=rngs)
        self.bn1 = make_norm(norm, planes, eps, frozen)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=1, use_bias=False, frozen=frozen, rngs=rngs)
        self.bn2 = make_norm(norm, planes, eps, frozen)
        self.conv3 = Conv2d(planes, out_ch, 1, use_bias=False, frozen=frozen, rngs=rngs)
        self.bn3 = make_norm(norm, out_ch, eps, frozen)
        self.downsample = _downsample(in_ch, out_ch, stride, norm, eps, frozen, rngs)

    def __call__(self, x: Array, canvas: Canvas | None = None, stride_in: int = 1) -> Array:
        """x at ``stride_in`` (of the input image) -> the block's output at ``stride_in * stride``."""
        s_out = stride_in * self.stride
        identity = x
        out = self.conv1(x)
        out = jax.nn.relu(self.bn1(out, inside(canvas, stride_in, out)))
        out = self.conv2(zero_outside(canvas, out, stride_in))
        out = jax.nn.relu(self.bn2(out, inside(canvas, s_out, out)))
        out = self.conv3(out)
        out = self.bn3(out, inside(canvas, s_out, out))
        if self.downsample is not None:
            identity = self.downsample[0](x)
            identity = self.downsample[1](identity, inside(canvas, s_out, identity))
        return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
    """ResNet body returning C2..C5.

    Attributes:
      depth: 18, 34, 50 or 101.
      freeze_at: frozen stages (Detectron convention): 0 trains everything, 1 freezes the stem,
        2 the stem and layer1 (torchvision's default ``trainable_backbone_layers=3``), ... 5 the
        whole body. Frozen stages hold their weights as :class:`FrozenStat` (never ``nnx.Param``,
        so no optimiser state) and their outputs get ``stop_gradient``.
      norm: 'frozen_bn' | 'group_norm'. norm_eps: epsilon (1e-5; 0.0 for torchvision's legacy COCO weights).
    """

    def __init__(self, depth: int = 50, *, freeze_at: int = 2, norm: str = "frozen_bn", norm_eps: float = 1e-5,
                 rngs: nnx.Rngs):
        if depth not in RESNET_SPECS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(RESNET_SPECS)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}")
        self.depth: int = depth
        self.freeze_at: int = freeze_at
        kind, counts = RESNET_SPECS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        expansion = 4 if kind == "bottleneck" else 1
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, use_bias=False, frozen=freeze_at >= 1, rngs=rngs)
        self.bn1 = make_norm(norm, 64, norm_eps, freeze_at >= 1)
        in_ch = 64
        for i, n in enumerate(counts):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, planes, stride, norm, norm_eps, freeze_at >= i + 2, rngs=rngs))
                in_ch = planes * expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))

    def __call__(self, x: Array, canvas: Canvas | None = None) -> list[Array]:
        """x: [N, H, W, 3] normalised image -> [C2 (stride 4), C3, C4, C5 (stride 32)].

        canvas: optional; positions outside each image's extent then never reach a spatial operation.
        """
        x = self.conv1(zero_outside(canvas, x, 1))
        x = jax.nn.relu(self.bn1(x, inside(canvas, 2, x)))
        # Zero stands in for max-pool's -inf padding: the values are ReLU outputs, never negative.
        x = max_pool(zero_outside(canvas, x, 2), 3, 2, 1)
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outs = []
        stride = 4
        for i in range(4):
            for blk in getattr(self, f"layer{i + 1}"):
                x = blk(x, canvas, stride)
                stride *= blk.stride
            if self.freeze_at >= i + 2:
                x = jax.lax.stop_gradient(x)
            outs.append(x)
        return outs


