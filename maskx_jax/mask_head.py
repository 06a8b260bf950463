"""Mask branch: 4 x (conv3x3 + ReLU) head, the predictor, mask targets and the mask loss.

The predictor's last layer is separate from its features (:meth:`MaskRCNNPredictor.features`,
:func:`mask_logits_for_labels`) so the per-class 1x1 weights can come from ``mask_fcn_logits``
(class-specific Mask R-CNN), a single channel (class-agnostic baseline) or Mask^X R-CNN's weight
transfer function (see ``weight_transfer.py``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maskx_jax.layers import Conv2d, ConvTranspose2x2, Linear
from maskx_jax.roi_align import roi_align

Array = jax.Array

MASK_MODES = ("class_specific", "class_agnostic", "transfer")


class MaskRCNNHeads(nnx.Module):
    """``mask_fcn1`` .. ``mask_fcn4``: conv3x3 + ReLU. x: [R, 14, 14, C] -> [R, 14, 14, channels]."""

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
    """``conv5_mask`` (ConvTranspose 2x2/2) + ReLU, then per-class 1x1 logits.

    mode:
      'class_specific': ``mask_fcn_logits`` 1x1 conv with K+1 channels (torchvision);
      'class_agnostic': one channel shared by every class (init N(0, 0.001), as in the paper);
      'transfer':       no logits layer here; the class weights come from tau.
    mlp_fusion: ``mask_mlp``, an FC from the flattened conv5 features [res*res*channels] to
      res*res logits (init N(0, 0.001)), added to every class's logits (the paper's MLP fusion).
    """

    def __init__(self, in_channels: int = 256, channels: int = 256, num_classes: int = 91, *,
                 mode: str = "class_specific", mlp_fusion: bool = False, resolution: int = 28, rngs: nnx.Rngs):
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
        self.mode: str = mode
        self.resolution: int = resolution
        self.conv5_mask = ConvTranspose2x2(in_channels, channels, rngs=rngs)
        if mode == "class_specific":
            self.mask_fcn_logits = Conv2d(channels, num_classes, 1, rngs=rngs)
        elif mode == "class_agnostic":
            self.mask_fcn_logits = Conv2d(channels, 1, 1, kernel_init=nnx.initializers.normal(0.001), rngs=rngs)
        else:
            self.mask_fcn_logits = None
        self.mask_mlp = (Linear(resolution * resolution * channels, resolution * resolution,
                                kernel_init=nnx.initializers.normal(0.001), rngs=rngs) if mlp_fusion else None)

    def features(self, x: Array) -> Array:
        """x: [R, 14, 14, C] -> conv5 features [R, 28, 28, channels]."""
        return jax.nn.relu(self.conv5_mask(x))

    def class_weights(self) -> tuple[Array, Array]:
        """The 1x1 logits layer as (weight [K+1 or 1, channels], bias [K+1 or 1])."""
        if self.mask_fcn_logits is None:
            raise ValueError("this predictor has no mask_fcn_logits: its class weights come from weight transfer")
        return self.mask_fcn_logits.kernel[...][0, 0].T, self.mask_fcn_logits.bias[...]

    def fusion(self, features: Array) -> Array | None:
        """MLP fusion logits [R, 28, 28] (shared by all classes), or None when disabled."""
        if self.mask_mlp is None:
            return None
        r = features.shape[0]
        return self.mask_mlp(features.reshape(r, -1)).reshape(r, self.resolution, self.resolution)


def mask_logits(features: Array, weight: Array, bias: Array | None) -> Array:
    """All classes' logits: features [R, M, M, C], weight [K+1, C], bias [K+1] or None -> [R, M, M, K+1]."""
    out = jnp.einsum("rhwc,kc->rhwk", features, weight.astype(features.dtype))
    return out if bias is None else out + bias.astype(out.dtype)


def mask_logits_for_labels(features: Array, weight: Array, bias: Array | None, labels: Array) -> Array:
    """Only each RoI's own class: features [R, M, M, C], labels [R] -> [R, M, M].

    Gathers the label's weight row before the 1x1 conv, so the cost does not grow with K.
    ``weight`` may also be per-RoI already ([R, C], pass ``labels=None``).
    """
    w = weight if labels is None else weight[labels]
    out = jnp.einsum("rhwc,rc->rhw", features, w.astype(features.dtype))
    if bias is None:
        return out
    b = bias if labels is None else bias[labels]
    return out + b.astype(out.dtype)[:, None, None]


def mask_targets(rois: Array, gt_boxes: Array, gt_crops: Array, gt_index: Array, resolution: int = 28) -> Array:
    """Soft mask targets of RoIs, sampled from host-cropped instance masks.

    Args:
      rois: [R, 4] RoI boxes; gt_boxes: [R, 4] the matched gt box of each RoI;
      gt_crops: [G, S, S] each instance's mask cropped to its gt box (pixel i of the crop covers
        [x1 + i*w/S, x1 + (i+1)*w/S)); gt_index: [R] int32 row of ``gt_crops`` for each RoI.
    Returns:
      [R, resolution, resolution] float in [0, 1]: the gt mask averaged over each RoI bin
      (RoIAlign with 2x2 samples per bin, bilinear in the crop, zero outside the gt box), the
      analogue of torchvision's ``project_masks_on_boxes`` on full-image masks.
    """
    s = gt_crops.shape[-1]
    gw = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], 1e-6)
    gh = jnp.maximum(gt_boxes[:, 3] - gt_boxes[:, 1], 1e-6)
    in_crop = jnp.stack([(rois[:, 0] - gt_boxes[:, 0]) * s / gw, (rois[:, 1] - gt_boxes[:, 1]) * s / gh,
                         (rois[:, 2] - gt_boxes[:, 0]) * s / gw, (rois[:, 3] - gt_boxes[:, 1]) * s / gh], axis=1)
    out = roi_align(gt_crops[..., None].astype(jnp.float32), jax.lax.stop_gradient(in_crop), gt_index,
                    (resolution, resolution), 1.0, 2, True)
    return out[..., 0]


def mask_loss_sum(logits: Array, targets: Array, weight: Array) -> Array:
    """Summed per-pixel sigmoid BCE over the RoIs with ``weight`` True.

    logits, targets: [R, M, M]; weight: [R] bool (positive RoI whose gt instance has a mask). The mask loss is
    this sum over all supervised RoIs / :func:`mask_loss_denominator`; sums over disjoint RoI chunks add up to
    the whole batch's (``MaskRCNN._mask_loss`` runs the mask head in chunks).
    """
    per_pixel = optax.sigmoid_binary_cross_entropy(logits, targets)
    return jnp.sum(per_pixel * weight.astype(per_pixel.dtype)[:, None, None])


def mask_loss_denominator(weight: Array, resolution: int) -> Array:
    """max(#RoIs with ``weight`` True, 1) * resolution^2: the mean BCE per supervised pixel, and 0 (not NaN) for
    a batch with no set-A RoI. weight: [R] bool -> float32 scalar."""
    return (jnp.maximum(weight.sum(), 1) * resolution * resolution).astype(jnp.float32)
