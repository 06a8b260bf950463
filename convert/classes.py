"""Re-indexing the class rows of a torchvision detector's predictors (``--classes``), no torch import.

torchvision's COCO detectors use a 91-slot label space in which the label *is* the COCO category
id (slot 0 background, 10 ids unused), while maskx_jax's COCO data numbers the 80 categories
contiguously 1..80 in ascending category-id order (``maskx_jax.data.coco``). A box predictor
converted as is therefore has 91 rows where the dataset's model has 81: its class-sized layers
would not load, and a frozen box head (``train.freeze``) would stay random. ``--classes coco80``
keeps rows [0, 1, 2, ..., 90 minus the unused ids] in that order, so row k of the result is
contiguous class k. A comma-separated list of source rows (0 first) selects any other subset.

The class-sized tensors (torchvision names; rows are class-major):
  roi_heads.box_predictor.cls_score.{weight,bias}           [K+1, ...]   one row per class
  roi_heads.box_predictor.bbox_pred.{weight,bias}           [4(K+1), ...] four rows per class
  roi_heads.mask_predictor.mask_fcn_logits.{weight,bias}    [K+1, ...]   one row (channel) per class
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .mapping import ConversionError
from maskx_jax.data.classes import COCO_CATEGORIES

# torch key suffix -> rows per class
CLASS_ROWS: dict[str, int] = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
    "roi_heads.mask_predictor.mask_fcn_logits.weight": 1,
    "roi_heads.mask_predictor.mask_fcn_logits.bias": 1,
}
COCO80_ROWS: tuple[int, ...] = (0,) + tuple(cat_id for cat_id, _ in COCO_CATEGORIES)


def parse_classes(spec: str, num_source: int) -> tuple[int, ...]:
    """``--classes`` -> the source rows to keep, background first.

    Args:
      spec: ``coco80`` (torchvision's 91-slot COCO labels -> 80 contiguous classes) or a
        comma-separated list of distinct source class indices starting with 0.
      num_source: K+1 of the checkpoint (rows of ``cls_score``).
    Raises:
      ConversionError: an index out of range, a repeat, no leading 0, or coco80 on a non-91-class file.
    """
    if spec.strip() == "coco80":
        if num_source != 91:
            raise ConversionError(f"--classes coco80 maps torchvision's 91-slot COCO label space, but this "
                                  f"checkpoint has {num_source} classes (incl. background)")
        return COCO80_ROWS
    try:
        rows = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ConversionError(f"--classes must be 'coco80' or comma-separated class indices, got {spec!r}") from None
    if not rows or rows[0] != 0 or len(set(rows)) != len(rows) or not all(0 <= r < num_source for r in rows):
        raise ConversionError(f"--classes {spec!r}: need distinct indices in [0, {num_source - 1}], starting with 0 "
                              "(the background)")
    return rows


def select_classes(state: Mapping[str, np.ndarray], rows: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The state dict with every class-sized tensor (:data:`CLASS_ROWS`) reduced to ``rows``, in that order."""
    out = dict(state)
    for key, per_class in CLASS_ROWS.items():
        if key not in out:
            continue
        value = np.asarray(out[key])
        index = np.asarray([r * per_class + j for r in rows for j in range(per_class)])
        out[key] = np.ascontiguousarray(value[index])
    return out
