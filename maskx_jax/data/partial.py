"""Partially labelled variants of a COCO dict: some instances keep their mask, the rest become box-only.

Used for ``data.synthetic_mask_fraction`` (e.g. ``"ring:0,hexagon:0,star:0.5"``): per named class,
that fraction of the synthetic TRAINING instances keeps its segmentation; the others lose the
``segmentation`` key, which with ``data.mask_supervision=by_annotation`` makes them box-only
instances (set A = the classes left with at least one mask). Unlisted classes keep every mask;
the validation split is never changed, so set-B mask AP stays measurable.

Which instances keep their mask is deterministic: for class c with n annotated (non-crowd,
segmented) instances, sorted by annotation id, the first ``round(fraction * n)`` of the
permutation ``np.random.default_rng([seed, 7, category_id]).permutation(n)`` do.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np

from maskx_jax.data.classes import normalize_name

_STREAM = 7  # keeps these draws apart from the generator's own streams


def parse_mask_fractions(spec: str, class_names: Sequence[str]) -> dict[str, float]:
    """``"name:fraction,..."`` -> {class name as in ``class_names``: fraction in [0, 1]}.

    Raises:
      ValueError: a malformed entry, a fraction outside [0, 1], or an unknown class (the
        message lists the valid names).
    """
    names = {normalize_name(n): n for n in class_names[1:]}
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition(":")
        try:
            fraction = float(value) if sep else math.nan
        except ValueError:
            fraction = math.nan
        if not name.strip() or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"data.synthetic_mask_fraction entry {part!r} must be 'class name:fraction' with the "
                             "fraction in [0, 1], e.g. 'ring:0,star:0.5'")
        key = normalize_name(name)
        if key not in names:
            raise ValueError(f"data.synthetic_mask_fraction names unknown class {name.strip()!r}; valid names: "
                             f"{list(class_names[1:])}")
        out[names[key]] = fraction
    return out


def keep_masks(coco: dict, fractions: dict[str, float], seed: int) -> dict:
    """A copy of COCO dict ``coco`` where each named class keeps the masks of only ``fractions[name]``
    of its instances (see the module docstring); the others lose their ``segmentation`` key."""
    out = dict(coco)
    out["annotations"] = anns = copy.deepcopy(coco["annotations"])
    cat_ids = {c["name"]: int(c["id"]) for c in coco["categories"]}
    for name, fraction in fractions.items():
        cid = cat_ids[name]
        own = sorted((a for a in anns if a["category_id"] == cid and not a.get("iscrowd", 0) and a.get("segmentation")),
                     key=lambda a: a["id"])
        order = np.random.default_rng([seed, _STREAM, cid]).permutation(len(own))
        keep = {int(i) for i in order[: round(fraction * len(own))]}
        for k, a in enumerate(own):
            if k not in keep:
                del a["segmentation"]
    return out
