"""Plain containers a data source hands to the pipeline.

Coordinates are in the ORIGINAL image's pixels (as stored on disk): boxes XYXY float32,
continuous coordinates where pixel (row r, column c) is the unit square
[c, c + 1) x [r, r + 1) (COCO's convention). Classes are contiguous 1..K.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

# Side of the black square that stands in, during evaluation, for an image that cannot be
# decoded and whose size is unknown (tfds); evaluation keeps every image id.
STANDIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Instance:
    """One validated annotation of a COCO-style image record.

    box: float32 [4] XYXY, clipped to the image.
    category: contiguous class id in 1..K.
    crowd: COCO ``iscrowd``.
    segmentation: the (repaired) COCO segmentation: a list of polygons (each a flat list of
      >= 6 floats), or an RLE dict (``counts`` str/bytes = compressed, list = uncompressed);
      None when the instance has no usable mask (box-only).
    ann_id: annotation id from the file (-1 if absent).
    """

    box: np.ndarray
    category: int
    crowd: bool
    segmentation: Any
    ann_id: int = -1


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image as listed by a source; cheap (nothing decoded).

    image_id: dataset image id (int).
    name: human-readable record name used in warnings (file name and id).
    path: image file path ('' for sources that hold the bytes themselves, e.g. tfds).
    height, width: size from the annotation file (0 if unknown until decoded).
    instances: validated instances (empty for sources that only know them once decoded).
    index: position of the record in its source.
    """

    image_id: int
    name: str
    path: str
    height: int
    width: int
    instances: tuple[Instance, ...] = ()
    index: int = -1


@dataclasses.dataclass
class Example:
    """One decoded image with its instances (output of ``source.load(i)``).

    image: uint8 [H, W, 3] RGB.
    image_id: dataset image id.
    name: record name for warnings.
    boxes: float32 [n, 4] XYXY in original pixels, inside the image, positive size.
    classes: int32 [n] in 1..K.
    crowd: bool [n].
    has_segm: bool [n], a usable (non-empty) mask exists for the instance.
    masks: uint8 [n, H, W] binary instance masks (zeros where ``has_segm`` is False), or
      None for box-only sources (tfds).
    """

    image: np.ndarray
    image_id: int
    name: str
    boxes: np.ndarray
    classes: np.ndarray
    crowd: np.ndarray
    has_segm: np.ndarray
    masks: np.ndarray | None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


class Source(Protocol):
    """What the pipeline needs from a data source (:class:`~maskx_jax.data.coco.CocoSource`,
    :class:`~maskx_jax.data.tfds_source.TfdsSource`)."""

    class_names: Sequence[str]
    contiguous_to_cat_id: dict[int, int]

    def __len__(self) -> int: ...

    def record(self, index: int) -> ImageRecord: ...

    def load(self, index: int, mask_classes: np.ndarray | None = None) -> Example | None: ...
