"""Detections -> COCO result dicts: boxes mapped back to the original image (XYWH), masks pasted there,
thresholded at 0.5 and RLE-encoded (:func:`detections_to_coco`); the device paste behind it
(:func:`paste_binary_masks`) also feeds :mod:`maskx_jax.eval.pictures`.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

from maskx_jax import paste
from maskx_jax.transform import resize_boxes
from maskx_jax.types import Detections


def _round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def _num_rows_bucket(n: int, minimum: int = 16) -> int:
    """Rounds a row count up to one of 8 sizes per octave (at least ``minimum``).

    Few distinct compiled shapes (7 for up to 100 detections), at most 1/8 padded work.
    """
    step = max(minimum, 1 << max(max(int(n) - 1, 0).bit_length() - 3, 0))
    return _round_up(max(int(n), 1), step)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _paste_binary_transposed(masks: jax.Array, boxes: jax.Array, height: int, width: int) -> jax.Array:
    """Pastes and binarises masks on the device; returns bool [N, width, height].

    Thresholding before the transfer moves a quarter of the bytes, and the [N, W, H] layout
    is, read on the host as ``.transpose(2, 1, 0)``, the Fortran-ordered [H, W, N] array
    that ``pycocotools.mask.encode`` wants.
    """
    soft = paste.paste_masks(masks, boxes, height, width)
    return jnp.swapaxes(soft > 0.5, 1, 2)


def paste_binary_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, canvas_multiple: int = 128
) -> np.ndarray:
    """Pastes box-frame mask probabilities into an image and thresholds them at 0.5.

    To bound the number of jit compilations the paste runs on a canvas whose sides are
    rounded up to ``canvas_multiple``, with the row count rounded up to 16, 32, ..., 112,
    128, 160, ... (padding rows paste nothing), then crops. Each output pixel depends only on its own coordinates
    and the box, so the crop equals a paste at the exact size.

    Args:
      masks: float [N, M, M] mask probabilities in the box frame (M = 28).
      boxes: float [N, 4] XYXY boxes in the (height, width) image frame.
      height, width: output size (the original image).
      canvas_multiple: rounding of the pasting canvas (1 = exact size, one compile per size).

    Returns:
      np.uint8 [height, width, N], Fortran-ordered, 1 inside a mask: the layout
      ``pycocotools.mask.encode`` takes.
    """
    n = masks.shape[0]
    if n == 0:
        return np.zeros((height, width, 0), dtype=np.uint8, order="F")
    rows = _num_rows_bucket(n)
    padded_masks = np.zeros((rows,) + masks.shape[1:], dtype=np.float32)
    padded_masks[:n] = masks
    padded_boxes = np.zeros((rows, 4), dtype=np.float32)
    padded_boxes[:n] = boxes
    canvas_h = _round_up(height, canvas_multiple)
    canvas_w = _round_up(width, canvas_multiple)
    out = _paste_binary_transposed(padded_masks, padded_boxes, height=canvas_h, width=canvas_w)
    out = np.asarray(out)[:n, :width, :height]  # [n, W, H]
    return np.asfortranarray(out.transpose(2, 1, 0)).view(np.uint8)


def _category_lookup(contiguous_to_cat_id: Mapping[int, int] | Sequence[int]) -> np.ndarray:
    """int64 table ``lut[label] = COCO category id`` (-1 where unmapped)."""
    if isinstance(contiguous_to_cat_id, Mapping):
        items = [(int(k), int(v)) for k, v in contiguous_to_cat_id.items()]
    else:
        items = [(i, int(v)) for i, v in enumerate(contiguous_to_cat_id)]
    lut = np.full(max(k for k, _ in items) + 1, -1, dtype=np.int64)
    for k, v in items:
        lut[k] = v
    return lut


def detections_to_coco(
    det: Detections,
    image_ids: np.ndarray,
    image_sizes: np.ndarray,
    original_sizes: np.ndarray,
    contiguous_to_cat_id: Mapping[int, int] | Sequence[int],
    with_masks: bool = True,
    canvas_multiple: int = 128,
    unscored_labels: Iterable[int] = (),
) -> list[dict]:
    """Converts a batch of detections to COCO result dicts in the original image frames.

    Args:
      det: host (NumPy) detections for B images: boxes float [B, D, 4] XYXY in the resized
        input frame, scores [B, D], labels int [B, D] contiguous 1..K, valid bool [B, D],
        masks float [B, D, M, M] probabilities in each box's frame.
      image_ids: int [B] COCO image ids; images with id < 0 (batch padding) are skipped.
      image_sizes: int [B, 2] (h, w) of each resized image inside the padded input.
      original_sizes: int [B, 2] (h, w) of each image on disk.
      contiguous_to_cat_id: contiguous label -> COCO category id, a mapping or a sequence
        indexed by label (entry 0, background, unused).
      with_masks: False for a box-only model: no ``segmentation`` field, no pasting.
      canvas_multiple: see :func:`paste_binary_masks`.
      unscored_labels: labels of classes the ground truth does not have (e.g. added by a
        box-only training source): their detections are left out (pycocotools could not
        score them); any other label without a category id is an error.

    Returns:
      One dict per valid detection: ``image_id`` int, ``category_id`` int (COCO id),
      ``bbox`` [x, y, w, h] floats in original pixels, ``score`` float and, with masks,
      ``segmentation`` a compressed RLE {"size": [h, w], "counts": str} (JSON-serialisable).

    Raises:
      ValueError: a valid detection's label has no COCO category.
    """
    lut = _category_lookup(contiguous_to_cat_id)
    unscored = np.asarray(sorted(int(i) for i in unscored_labels), np.int64)
    boxes_all = np.asarray(det.boxes, dtype=np.float32)
    scores_all = np.asarray(det.scores, dtype=np.float32)
    labels_all = np.asarray(det.labels).astype(np.int64)
    valid_all = np.asarray(det.valid, dtype=bool)
    image_ids = np.asarray(image_ids).reshape(-1)
    image_sizes = np.asarray(image_sizes).reshape(-1, 2)
    original_sizes = np.asarray(original_sizes).reshape(-1, 2)
    results: list[dict] = []
    for b in range(boxes_all.shape[0]):
        image_id = int(image_ids[b])
        keep = np.flatnonzero(valid_all[b] & ~np.isin(labels_all[b], unscored))
        if image_id < 0 or keep.size == 0:
            continue
        labels = labels_all[b, keep]
        bad = (labels < 0) | (labels >= lut.size)
        cat_ids = np.where(bad, -1, lut[np.clip(labels, 0, lut.size - 1)])
        if (cat_ids < 0).any():
            raise ValueError(f"labels {sorted(set(labels[cat_ids < 0].tolist()))} have no COCO category id")
        height, width = (int(s) for s in original_sizes[b])
        boxes = resize_boxes(boxes_all[b, keep], image_sizes[b], original_sizes[b])
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        scores = scores_all[b, keep].tolist()
        rles = None
        if with_masks:
            masks = np.asarray(det.masks[b], dtype=np.float32)[keep]
            binary = paste_binary_masks(masks, boxes, height, width, canvas_multiple)
            rles = mask_utils.encode(binary)
        for i in range(keep.size):
            result = {
                "image_id": image_id,
                "category_id": int(cat_ids[i]),
                "bbox": [float(v) for v in xywh[i]],
                "score": float(scores[i]),
            }
            if rles is not None:
                rle = rles[i]
                result["segmentation"] = {"size": [int(s) for s in rle["size"]],
                                          "counts": rle["counts"].decode("ascii")}
            results.append(result)
    return results
