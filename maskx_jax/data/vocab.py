"""One class vocabulary for two training sources: the mask source's classes, then the box source's.

Mask^X R-CNN trains on masks from one dataset (``data.source``) and boxes from another
(``data.box_source``). Their classes are merged by name (compared with
:func:`~maskx_jax.data.classes.normalize_name`: case and repeated spaces ignored):

  * the mask source's classes keep their contiguous ids 1..K_mask, in its order, so a model,
    set-A spec or checkpoint made for the mask source alone means the same classes;
  * a box-source class is renamed through the class map first, when the map names it
    (``data.box_source_class_map``: a JSON object ``{"name in the box source": "canonical name"}``),
    then matched by name against the mask source's classes;
  * a box-source class that matches none is, by ``data.box_source_unmatched``: ``error`` (the
    default: one error listing every such name, since a spelling difference would otherwise
    silently become a second class), or ``add`` (a new class after the mask source's, in the box
    source's order; it has no masks, so it lands in set B: the Mask^X large-vocabulary setting).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from maskx_jax.data.classes import BACKGROUND, normalize_name


def read_class_map(path: str) -> dict[str, str]:
    """Reads a class map file: a JSON object of strings, ``{"box-source name": "canonical name"}``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not JSON, or not an object mapping strings to strings.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.box_source_class_map: file not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.box_source_class_map {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"data.box_source_class_map {path} must be a JSON object of strings: "
                         '{"name in the box source": "canonical name", ...}')
    return data


def merge_vocabularies(
    mask_names: Sequence[str],
    box_names: Sequence[str],
    class_map: Mapping[str, str] | None = None,
    unmatched: str = "error",
) -> tuple[tuple[str, ...], np.ndarray]:
    """Merges the box source's classes into the mask source's.

    Args:
      mask_names: K_mask+1 names of the mask source, index 0 the background.
      box_names: K_box+1 names of the box source, index 0 the background.
      class_map: {box-source name: canonical name}; keys must be box-source names.
      unmatched: ``'error'`` or ``'add'`` for box-source classes that match no mask-source
        class (after the map); see the module docstring.

    Returns:
      (merged K+1 names: ``mask_names`` then the added classes; int32 [K_box+1] lookup table
      from a box-source contiguous id to its merged id, entry 0 = 0).

    Raises:
      ValueError: map keys that are no box-source class, duplicate mask-source names, or
        (``unmatched='error'``) box-source classes matching nothing: every name is listed.
    """
    if unmatched not in ("error", "add"):
        raise ValueError(f"data.box_source_unmatched must be 'error' or 'add', got {unmatched!r}")
    class_map = dict(class_map or {})
    merged = [BACKGROUND] + list(mask_names[1:])
    index: dict[str, int] = {}
    for i, n in enumerate(merged[1:], start=1):
        key = normalize_name(n)
        if key in index:
            raise ValueError(f"the mask source has two classes named {merged[index[key]]!r} and {n!r}")
        index[key] = i
    box_keys = {normalize_name(n) for n in box_names[1:]}
    map_norm = {normalize_name(k): v for k, v in class_map.items()}
    stray = sorted(k for k, kn in ((k, normalize_name(k)) for k in class_map) if kn not in box_keys)
    if stray:
        raise ValueError(f"data.box_source_class_map names class(es) {stray} that the box source does not have; "
                         f"box-source classes: {list(box_names[1:])}")
    lut = np.zeros((len(box_names),), np.int32)
    missing = []
    for j, name in enumerate(box_names[1:], start=1):
        canonical = map_norm.get(normalize_name(name), name)
        key = normalize_name(canonical)
        if key not in index:
            if unmatched == "error":
                missing.append(name if canonical == name else f"{name} -> {canonical}")
                continue
            merged.append(canonical)
            index[key] = len(merged) - 1
        lut[j] = index[key]
    if missing:
        raise ValueError(
            f"box-source class(es) {missing} match no class of data.source (classes: {list(mask_names[1:])}); "
            "map them onto those names in data.box_source_class_map (a JSON file "
            '{"name in the box source": "canonical name"}), or set data.box_source_unmatched=add to train '
            "them as new box-only classes")
    return tuple(merged), lut
