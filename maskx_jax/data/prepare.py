"""One decoded :class:`Example` -> one row of a static-shape :class:`~maskx_jax.types.Batch`.

Steps (host side, NumPy):
  1. size: torchvision's rule (``scale = min(min_size / short, max_size / long)``, output
     ``floor(h * scale), floor(w * scale)``); if that does not fit the static canvas
     (pad_height, pad_width), the image is scaled down further with
     ``scale = min(pad_height / h, pad_width / w)`` so that it does (aspect ratio kept);
  2. image: /255, ImageNet normalisation, then torch-identical bilinear resize
     (:mod:`maskx_jax.transform`, normalise-then-resize as torchvision), optional horizontal
     flip, zero padding at the bottom/right;
  3. boxes: scaled by the per-axis size ratio ``resized / original`` (as torchvision's
     ``resize_boxes``), mirrored as ``x -> w - x`` when flipped;
  4. instance slots: non-crowd instances first, then crowd ones, in annotation order; more
     than ``max_instances`` -> the rest are dropped (counted ``too_many_instances``);
  5. mask crops: for instances whose mask may supervise (class in set A, a usable mask,
     not crowd) the ORIGINAL-resolution mask is cropped to the original float box and
     area-resampled to S x S (:func:`maskx_jax.data.masks.crop_and_resample`); the box maps
     to the resized box exactly, so the crop is also the resized box's crop. A flip mirrors
     the crop's columns. Every other slot's crop is zeros, so set-B masks never reach the
     device.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from maskx_jax import transform
from maskx_jax.data.issues import Issues
from maskx_jax.data.masks import crop_and_resample
from maskx_jax.data.records import Example


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Static per-image preprocessing settings (from ``config.data``).

    has_mask_by_class: bool [K+1], True for set-A classes.
    """

    min_size: int
    max_size: int
    pad_height: int
    pad_width: int
    max_instances: int
    mask_crop_size: int
    has_mask_by_class: np.ndarray


def fit_size(height: int, width: int, o: PrepareOptions) -> tuple[int, int]:
    """Resized (h, w): torchvision's rule, then shrunk further to fit (pad_height, pad_width)."""
    scale = transform.resize_scale(height, width, float(o.min_size), float(o.max_size))
    out_h, out_w = int(math.floor(height * scale)), int(math.floor(width * scale))
    if out_h > o.pad_height or out_w > o.pad_width:
        scale = min(o.pad_height / height, o.pad_width / width)
        out_h = min(int(math.floor(height * scale)), o.pad_height)
        out_w = min(int(math.floor(width * scale)), o.pad_width)
    return max(out_h, 1), max(out_w, 1)


def allocate(batch_size: int, o: PrepareOptions, zeros=np.zeros) -> dict[str, np.ndarray]:
    """Zeroed host arrays for one batch (field names, shapes and dtypes of ``Batch``); ``zeros(shape,
    dtype)`` allocates each (the pipeline passes :func:`maskx_jax.data.loader.zeros`: shared memory in a
    worker process)."""
    b, g, s = batch_size, o.max_instances, o.mask_crop_size
    arrays = {
        "images": zeros((b, o.pad_height, o.pad_width, 3), np.float32),
        "image_sizes": zeros((b, 2), np.int32),
        "gt_boxes": zeros((b, g, 4), np.float32),
        "gt_classes": zeros((b, g), np.int32),
        "gt_valid": zeros((b, g), bool),
        "gt_crowd": zeros((b, g), bool),
        "gt_has_mask": zeros((b, g), bool),
        "gt_masks": zeros((b, g, s, s), np.float32),
        "image_ids": zeros((b,), np.int32),
        "original_sizes": zeros((b, 2), np.int32),
    }
    arrays["image_ids"][:] = -1
    return arrays


def fill_padding(arrays: dict[str, np.ndarray], slot: int, o: PrepareOptions) -> None:
    """Marks row ``slot`` as a padding image: image_ids -1, no instances, zero image, and
    sizes equal to the canvas (so size ratios stay finite)."""
    arrays["image_ids"][slot] = -1
    arrays["image_sizes"][slot] = (o.pad_height, o.pad_width)
    arrays["original_sizes"][slot] = (o.pad_height, o.pad_width)


def fill(arrays: dict[str, np.ndarray], slot: int, ex: Example, o: PrepareOptions, flip: bool,
         issues: Issues) -> None:
    """Writes example ``ex`` into row ``slot`` of the arrays from :func:`allocate`.

    Args:
      arrays: batch arrays (written in place; rows of other slots are untouched, so
        several threads may fill different slots of one batch).
      slot: row index.
      ex: decoded example (original-resolution image, boxes and masks).
      o: options.
      flip: mirror horizontally.
      issues: counter for ``too_many_instances``.
    """
    height, width = ex.height, ex.width
    out_h, out_w = fit_size(height, width, o)
    rgb = transform.to_rgb_float(ex.image)
    resized = transform.bilinear_resize(transform.normalize(rgb), out_h, out_w)
    if flip:
        resized = resized[:, ::-1]
    arrays["images"][slot, :out_h, :out_w] = resized
    arrays["image_sizes"][slot] = (out_h, out_w)
    arrays["original_sizes"][slot] = (height, width)
    arrays["image_ids"][slot] = ex.image_id

    n = ex.boxes.shape[0]
    order = np.concatenate([np.nonzero(~ex.crowd)[0], np.nonzero(ex.crowd)[0]]).astype(np.int64)
    if n > o.max_instances:
        issues.warn("too_many_instances", ex.name, f"{n} instances, {o.max_instances} slots")
        order = order[: o.max_instances]
    g = order.shape[0]
    if g == 0:
        return
    # float32 ratios as torchvision's resize_boxes.
    ratio = np.array([out_w, out_h], np.float32) / np.array([width, height], np.float32)
    boxes = ex.boxes[order] * np.tile(ratio, 2)[None, :]
    if flip:
        boxes = np.stack([out_w - boxes[:, 2], boxes[:, 1], out_w - boxes[:, 0], boxes[:, 3]], axis=1)
    classes = ex.classes[order]
    crowd = ex.crowd[order]
    has_mask = o.has_mask_by_class[classes] & ex.has_segm[order] & ~crowd
    if ex.masks is None:
        has_mask = np.zeros_like(has_mask)
    arrays["gt_boxes"][slot, :g] = boxes
    arrays["gt_classes"][slot, :g] = classes
    arrays["gt_valid"][slot, :g] = True
    arrays["gt_crowd"][slot, :g] = crowd
    arrays["gt_has_mask"][slot, :g] = has_mask
    for k in np.nonzero(has_mask)[0]:
        crop = crop_and_resample(ex.masks[order[k]], ex.boxes[order[k]], o.mask_crop_size)
        arrays["gt_masks"][slot, k] = crop[:, ::-1] if flip else crop
