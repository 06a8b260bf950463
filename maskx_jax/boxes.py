"""Box arithmetic with torchvision's exact semantics.

Every box here is XYXY in absolute pixels: ``[..., 4] = (x1, y1, x2, y2)`` float32, with no
"+1" convention (width = x2 - x1), as in ``torchvision.ops.boxes`` and
``torchvision.models.detection._utils.BoxCoder``. All functions are pure ``jnp`` and
jit/vmap-friendly; the arithmetic is written in the same operation order as torchvision so
float32 results agree bit-for-bit or to about one ulp (only ``log``/``exp`` may differ by an ulp
between XLA and torch's vectorised math library).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# torchvision's default ``bbox_xform_clip``: caps dw/dh so exp() cannot blow up a box by more
# than 1000/16 in width or height.
DEFAULT_SCALE_CLAMP: float = math.log(1000.0 / 16)


def box_area(boxes: Array) -> Array:
    """Area of XYXY boxes.

    Args:
      boxes: [..., 4] float32, XYXY absolute pixels.

    Returns:
      [...] float32, (x2 - x1) * (y2 - y1) (negative for inverted boxes, as in torchvision).
    """
    boxes = jnp.asarray(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_inter_union(boxes1: Array, boxes2: Array) -> tuple[Array, Array]:
    """Pairwise intersection and union areas (torchvision ``_box_inter_union``).

    Args:
      boxes1: [..., N, 4] float32 XYXY.
      boxes2: [..., M, 4] float32 XYXY (leading dims broadcast with ``boxes1``'s).

    Returns:
      (inter, union), each [..., N, M] float32.
    """
    boxes1, boxes2 = jnp.asarray(boxes1), jnp.asarray(boxes2)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    # Same association as torchvision: (area1 + area2) - inter.
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter, union


def box_iou(boxes1: Array, boxes2: Array) -> Array:
    """Pairwise IoU, ``torchvision.ops.box_iou`` semantics, but 0 instead of NaN for 0/0.

    Args:
      boxes1: [..., N, 4] float32 XYXY.
      boxes2: [..., M, 4] float32 XYXY.

    Returns:
      [..., N, M] float32 inter / union; where the union is exactly 0 (two zero-area boxes)
      the IoU is defined as 0, which torchvision would return as NaN.
    """
    inter, union = box_inter_union(boxes1, boxes2)
    is_zero = union == 0
    # Double ``where`` so neither the value nor the gradient of the masked branch is NaN.
    return jnp.where(is_zero, 0.0, inter / jnp.where(is_zero, 1.0, union))


def clip_boxes(boxes: Array, height, width) -> Array:
    """Clamp boxes to the image, like ``torchvision.ops.clip_boxes_to_image``.

    Args:
      boxes: [..., 4] float32 XYXY.
      height: image height in pixels; a Python number or a scalar array (may be traced, e.g. one
        value per image under ``vmap``).
      width: image width in pixels; same kinds as ``height``.

    Returns:
      [..., 4] float32 with x in [0, width] and y in [0, height]. NaN stays NaN, as with
      torch.clamp.
    """
    boxes = jnp.asarray(boxes)
    height = jnp.asarray(height, boxes.dtype)
    width = jnp.asarray(width, boxes.dtype)
    # clamp(min=0, max=w) == min(max(x, 0), w), including when w < 0 (never for real images).
    x = jnp.minimum(jnp.maximum(boxes[..., 0::2], 0.0), width)
    y = jnp.minimum(jnp.maximum(boxes[..., 1::2], 0.0), height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def small_box_mask(boxes: Array, min_size: float) -> Array:
    """Boxes that ``torchvision.ops.remove_small_boxes`` would keep.

    Args:
      boxes: [..., 4] float32 XYXY.
      min_size: minimum width and height in pixels (Python float or scalar array).

    Returns:
      [...] bool, True where (x2 - x1) >= min_size and (y2 - y1) >= min_size.
    """
    boxes = jnp.asarray(boxes)
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def encode(reference_boxes: Array, proposals: Array, weights: Sequence[float]) -> Array:
    """Regression targets that turn ``proposals`` into ``reference_boxes`` (BoxCoder.encode_single).

    Args:
      reference_boxes: [..., 4] float32 XYXY, the targets (e.g. matched ground truth).
      proposals: [..., 4] float32 XYXY, the boxes being regressed from (anchors / proposals);
        broadcasts with ``reference_boxes``. Must have positive width and height.
      weights: (wx, wy, ww, wh) Python floats, e.g. (1, 1, 1, 1) for the RPN and
        (10, 10, 5, 5) for the box head.

    Returns:
      [..., 4] float32 deltas (dx, dy, dw, dh).
    """
    wx, wy, ww, wh = (float(w) for w in weights)
    reference_boxes, proposals = jnp.asarray(reference_boxes), jnp.asarray(proposals)
    ex_widths = proposals[..., 2] - proposals[..., 0]
    ex_heights = proposals[..., 3] - proposals[..., 1]
    ex_ctr_x = proposals[..., 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[..., 1] + 0.5 * ex_heights

    gt_widths = reference_boxes[..., 2] - reference_boxes[..., 0]
    gt_heights = reference_boxes[..., 3] - reference_boxes[..., 1]
    gt_ctr_x = reference_boxes[..., 0] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[..., 1] + 0.5 * gt_heights

    # torchvision multiplies by the weight before dividing: (w * diff) / size.
    dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    dw = ww * jnp.log(gt_widths / ex_widths)
    dh = wh * jnp.log(gt_heights / ex_heights)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(
    deltas: Array,
    boxes: Array,
    weights: Sequence[float],
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Array:
    """Apply regression deltas to boxes (BoxCoder.decode_single).

    Args:
      deltas: [..., 4] float32 (dx, dy, dw, dh), e.g. [R, K, 4] per-class box-head outputs.
      boxes: [..., 4] float32 XYXY reference boxes broadcastable against ``deltas``
        (e.g. [R, 1, 4] for per-class deltas).
      weights: (wx, wy, ww, wh) Python floats, the same as used by ``encode``.
      scale_clamp: upper clamp for dw/dh (after dividing by the weights) before ``exp``.

    Returns:
      [broadcast(...), 4] float32 XYXY decoded boxes (not clipped to the image).
    """
    wx, wy, ww, wh = (float(w) for w in weights)
    deltas = jnp.asarray(deltas)
    boxes = jnp.asarray(boxes, deltas.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights

    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)

    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = jnp.exp(dw) * widths
    pred_h = jnp.exp(dh) * heights

    half_w = 0.5 * pred_w
    half_h = 0.5 * pred_h
    return jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
        axis=-1,
    )
