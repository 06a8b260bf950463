"""Instance masks: COCO segmentations -> binary masks (pycocotools), and box-frame crops.

Pixel convention (COCO's): mask pixel (row r, column c) is the unit square
[c, c + 1) x [r, r + 1) of continuous image coordinates; a box XYXY is in the same
continuous coordinates.

Mask crops use AREA resampling: ``crop[i, j]`` is the exact fraction of the output cell
``[x0 + j*w/S, x0 + (j+1)*w/S) x [y0 + i*h/S, y0 + (i+1)*h/S)`` covered by the (piecewise
constant) mask, where (x0, y0, w, h) is the float box. Area rather than bilinear because a
box is usually larger than S pixels, where point sampling would alias thin parts away; for
boxes smaller than S it reduces to nearest-pixel values along cell interiors. The cell
centre of ``crop[i, j]`` sits at box-frame coordinates ``((j + 0.5) / S, (i + 0.5) / S)``,
which is where the device samples it when building a RoI's mask target.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def to_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) -> one compressed RLE.

    Args:
      segmentation: list of flat polygons (each >= 6 floats), or a dict with ``size``
        [h, w] and ``counts`` (list of ints = uncompressed, str/bytes = compressed).
      height, width: the image size (polygons are rasterised at it).

    Returns:
      pycocotools compressed RLE dict (``counts`` bytes).
    """
    if isinstance(segmentation, list):
        parts = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.merge(parts)
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(counts, str):
        return {"size": list(segmentation["size"]), "counts": counts.encode("ascii")}
    return segmentation


def decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation -> uint8 [height, width] binary mask (0/1)."""
    return np.ascontiguousarray(mask_utils.decode(to_rle(segmentation, height, width)), dtype=np.uint8)


def encode(mask: np.ndarray) -> dict:
    """uint8/bool [H, W] binary mask -> compressed RLE with a JSON-ready str ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def _area_weights(lo: float, hi: float, size: int, first: int, last: int) -> np.ndarray:
    """[size, last - first]: fraction of each of ``size`` equal cells of [lo, hi) covered by
    unit pixels first..last-1 (rows sum to 1 where the pixels span the cell)."""
    edges = lo + (hi - lo) * np.arange(size + 1, dtype=np.float64) / size
    pix = np.arange(first, last, dtype=np.float64)
    overlap = np.minimum(edges[1:, None], pix[None, :] + 1.0) - np.maximum(edges[:-1, None], pix[None, :])
    return np.clip(overlap, 0.0, None) / ((hi - lo) / size)


def crop_and_resample(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crops a binary mask to a float box and area-resamples it to ``size`` x ``size``.

    Args:
      mask: uint8/bool [H, W] binary mask.
      box: float [4] XYXY in the mask's pixel coordinates, positive width and height.
      size: S, the output resolution.

    Returns:
      float32 [S, S] in [0, 1]; parts of the box outside the mask count as 0.
    """
    height, width = mask.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height)
    if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:
        return np.zeros((size, size), np.float32)
    wy = _area_weights(y0, y1, size, r0, r1)  # [S, rows]
    wx = _area_weights(x0, x1, size, c0, c1)  # [S, cols]
    sub = mask[r0:r1, c0:c1].astype(np.float64)
    crop = wy @ sub @ wx.T
    return np.clip(crop, 0.0, 1.0).astype(np.float32)


def paste_crop(crop: np.ndarray, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`crop_and_resample` for tests and debugging: nearest-cell paste.

    Args:
      crop: float [S, S] box-frame mask.
      box: float [4] XYXY.
      height, width: canvas size.

    Returns:
      float32 [height, width]: each pixel whose centre lies in the box takes the value of
      the crop cell containing that centre; 0 elsewhere.
    """
    s = crop.shape[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.zeros((height, width), np.float32)
    cy = np.arange(height) + 0.5
    cx = np.arange(width) + 0.5
    iy = np.floor((cy - y0) / (y1 - y0) * s).astype(np.int64)
    ix = np.floor((cx - x0) / (x1 - x0) * s).astype(np.int64)
    rows = np.nonzero((iy >= 0) & (iy < s))[0]
    cols = np.nonzero((ix >= 0) & (ix < s))[0]
    if rows.size and cols.size:
        out[np.ix_(rows, cols)] = crop[np.ix_(iy[rows], ix[cols])]
    return out
