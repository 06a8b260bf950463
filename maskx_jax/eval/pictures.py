"""Detections -> picture: the one path from a model's fixed-size outputs to a drawn image.

Used by training's evaluation pictures and TensorBoard images (``maskx_jax.train.evaluation``) and by
``python -m maskx_jax.predict``, so a picture means the same thing wherever it comes from: the detections of
one image that are valid and score at least a threshold, their boxes mapped back to the original image
(torchvision's ``resize_boxes``), their masks pasted there and thresholded at 0.5
(``coco_results.paste_binary_masks``, the paste behind the COCO results), drawn by
:func:`maskx_jax.visualize.draw_detections` (set-B classes marked).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from maskx_jax import visualize
from maskx_jax.eval.coco_results import paste_binary_masks
from maskx_jax.transform import resize_boxes
from maskx_jax.types import Detections

# Masks are pasted in groups of at most this many (detections x original-image pixels) float32 values, at
# least 16 at a time (the paste's smallest row bucket): bounds the canvas for large photos.
PASTE_PIXELS = 200_000_000


def pasted_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [N, height, width]: box-frame mask probabilities [N, M, M] pasted at ``boxes`` (XYXY, original
    frame) and thresholded at 0.5, pasted in groups (see :data:`PASTE_PIXELS`)."""
    out = np.zeros((masks.shape[0], height, width), bool)
    step = max(16, int(PASTE_PIXELS // max(height * width, 1)))
    for start in range(0, masks.shape[0], step):
        part = paste_binary_masks(np.asarray(masks[start:start + step], np.float32), boxes[start:start + step],
                                  height, width)
        out[start:start + step] = np.transpose(part, (2, 0, 1)).astype(bool)
    return out


def draw_row(image: np.ndarray, det: Detections, row: int, input_size, *, score_thresh: float,
             class_names: Sequence[str] | Mapping[int, str] | None = None, set_b_ids: Iterable[int] = (),
             with_masks: bool = True) -> tuple[np.ndarray, int]:
    """Draws image ``row`` of a batch's detections on its original image.

    Args:
      image: uint8 [H, W, 3] (or [H, W]) the original image; H, W its original size.
      det: host (NumPy) ``Detections`` of the batch: boxes [B, D, 4] in the network input's pixels, scores,
        labels, valid [B, D], masks [B, D, M, M] probabilities or None.
      row: the image's index in the batch.
      input_size: (height, width) of the image inside the network input (``batch.image_sizes[row]``).
      score_thresh: detections scoring below this are not drawn.
      class_names, set_b_ids: as :func:`maskx_jax.visualize.draw_detections`.
      with_masks: False draws boxes only (e.g. data without masks).

    Returns:
      (uint8 picture [H', W', 3], the number of detections drawn).
    """
    valid = np.asarray(det.valid[row]) & (np.asarray(det.scores[row]) >= score_thresh)
    keep = np.flatnonzero(valid)
    height, width = np.asarray(image).shape[:2]
    boxes = np.asarray(resize_boxes(np.asarray(det.boxes[row])[keep], np.asarray(input_size), (height, width)),
                       np.float32).reshape(-1, 4)
    masks = None
    if with_masks and det.masks is not None:
        masks = pasted_masks(np.asarray(det.masks[row])[keep], boxes, height, width)
    picture = visualize.draw_detections(image, boxes, np.asarray(det.labels[row])[keep],
                                        np.asarray(det.scores[row])[keep], masks, class_names=class_names,
                                        set_b_ids=set_b_ids)
    return picture, int(keep.size)
