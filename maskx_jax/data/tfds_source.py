"""tensorflow-datasets as a box-only data source (no TensorFlow needed).

tfds ``coco/2017`` carries boxes, labels and ``is_crowd`` but NO instance masks, so this
source yields box-only examples (``masks=None``; the pipeline sets ``gt_has_mask=False``
and zero ``gt_masks``): in Mask^X terms every class is set B here. Masks come from COCO
JSON (:mod:`maskx_jax.data.coco`).

Reading goes through tfds's random-access data source
(``tfds.builder_from_directory(dir).as_data_source()``), which reads ArrayRecord files with
NumPy only: nothing is downloaded or prepared here, and TensorFlow is not imported. The
dataset must have been prepared with ``file_format='array_record'`` (tfds's default file
format is TFRecord; convert with ``tfds convert_format`` if needed). Images are fetched as
encoded bytes (``SkipDecoding``) and decoded by :mod:`maskx_jax.data.image_io`, so the
same conversions and counted warnings apply as for COCO files.

Expected features (those of tfds ``coco``): ``image``, optional ``image/id`` and
``image/filename``, and ``objects`` with ``bbox`` (normalised ``[ymin, xmin, ymax, xmax]``),
``label`` (a ``ClassLabel`` whose names become the classes) and optional ``is_crowd``.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np

from maskx_jax.data.classes import BACKGROUND, COCO_CATEGORIES
from maskx_jax.data.image_io import decode_image
from maskx_jax.data.issues import Issues
from maskx_jax.data.records import STANDIN_IMAGE_SIZE, Example, ImageRecord

_CLIP_TOLERANCE = 1e-2  # pixels; see coco.py


def _version_key(name: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return None


def resolve_builder_dir(data_dir: str, name: str) -> str:
    """The prepared dataset folder for ``name`` (``'coco/2017'`` or ``'coco/2017:1.1.0'``).

    Looks for ``data_dir/<name>/<version>/dataset_info.json`` (the newest version when none
    is given); ``data_dir`` may also be a prepared dataset folder itself.

    Raises:
      FileNotFoundError: nothing prepared is found (the message names where it looked).
    """
    if not data_dir:
        raise FileNotFoundError("data.tfds_data_dir is empty: point it at a folder of prepared tfds datasets")
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    base, _, version = name.partition(":")
    folder = os.path.join(data_dir, *base.split("/"))
    if version:
        candidates = [os.path.join(folder, version)]
    else:
        found = [(k, d) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                 if (k := _version_key(d)) is not None]
        candidates = [os.path.join(folder, d) for _, d in sorted(found, reverse=True)]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "dataset_info.json")):
            return c
    raise FileNotFoundError(
        f"no prepared tfds dataset {name!r} under {data_dir!r} (looked for {folder}/<version>/dataset_info.json); "
        "this source never downloads: prepare it elsewhere with file_format='array_record'"
    )


class TfdsSource:
    """One split of a prepared tfds detection dataset, read without TensorFlow.

    Attributes:
      builder_dir, split: where from.
      class_names: K+1 names, index 0 ``'__background__'`` (the ``objects/label`` names).
      label_to_contiguous: int [num_labels] contiguous id (1..K) per tfds label, 0 = unknown.
      contiguous_to_cat_id: {contiguous id: category id}: COCO's ids when the label names
        are COCO's 80 names, else the contiguous id itself.
      issues: counter for problems.
    """

    def __init__(self, data_dir: str, name: str, split: str, *, issues: Issues | None = None,
                 class_names: Sequence[str] | None = None):
        """Opens the split.

        Args:
          data_dir: ``data.tfds_data_dir``.
          name: ``data.tfds_name`` (e.g. ``'coco/2017'``).
          split: tfds split name (``'train'``, ``'validation'``).
          issues: counter (a new one if None).
          class_names: optional K+1 names to map the labels onto by name (unknown names are
            counted as ``unknown_category`` and skipped).

        Raises:
          ImportError (tensorflow-datasets missing), FileNotFoundError, ValueError (split
          or features absent, not ArrayRecord).
        """
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("data.source=tfds needs `pip install tensorflow-datasets importlib_resources` "
                              "(or the `tfds` extra of this package)") from e
        self.issues = issues if issues is not None else Issues()
        self.builder_dir = resolve_builder_dir(data_dir, name)
        self.split = split
        self._tag = f"tfds {name}/{split}"
        builder = tfds.builder_from_directory(self.builder_dir)
        if split not in builder.info.splits:
            raise ValueError(f"{self._tag}: no split {split!r} in {self.builder_dir} "
                             f"(has {sorted(builder.info.splits)})")
        features = builder.info.features
        if "objects" not in features or "bbox" not in features["objects"] or "label" not in features["objects"]:
            raise ValueError(f"{self._tag}: expected features image, objects/bbox, objects/label; got {features}")
        labels = list(features["objects"]["label"].names)
        if class_names is None:
            self.class_names = (BACKGROUND,) + tuple(labels)
        else:
            self.class_names = tuple(class_names)
        index = {n: i for i, n in enumerate(self.class_names) if i > 0}
        self.label_to_contiguous = np.array([index.get(n, 0) for n in labels], np.int32)
        coco_ids = {n: cid for cid, n in COCO_CATEGORIES}
        if all(n in coco_ids for n in self.class_names[1:]):
            self.contiguous_to_cat_id = {i: coco_ids[n] for i, n in enumerate(self.class_names) if i > 0}
        else:
            self.contiguous_to_cat_id = {i: i for i in range(1, len(self.class_names))}
        self._data = self._open(builder)
        self._lock = threading.Lock()  # array_record readers are not documented as thread-safe

    def _open(self, builder) -> Any:
        import tensorflow_datasets as tfds

        try:
            return builder.as_data_source(split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
        except NotImplementedError as e:
            raise ValueError(f"{self._tag}: {self.builder_dir} is not stored as ArrayRecord, which random "
                             f"access needs; convert it with `tfds convert_format` ({e})") from e

    def __getstate__(self) -> dict:
        # Decoding worker processes get a copy: the open readers and the lock stay here, the copy reopens.
        return {k: v for k, v in self.__dict__.items() if k not in ("_data", "_lock")}

    def __setstate__(self, state: dict) -> None:
        import tensorflow_datasets as tfds

        self.__dict__.update(state)
        self._data = self._open(tfds.builder_from_directory(self.builder_dir))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def _read(self, index: int) -> dict[str, Any]:
        with self._lock:
            return self._data[index]

    def record(self, index: int) -> ImageRecord:
        """Reads record ``index`` (image bytes included, not decoded) into an ImageRecord."""
        ex = self._read(index)
        iid = int(ex.get("image/id", index))
        return ImageRecord(image_id=iid, name=self._name(index, ex), path="", height=0, width=0, index=index)

    def _name(self, index: int, ex: dict) -> str:
        fname = ex.get("image/filename", b"")
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        return f"{self._tag} #{index} (id {int(ex.get('image/id', index))}{', ' + fname if fname else ''})"

    def load(self, index: int, mask_classes: np.ndarray | None = None) -> Example | None:
        """Decodes record ``index`` into a box-only :class:`Example` (``masks`` None), or None
        if the image cannot be decoded (counted). ``mask_classes`` is ignored (no masks)."""
        del mask_classes
        ex = self._read(index)
        name = self._name(index, ex)
        image = decode_image(ex["image"], name, self.issues)
        if image is None:
            return None
        height, width = image.shape[:2]
        objects = ex["objects"]
        raw_boxes = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
        raw_labels = np.asarray(objects["label"], np.int64).reshape(-1)
        raw_crowd = np.asarray(objects.get("is_crowd", np.zeros(len(raw_labels), bool)), bool).reshape(-1)
        boxes, classes, crowd = [], [], []
        for k in range(raw_boxes.shape[0]):
            box = self._validate_box(raw_boxes[k], height, width, f"{name} object {k}")
            label = int(raw_labels[k]) if k < raw_labels.shape[0] else -1
            cls = int(self.label_to_contiguous[label]) if 0 <= label < len(self.label_to_contiguous) else 0
            if cls == 0:
                self.issues.warn("unknown_category", f"{name} object {k}", f"label={label}")
                continue
            if box is None:
                continue
            boxes.append(box)
            classes.append(cls)
            crowd.append(bool(raw_crowd[k]) if k < raw_crowd.shape[0] else False)
        n = len(boxes)
        return Example(
            image=image,
            image_id=int(ex.get("image/id", index)),
            name=name,
            boxes=np.stack(boxes).astype(np.float32) if n else np.zeros((0, 4), np.float32),
            classes=np.array(classes, np.int32),
            crowd=np.array(crowd, bool),
            has_segm=np.zeros((n,), bool),
            masks=None,
        )

    def _validate_box(self, bbox: np.ndarray, height: int, width: int, name: str) -> np.ndarray | None:
        """Normalised [ymin, xmin, ymax, xmax] -> absolute XYXY clipped to the image, or None."""
        if not np.all(np.isfinite(bbox)):
            self.issues.warn("box_invalid", name, f"bbox={bbox.tolist()}")
            return None
        ymin, xmin, ymax, xmax = bbox
        x0, y0, x1, y1 = xmin * width, ymin * height, xmax * width, ymax * height
        if x1 < x0 or y1 < y0:
            self.issues.warn("box_negative_size", name, f"bbox={bbox.tolist()}")
            return None
        if x1 == x0 or y1 == y0:
            self.issues.warn("box_degenerate", name, f"bbox={bbox.tolist()}")
            return None
        c = np.array([min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                      min(max(x1, 0.0), width), min(max(y1, 0.0), height)])
        if c[2] <= c[0] or c[3] <= c[1]:
            self.issues.warn("box_outside_image", name, f"bbox={bbox.tolist()}")
            return None
        if np.max(np.abs(c - [x0, y0, x1, y1])) > _CLIP_TOLERANCE:
            self.issues.warn("box_clipped", name, f"bbox={bbox.tolist()}")
        return c.astype(np.float32)

    def to_coco_dict(self) -> dict:
        """A box-only COCO dict of the split (for box AP with pycocotools).

        Reads and decodes every record once. Annotations carry no ``segmentation``: mask AP
        cannot be computed from tfds data (``DatasetInfo.val_has_masks`` is False).
        """
        images, annotations = [], []
        for i in range(len(self)):
            ex = self.load(i)
            if ex is None:
                # Kept, without boxes, at the size of the black stand-in image evaluation
                # uses, so that every evaluated image id exists in the ground truth.
                rec = self.record(i)
                images.append({"id": rec.image_id, "file_name": rec.name, "height": STANDIN_IMAGE_SIZE,
                               "width": STANDIN_IMAGE_SIZE})
                continue
            images.append({"id": ex.image_id, "file_name": ex.name, "height": ex.height, "width": ex.width})
            for b, c, cr in zip(ex.boxes.tolist(), ex.classes.tolist(), ex.crowd.tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": ex.image_id,
                                    "category_id": self.contiguous_to_cat_id[c],
                                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                    "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": int(cr)})
        categories = [{"id": self.contiguous_to_cat_id[i], "name": n} for i, n in enumerate(self.class_names) if i > 0]
        return {"images": images, "annotations": annotations, "categories": categories}
