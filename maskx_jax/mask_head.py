"""Mask branch: 4 x (conv3x3 + ReLU) head and the predictor (``conv5_mask`` deconv + 1x1 logits).

The predictor's last layer is split out (:meth:`MaskRCNNPredictor.features` and
:func:`mask_logits`) so that Mask^X R-CNN's weight transfer function can supply the per-class
1x1 weights instead of ``mask_fcn_logits``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskx_jax.layers import Conv2d, ConvTranspose2x2

Array = jax.Array


class MaskRCNNHeads(nnx.Module):
    """``mask_fcn1`` .. ``mask_fcn4``: conv3x3(256) + ReLU. x: [R, 14, 14, C] -> [R, 14, 14, 256]."""

    def __init__(self, in_channels: int = 256, channels: int = 256, num_convs: int = 4, *, rngs: nnx.Rngs):
        self.num_convs: int = num_convs
        for i in range(num_convs):
            setattr(self, f"mask_fcn{i + 1}",
                    Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, rngs=rngs))

    def __call__(self, x: Array) -> Array:
        for i in range(self.num_convs):
            x = jax.nn.relu(getattr(self, f"mask_fcn{i + 1}")(x))
        return x


class MaskRCNNPredictor(nnx.Module):
    """``conv5_mask`` (ConvTranspose 2x2/2) + ReLU, then ``mask_fcn_logits`` (1x1, K+1 channels).

    ``mask_fcn_logits`` is None when the class weights come from elsewhere (Mask^X transfer).
    """

    def __init__(self, in_channels: int = 256, channels: int = 256, num_classes: int | None = 91, *,
                 rngs: nnx.Rngs):
        self.conv5_mask = ConvTranspose2x2(in_channels, channels, rngs=rngs)
        self.mask_fcn_logits = Conv2d(channels, num_classes, 1, rngs=rngs) if num_classes else None

    def features(self, x: Array) -> Array:
        """x: [R, 14, 14, C] -> conv5 features [R, 28, 28, channels]."""
        return jax.nn.relu(self.conv5_mask(x))

    def class_weights(self) -> tuple[Array, Array]:
        """The 1x1 logits layer as (weight [K+1, channels], bias [K+1])."""
        if self.mask_fcn_logits is None:
            raise ValueError("this predictor has no mask_fcn_logits: its class weights come from weight transfer")
        return self.mask_fcn_logits.kernel[...][0, 0].T, self.mask_fcn_logits.bias[...]


def mask_logits(features: Array, weight: Array, bias: Array | None) -> Array:
    """All classes' logits: features [R, M, M, C], weight [K+1, C], bias [K+1] or None -> [R, M, M, K+1]."""
    out = jnp.einsum("rhwc,kc->rhwk", features, weight.astype(features.dtype))
    return out if bias is None else out + bias.astype(out.dtype)


def mask_logits_for_labels(features: Array, weight: Array, bias: Array | None, labels: Array) -> Array:
    """Only each RoI's own class: features [R, M, M, C], labels [R] -> [R, M, M].

    Gathers the label's weight row before the 1x1 conv, so the cost does not grow with K.
    """
    w = weight[labels].astype(features.dtype)  # [R, C]
    out = jnp.einsum("rhwc,rc->rhw", features, w)
    return out if bias is None else out + bias[labels].astype(out.dtype)[:, None, None]
