"""COCO JSON + image folder as a data source (masks through pycocotools).

:class:`CocoSource` parses the annotation file once, validates every record (see
:mod:`maskx_jax.data.issues` for what is repaired and what is skipped, each counted), and
keeps cheap :class:`ImageRecord`s. :meth:`CocoSource.load` decodes one image and its
instance masks on demand (called from the pipeline's worker threads).

Category ids are mapped to contiguous 1..K in ascending category-id order (torchvision /
Detectron convention), or, when ``class_names`` is given (a validation file that must use
the training file's classes), by name onto those classes.

The JSON is read with ``json`` rather than ``pycocotools.coco.COCO`` so that one malformed
record cannot abort the whole index; pycocotools does the mask work (polygon
rasterisation, RLE (de)compression).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from maskx_jax.data import masks as mask_lib
from maskx_jax.data.classes import BACKGROUND
from maskx_jax.data.image_io import ImageTooLargeError, decode_image, read_image_size, resize_nearest, too_large
from maskx_jax.data.issues import Issues
from maskx_jax.data.records import Example, ImageRecord, Instance

# Boxes overshooting the image by less than this many pixels are clipped without a warning:
# COCO's float boxes often end at e.g. 640.0000001.
_CLIP_TOLERANCE = 1e-2


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _finite_numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(
        isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)
        for x in v
    )


class CocoSource:
    """An image folder described by a COCO instances JSON.

    Attributes:
      json_path, image_dir: inputs.
      class_names: K+1 names, index 0 ``'__background__'``.
      cat_id_to_contiguous: {COCO category id in this file: contiguous id 1..K}.
      contiguous_to_cat_id: {contiguous id: COCO category id in this file} (classes absent
        from this file, possible with ``class_names``, are missing).
      records: validated :class:`ImageRecord`s, in file order.
      num_box_only: annotations kept as box-only because they have no segmentation by intent
        (only counted with ``segmentation_optional``).
      issues: the :class:`Issues` counter every problem went to.
      num_problems: how many problems this source has reported so far (parsing included).
    """

    def __init__(
        self,
        json_path: str,
        image_dir: str,
        *,
        issues: Issues | None = None,
        class_names: Sequence[str] | None = None,
        drop_empty_images: bool = False,
        segmentation_optional: bool = False,
        tag: str | None = None,
    ):
        """Parses and validates the annotation file.

        Args:
          json_path: COCO instances JSON.
          image_dir: folder the images' ``file_name``s are relative to.
          issues: counter to report to (a new one if None).
          class_names: optional K+1 names to map this file's categories onto (by name);
            categories with other names become ``unknown_category``.
          drop_empty_images: skip (counted) images without any usable non-crowd instance;
            meant for training, as torchvision's reference scripts do.
          segmentation_optional: an annotation whose ``segmentation`` is absent, null or ``[]``
            is a box-only instance by intent (``data.mask_supervision=by_annotation``, box-only
            sources): counted in ``num_box_only``, not reported as a problem. Otherwise it is
            reported as ``segmentation_empty`` (and still kept as box-only). Malformed
            segmentations are reported either way.
          tag: prefix of this source's record names in warnings (default: the JSON's file name).

        Raises:
          FileNotFoundError / ValueError: the JSON itself is missing or not a COCO file
            (a configuration error, reported before anything runs).
        """
        self.json_path = json_path
        self.image_dir = image_dir
        self.issues = issues if issues is not None else Issues()
        self.num_problems = 0  # problems this source reported (not deduplicated across sources)
        self.num_box_only = 0  # annotations without a segmentation by intent (segmentation_optional)
        self._segmentation_optional = bool(segmentation_optional)
        self._tag = tag or os.path.basename(json_path)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"COCO annotation file not found: {json_path}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
        with open(json_path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{json_path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{json_path} is not a COCO instances file (no 'images' list)")
        self._info = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
        self._categories = self._parse_categories(data.get("categories") or [], class_names)
        images = self._parse_images(data["images"])
        self.records = self._parse_annotations(data.get("annotations") or [], images, drop_empty_images)

    def _warn(self, kind: str, record: str, detail: str = "") -> None:
        self.num_problems += 1
        self.issues.warn(kind, record, detail)

    # ---------------------------------------------------------------- parsing
    def _parse_categories(self, categories: list, class_names: Sequence[str] | None) -> list[dict]:
        by_id: dict[int, dict] = {}
        for cat in categories:
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                self._warn("annotation_malformed", f"{self._tag} category {cat!r:.60}", "no integer id")
                continue
            cid = int(cat["id"])
            if cid in by_id:
                self._warn("duplicate_category", f"{self._tag} category {cid}", f"name {cat.get('name')!r}")
                continue
            by_id[cid] = {"id": cid, "name": str(cat.get("name", f"category_{cid}")),
                          "supercategory": cat.get("supercategory", "")}
        kept = [by_id[k] for k in sorted(by_id)]
        if class_names is None:
            self.class_names = (BACKGROUND,) + tuple(c["name"] for c in kept)
            self.cat_id_to_contiguous = {c["id"]: i + 1 for i, c in enumerate(kept)}
        else:
            self.class_names = tuple(class_names)
            index = {n: i for i, n in enumerate(class_names) if i > 0}
            self.cat_id_to_contiguous = {c["id"]: index[c["name"]] for c in kept if c["name"] in index}
        self.contiguous_to_cat_id = {v: k for k, v in self.cat_id_to_contiguous.items()}
        return kept

    def _parse_images(self, images: list) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for img in images:
            if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
                self._warn("image_malformed", f"{self._tag} image {str(img)[:60]}", "needs int id and file_name")
                continue
            iid = int(img["id"])
            name = f"{self._tag} image {iid} ({img['file_name']})"
            if iid in out:
                self._warn("image_duplicate_id", f"{name} [duplicate]", f"first: {out[iid]['file_name']}")
                continue
            path = os.path.join(self.image_dir, img["file_name"])
            if not os.path.isfile(path):
                self._warn("image_missing", name, path)
                out[iid] = None  # remembered so its annotations are dropped quietly (already counted)
                continue
            h, w = img.get("height"), img.get("width")
            if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
                try:
                    size = read_image_size(path)
                except ImageTooLargeError as e:
                    self._warn("image_too_large", name, f"file header: {e}")
                    out[iid] = None
                    continue
                if size is None:
                    self._warn("image_unreadable", name, "no valid size in the JSON and unreadable header")
                    out[iid] = None
                    continue
                self._warn("image_bad_size", name, f"height={h!r} width={w!r}; header says {size}")
                h, w = size
            if too_large(h, w):  # refused before decoding (and before an eval stand-in of that size)
                self._warn("image_too_large", name, f"annotated {w}x{h}")
                out[iid] = None
                continue
            out[iid] = {"id": iid, "file_name": img["file_name"], "path": path, "height": int(h),
                        "width": int(w), "name": name, "raw": img}
        return out

    def _parse_annotations(self, annotations: list, images: dict[int, dict], drop_empty: bool) -> list[ImageRecord]:
        per_image: dict[int, list[Instance]] = {iid: [] for iid, v in images.items() if v is not None}
        for k, ann in enumerate(annotations):
            inst = self._parse_annotation(k, ann, images)
            if inst is not None:
                per_image[int(ann["image_id"])].append(inst)
        records = []
        for iid, img in images.items():
            if img is None:
                continue
            instances = tuple(per_image[iid])
            if drop_empty and not any(not x.crowd for x in instances):
                self._warn("image_no_annotations", img["name"], f"{len(instances)} crowd-only/none")
                continue
            records.append(ImageRecord(image_id=iid, name=img["name"], path=img["path"], height=img["height"],
                                       width=img["width"], instances=instances, index=len(records)))
        self._images = images
        return records

    def _parse_annotation(self, k: int, ann: Any, images: dict[int, dict]) -> Instance | None:
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")):
            self._warn("annotation_malformed", f"{self._tag} annotation #{k}", "needs an int image_id")
            return None
        aid = int(ann["id"]) if _is_int(ann.get("id")) else -1
        iid = int(ann["image_id"])
        name = f"{self._tag} ann {aid if aid >= 0 else '#' + str(k)} (image {iid})"
        if iid not in images:
            self._warn("annotation_unknown_image", name, "image id not in 'images'")
            return None
        img = images[iid]
        if img is None:
            return None  # its image was skipped (and counted) already
        cid = ann.get("category_id")
        if not _is_int(cid) or int(cid) not in self.cat_id_to_contiguous:
            self._warn("unknown_category", name, f"category_id={cid!r}")
            return None
        box = self._validate_box(ann.get("bbox"), img["height"], img["width"], name)
        if box is None:
            return None
        crowd = bool(ann.get("iscrowd", 0))
        raw = ann.get("segmentation")
        if raw is None or (isinstance(raw, list) and not raw):
            if self._segmentation_optional:
                self.num_box_only += 1
            else:
                self._warn("segmentation_empty", name, f"no segmentation ({'[]' if raw == [] else 'absent or null'}): "
                           "kept as box-only; data.mask_supervision=by_annotation reads this as intended")
            return Instance(box=box, category=self.cat_id_to_contiguous[int(cid)], crowd=crowd,
                            segmentation=None, ann_id=aid)
        segm = self._validate_segmentation(raw, img["height"], img["width"], name)
        return Instance(box=box, category=self.cat_id_to_contiguous[int(cid)], crowd=crowd,
                        segmentation=segm, ann_id=aid)

    def _validate_box(self, bbox: Any, height: int, width: int, name: str) -> np.ndarray | None:
        """COCO [x, y, w, h] -> float32 XYXY clipped to the image, or None (counted)."""
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and _finite_numbers(bbox)):
            self._warn("box_invalid", name, f"bbox={bbox!r:.80}")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            self._warn("box_negative_size", name, f"bbox={bbox}")
            return None
        if w == 0 or h == 0:
            self._warn("box_degenerate", name, f"bbox={bbox}")
            return None
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 <= cx0 or cy1 <= cy0:
            kind = "box_outside_image" if (x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height) else "box_degenerate"
            self._warn(kind, name, f"bbox={bbox} image {width}x{height}")
            return None
        if max(abs(cx0 - x0), abs(cy0 - y0), abs(cx1 - x1), abs(cy1 - y1)) > _CLIP_TOLERANCE:
            self._warn("box_clipped", name, f"bbox={bbox} image {width}x{height}")
        return np.array([cx0, cy0, cx1, cy1], np.float32)

    def _validate_segmentation(self, segm: Any, height: int, width: int, name: str) -> Any:
        """Returns a structurally valid segmentation, or None (instance becomes box-only)."""
        if isinstance(segm, list):
            parts = []
            for part in segm:
                if not _finite_numbers(part) or len(part) < 6 or len(part) % 2:
                    n = len(part) if isinstance(part, (list, tuple)) else "?"
                    self._warn("polygon_too_few_points", name, f"polygon with {n} coordinates dropped")
                    continue
                parts.append([float(v) for v in part])
            if parts:
                return parts
            self._warn("segmentation_empty", name, "no usable polygon")
            return None
        if isinstance(segm, dict) and "counts" in segm and "size" in segm:
            size = segm["size"]
            fits = (isinstance(size, (list, tuple)) and len(size) == 2
                    and [int(size[0]), int(size[1])] == [height, width])
            if not fits:
                self._warn("rle_size_mismatch", name, f"RLE size {size!r}, image {height}x{width}")
                return None
            counts = segm["counts"]
            if isinstance(counts, list):
                if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                    self._warn("segmentation_empty", name, "uncompressed RLE counts invalid")
                    return None
            elif not isinstance(counts, (str, bytes)):
                self._warn("segmentation_empty", name, f"RLE counts of type {type(counts).__name__}")
                return None
            try:
                area = float(mask_lib.mask_utils.area(mask_lib.to_rle(segm, height, width)))
            except Exception as e:  # noqa: BLE001 - a corrupt RLE string
                self._warn("segmentation_empty", name, f"RLE unreadable: {e}")
                return None
            if area <= 0:
                self._warn("segmentation_empty", name, "RLE with zero area")
                return None
            return segm
        self._warn("segmentation_empty", name, f"segmentation={segm!r:.60}")
        return None

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> ImageRecord:
        return self.records[index]

    def load(self, index: int, mask_classes: np.ndarray | None = None) -> Example | None:
        """Decodes image ``index`` and its masks.

        Args:
          index: record index in 0..len-1.
          mask_classes: optional bool [K+1]: decode masks only for these classes (others get
            ``has_segm`` False and zero masks: the pipeline never reads them). Crowd
            instances never get a decoded mask (they are ignore regions, not mask targets).

        Returns:
          :class:`Example` (masks uint8 [n, H, W]), or None if the image cannot be decoded
          (counted as ``image_missing`` / ``image_unreadable``).
        """
        rec = self.records[index]
        image = decode_image(rec.path, rec.name, self.issues)
        if image is None:
            return None
        if image.shape[:2] != (rec.height, rec.width):
            self._warn("image_size_mismatch", rec.name,
                             f"file {image.shape[1]}x{image.shape[0]}, annotation {rec.width}x{rec.height}")
            image = resize_nearest(image, rec.height, rec.width)
        n = len(rec.instances)
        masks = np.zeros((n, rec.height, rec.width), np.uint8)
        has_segm = np.zeros((n,), bool)
        for k, inst in enumerate(rec.instances):
            if inst.segmentation is None or inst.crowd:
                continue
            if mask_classes is not None and not mask_classes[inst.category]:
                continue
            m = mask_lib.decode(inst.segmentation, rec.height, rec.width)
            if not m.any():
                self._warn("segmentation_empty", f"{self._tag} ann {inst.ann_id} (image {rec.image_id})",
                                 "segmentation rasterises to an empty mask")
                continue
            masks[k] = m
            has_segm[k] = True
        return Example(
            image=image,
            image_id=rec.image_id,
            name=rec.name,
            boxes=np.stack([i.box for i in rec.instances]).astype(np.float32) if n else np.zeros((0, 4), np.float32),
            classes=np.array([i.category for i in rec.instances], np.int32),
            crowd=np.array([i.crowd for i in rec.instances], bool),
            has_segm=has_segm,
            masks=masks,
        )

    # ---------------------------------------------------------------- export
    def to_coco_dict(self) -> dict:
        """The validated dataset as a COCO dict (for pycocotools evaluation of a cleaned file).

        Kept images and annotations only, boxes as repaired (clipped), original category
        ids; an instance without a usable segmentation gets its box as a polygon so that
        segm evaluation can still run (such instances are listed in the issue report).
        """
        images, annotations = [], []
        next_id = 1 + max([i.ann_id for r in self.records for i in r.instances] + [0])
        used: set[int] = set()
        for rec in self.records:
            images.append({**self._images[rec.image_id]["raw"], "height": rec.height, "width": rec.width})
            for inst in rec.instances:
                x0, y0, x1, y1 = (float(v) for v in inst.box)
                segm = inst.segmentation
                if segm is None:
                    segm = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                if isinstance(segm, dict) and isinstance(segm.get("counts"), bytes):
                    segm = {"size": segm["size"], "counts": segm["counts"].decode("ascii")}
                rle = mask_lib.to_rle(segm, rec.height, rec.width)
                aid = inst.ann_id
                if aid < 0 or aid in used:  # pycocotools indexes annotations by a unique id
                    aid, next_id = next_id, next_id + 1
                used.add(aid)
                annotations.append({
                    "id": aid, "image_id": rec.image_id, "category_id": self.contiguous_to_cat_id[inst.category],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask_lib.mask_utils.area(rle)),
                    "iscrowd": int(inst.crowd), "segmentation": segm,
                })
        return {**self._info, "images": images, "annotations": annotations, "categories": self._categories}
