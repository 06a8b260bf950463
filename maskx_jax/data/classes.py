"""Class lists and the set-A (mask-supervised classes) specification.

With ``data.mask_supervision=by_class``, ``data.set_a`` is a comma-separated list of class names, or a preset:
  * ``""`` or ``all``: every class has mask supervision (plain Mask R-CNN);
  * ``voc``: the classes whose name is one of the 20 PASCAL VOC classes (COCO's names);
  * ``nonvoc``: every other class.
Names match case-insensitively after stripping spaces. For COCO's 80 classes ``voc`` gives
contiguous ids (1,2,3,4,5,6,7,9,15,16,17,18,19,20,40,57,58,59,61,63) [seg_every_thing].
With ``data.mask_supervision=by_annotation``, set A is read from the training annotations
instead (:func:`set_a_from_annotations`): every class with at least one mask.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from maskx_jax.data.records import ImageRecord

BACKGROUND = "__background__"

# The 20 PASCAL VOC classes under their COCO 2017 names.
VOC_CLASSES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)

# COCO 2017 detection categories: (category id, name), ids as in instances_*.json.
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

PRESETS = ("all", "voc", "nonvoc")


def normalize_name(name: str) -> str:
    """The form class names are compared in: lower case, spaces collapsed ("Traffic  Light" == "traffic light")."""
    return " ".join(name.strip().lower().split())


_norm = normalize_name


def parse_set_a(spec: str, class_names: Sequence[str]) -> tuple[int, ...]:
    """Contiguous ids (1..K) of the mask-supervised classes.

    Args:
      spec: ``data.set_a``: comma-separated names, or ``""`` / ``all`` / ``voc`` / ``nonvoc``.
      class_names: K+1 names, index 0 the background.

    Returns:
      sorted tuple of ids in 1..K.

    Raises:
      ValueError: an unknown class name (the message lists the valid names), or a preset
        that selects no class of this dataset.
    """
    names = [_norm(n) for n in class_names[1:]]
    key = _norm(spec)
    if key in ("", "all"):
        return tuple(range(1, len(names) + 1))
    if key in ("voc", "nonvoc"):
        voc = {_norm(n) for n in VOC_CLASSES}
        want_voc = key == "voc"
        ids = tuple(i + 1 for i, n in enumerate(names) if (n in voc) == want_voc)
        if not ids:
            raise ValueError(
                f"data.set_a={spec!r} selects no class of this dataset (classes: {list(class_names[1:])})"
            )
        return ids
    wanted = [_norm(p) for p in spec.split(",") if p.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(
            f"data.set_a names unknown class(es) {unknown}; valid names: {list(class_names[1:])} "
            f"or a preset {PRESETS} ('' = all)"
        )
    return tuple(sorted({names.index(w) + 1 for w in wanted}))


def has_mask_by_class(set_a_ids: Sequence[int], num_classes: int) -> np.ndarray:
    """bool [num_classes] (K+1 entries): True for set-A classes; index 0 (background) False."""
    out = np.zeros((num_classes,), dtype=bool)
    out[list(set_a_ids)] = True
    return out


def mask_counts(records: Iterable[ImageRecord], num_classes: int) -> np.ndarray:
    """int64 [num_classes] (K+1 entries): per class, the non-crowd instances with a mask annotation.

    ``records``' instances carry their validated segmentation (None = box-only), so nothing is
    decoded. Crowd regions are ignore regions, never mask targets, so they do not count. A
    source that only knows its instances once decoded (tfds) has none listed: all zeros.
    """
    out = np.zeros((num_classes,), np.int64)
    for rec in records:
        for inst in rec.instances:
            if inst.segmentation is not None and not inst.crowd:
                out[inst.category] += 1
    return out


def set_a_from_annotations(counts: np.ndarray) -> tuple[int, ...]:
    """``data.mask_supervision=by_annotation``: set A = the classes with >= 1 mask annotation.

    Args:
      counts: int [K+1] from :func:`mask_counts` (index 0, background, ignored).

    Raises:
      ValueError: no class has a mask annotation (the mask branch would never be trained).
    """
    ids = tuple(int(i) for i in np.nonzero(counts[1:])[0] + 1)
    if not ids:
        raise ValueError("data.mask_supervision=by_annotation: the training data has no instance with a mask "
                         "annotation (a segmentation), so no class could be in set A")
    return ids
