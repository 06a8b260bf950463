"""Opens the configured data sources: the training split of ``data.source`` (the mask source), the
optional box-only ``data.box_source``, and the validation split.

Only opening happens here (annotation files parsed and validated, derived files written under
``data.cache_dir``); classes, set A and batching are :mod:`maskx_jax.data.pipeline`'s job.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Sequence

import ml_collections

from maskx_jax.data.coco import CocoSource
from maskx_jax.data.issues import Issues
from maskx_jax.data.partial import keep_masks, parse_mask_fractions
from maskx_jax.data.records import Source
from maskx_jax.data.synthetic import SyntheticPaths, generate_synthetic

BOX_SOURCE_TAG = "box source"  # prefix of the box source's record names in warnings


def cached_json(cache_dir: str, original: str, extra_key: str, build: Callable[[], dict], label: str = "clean") -> str:
    """Path of a derived COCO JSON under ``cache_dir``, built with ``build()`` unless present.

    The name is keyed on the original file (path, size, mtime) and ``extra_key``, so a
    changed input gives a new file; writes are atomic (temp file + rename), and ``build()``
    runs before anything is written, so an error in it leaves nothing behind.
    """
    stat = os.stat(original)
    ident = f"{os.path.abspath(original)}|{stat.st_size}|{stat.st_mtime_ns}|{extra_key}"
    key = hashlib.sha1(ident.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(original))[0]
    path = os.path.join(os.path.abspath(cache_dir), f"{stem}.{label}-{key}.json")
    if os.path.isfile(path):
        return path
    data = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


def _synthetic(d: ml_collections.ConfigDict) -> SyntheticPaths:
    return generate_synthetic(d.synthetic_dir, d.synthetic_num_train, d.synthetic_num_val, d.synthetic_image_size,
                              d.synthetic_seed, d.synthetic_variant)


def _partial_train_json(d: ml_collections.ConfigDict, train_json: str) -> str:
    """``data.synthetic_mask_fraction`` applied to the synthetic training file (written once, cached)."""
    spec = d.synthetic_mask_fraction.strip()

    def build() -> dict:
        with open(train_json) as f:
            coco = json.load(f)
        names = ["__background__"] + [c["name"] for c in coco["categories"]]
        return keep_masks(coco, parse_mask_fractions(spec, names), int(d.synthetic_seed))

    return cached_json(d.cache_dir, train_json, f"masks|{spec}|{int(d.synthetic_seed)}", build, label="masks")


def open_train(d: ml_collections.ConfigDict, issues: Issues) -> Source:
    """The training split of ``data.source``, with its own classes (1..K in its category order).

    With ``data.mask_supervision=by_annotation`` an annotation without a segmentation is a
    box-only instance by intent, not a reported problem.
    """
    drop_empty = bool(d.drop_images_without_annotations)
    optional = d.mask_supervision == "by_annotation"
    if d.source == "synthetic":
        paths = _synthetic(d)
        train_json = _partial_train_json(d, paths.train_json) if d.synthetic_mask_fraction.strip() else paths.train_json
        return CocoSource(train_json, paths.train_images, issues=issues, drop_empty_images=drop_empty,
                          segmentation_optional=optional)
    if d.source == "coco":
        if not (d.train_json and d.train_images):
            raise ValueError("data.source=coco needs data.train_json and data.train_images")
        return CocoSource(d.train_json, d.train_images, issues=issues, drop_empty_images=drop_empty,
                          segmentation_optional=optional)
    if d.source == "tfds":
        from maskx_jax.data.tfds_source import TfdsSource

        return TfdsSource(d.tfds_data_dir, d.tfds_name, d.tfds_train_split, issues=issues)
    raise ValueError(f"data.source must be synthetic, coco or tfds, got {d.source!r}")


def open_box_source(d: ml_collections.ConfigDict, issues: Issues) -> Source:
    """The training split of ``data.box_source``, with its own classes (its masks are never used).

    ``synthetic``: the built-in generator with seed ``data.synthetic_seed + 1`` (other images than
    the mask source's), ``data.synthetic_num_train`` images, into ``<data.synthetic_dir>_box_source``.
    """
    drop_empty = bool(d.drop_images_without_annotations)
    if d.box_source == "synthetic":
        paths = generate_synthetic(f"{os.path.normpath(d.synthetic_dir)}_box_source", d.synthetic_num_train, 0,
                                   d.synthetic_image_size, d.synthetic_seed + 1, d.synthetic_variant)
        return CocoSource(paths.train_json, paths.train_images, issues=issues, drop_empty_images=drop_empty,
                          segmentation_optional=True, tag=f"{BOX_SOURCE_TAG} train.json")
    if d.box_source == "coco":
        if not (d.box_source_json and d.box_source_images):
            raise ValueError("data.box_source=coco needs data.box_source_json and data.box_source_images")
        return CocoSource(d.box_source_json, d.box_source_images, issues=issues, drop_empty_images=drop_empty,
                          segmentation_optional=True, tag=f"{BOX_SOURCE_TAG} {os.path.basename(d.box_source_json)}")
    if d.box_source == "tfds":
        from maskx_jax.data.tfds_source import TfdsSource

        return TfdsSource(d.tfds_data_dir, d.tfds_name, d.tfds_train_split, issues=issues)
    raise ValueError(f"data.box_source must be '', coco, tfds or synthetic, got {d.box_source!r}")


def _coco_val(json_path: str, image_dir: str, class_names: Sequence[str], issues: Issues,
              cache_dir: str) -> tuple[CocoSource, str]:
    val = CocoSource(json_path, image_dir, issues=issues, class_names=class_names)
    if val.num_problems == 0:
        return val, json_path
    # pycocotools would choke on (or mis-score) the records we skipped or repaired.
    return val, cached_json(cache_dir, json_path, "|".join(class_names), val.to_coco_dict)


def open_val(d: ml_collections.ConfigDict, class_names: Sequence[str], issues: Issues,
             train_id_map: dict[int, int]) -> tuple[Source | None, str, dict[int, int], bool]:
    """The validation split, its classes mapped by name onto ``class_names``.

    Returns:
      (source or None, COCO JSON to score against ('' if none), {contiguous id: category id
      in that JSON} (``train_id_map`` when there is no validation set), whether the ground
      truth has masks).
    """
    if d.source == "synthetic":
        paths = _synthetic(d)
        val, val_json = _coco_val(paths.val_json, paths.val_images, class_names, issues, d.cache_dir)
        return val, val_json, dict(val.contiguous_to_cat_id), True
    if d.val_json:
        val, val_json = _coco_val(d.val_json, d.val_images, class_names, issues, d.cache_dir)
        return val, val_json, dict(val.contiguous_to_cat_id), True
    if d.source == "tfds":
        from maskx_jax.data.tfds_source import TfdsSource

        val = TfdsSource(d.tfds_data_dir, d.tfds_name, d.tfds_val_split, issues=issues, class_names=class_names)
        val_json = cached_json(d.cache_dir, os.path.join(val.builder_dir, "dataset_info.json"),
                               f"{d.tfds_val_split}|" + "|".join(class_names), val.to_coco_dict)
        return val, val_json, dict(val.contiguous_to_cat_id), False
    return None, "", dict(train_id_map), True
