"""Pytree containers passed between jitted functions.

Conventions (for the whole library):
  * images are NHWC float32 RGB, normalised, zero-padded at the bottom/right to a fixed size
    (a multiple of 32); ``image_sizes`` [N, 2] int32 holds each image's (height, width) before padding;
  * boxes are XYXY float32 in absolute pixels of that (resized, padded) input frame;
  * class 0 is background, foreground classes are 1..K (torchvision's convention);
  * every fixed-size output carries a boolean ``valid`` mask: padded rows hold finite garbage
    and must be ignored.
"""
from __future__ import annotations

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class Proposals:
    """RPN output. boxes [N, P, 4]; scores [N, P] (objectness probability); valid [N, P] bool."""

    boxes: Array
    scores: Array
    valid: Array


@struct.dataclass
class Detections:
    """Detector output for a batch, in the input frame.

    boxes [N, D, 4]; scores [N, D]; labels [N, D] int32 in 1..K; valid [N, D] bool, sorted by
    descending score (valid rows first); masks [N, D, M, M] float32 mask probabilities in the box's
    frame (M = 28; paste them into the image with :func:`maskx_jax.paste.paste_masks` and threshold
    at 0.5), zero on rows that are not valid.
    """

    boxes: Array
    scores: Array
    labels: Array
    valid: Array
    masks: Array


@struct.dataclass
class Batch:
    """One training (or evaluation) batch, padded to static shapes. B images, G instance slots.

    images:         [B, H, W, 3] float32, normalised (ImageNet mean/std on [0, 1] RGB), zero-padded.
    image_sizes:    [B, 2] int32, (h, w) of the resized image inside the padding.
    gt_boxes:       [B, G, 4] float32, XYXY in the resized input frame.
    gt_classes:     [B, G] int32, contiguous 1..K (0 in padded slots).
    gt_valid:       [B, G] bool, real instance slots.
    gt_crowd:       [B, G] bool, COCO ``iscrowd`` regions: never matched, anchors/RoIs that
                    overlap them are ignored rather than called background.
    gt_has_mask:    [B, G] bool, this instance's mask may supervise the mask loss (set A / per
                    annotation). Box and class losses use every valid instance.
    gt_masks:       [B, G, S, S] float32 in [0, 1]: each instance's mask cropped to its gt box and
                    resampled to S x S on the host (S = ``data.mask_crop_size``); the device
                    resamples mask targets for RoIs from these crops.
    image_ids:      [B] int32, dataset image id (-1 for padding images in an eval batch).
    original_sizes: [B, 2] int32, (h, w) of the image as stored on disk.
    """

    images: Array
    image_sizes: Array
    gt_boxes: Array
    gt_classes: Array
    gt_valid: Array
    gt_crowd: Array
    gt_has_mask: Array
    gt_masks: Array
    image_ids: Array
    original_sizes: Array
