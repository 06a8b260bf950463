"""pycocotools ``COCOeval`` for ``bbox`` and ``segm``, run once over every category, reported as AP, AP50, AP75,
APs, APm, APl for three groups: all classes, set A (classes trained with masks) and set B (the others, whose
masks come from weight transfer in Mask^X R-CNN), as in Hu et al. 2018. Set A is ``data.set_a``, or with
``data.mask_supervision=by_annotation`` every class with at least one mask annotation in the training data
(``DatasetInfo.set_a_ids``); set-B mask AP is then the headline.

Metric values are pycocotools' own: fractions in [0, 1] (not percent); ``-1`` where pycocotools finds no ground
truth to score (e.g. APs on a group without small objects); a group without categories is ``None``. A group
whose categories have ground truth but no detections scores ``0.0``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
GROUPS = ("all", "set_a", "set_b")
IOU_TYPES = ("bbox", "segm")

# (iou threshold or None for the 0.50:0.95 mean, area range label) per metric, with
# maxDets = 100: the first six entries of pycocotools' COCOeval.summarize().
_METRIC_SPECS = {
    "AP": (None, "all"),
    "AP50": (0.5, "all"),
    "AP75": (0.75, "all"),
    "APs": (None, "small"),
    "APm": (None, "medium"),
    "APl": (None, "large"),
}


@contextlib.contextmanager
def _quiet():
    """Swallows pycocotools' progress prints (it writes them to stdout unconditionally)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def load_coco(gt: str | os.PathLike | COCO) -> COCO:
    """A pycocotools ``COCO`` for an annotation file path (quietly), or ``gt`` itself."""
    if isinstance(gt, COCO):
        return gt
    with _quiet():
        return COCO(os.fspath(gt))


def _load_results(gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """``gt.loadRes`` on copies that carry only the field ``iou_type`` scores.

    The ``bbox`` field is dropped for ``segm``: loadRes would otherwise take the box area as
    the instance area and bin masks into small/medium/large by their boxes (detectron2's
    evaluator drops it for the same reason). loadRes also rejects an empty list, so no
    results give an empty detection set by hand, which pycocotools scores as 0 AP.
    """
    drop = "bbox" if iou_type == "segm" else "segmentation"
    anns = [{k: v for k, v in r.items() if k != drop} for r in results if iou_type != "segm" or "segmentation" in r]
    with _quiet():
        if anns:
            return gt.loadRes(anns)
        dt = COCO()
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        dt.createIndex()
        return dt


def _group_metrics(coco_eval: COCOeval, cat_indices: Sequence[int]) -> dict[str, float]:
    """pycocotools' ``summarize`` AP numbers restricted to some categories.

    ``accumulate(p)`` with a category subset mis-indexes its evaluation cache (it uses the
    subset's positions as positions in the evaluated list), so the precision array is
    accumulated once over every category and averaged here over the group's slice, with
    exactly ``COCOeval.summarize``'s rule: the mean over entries > -1, or -1 if none.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"][:, :, list(cat_indices)]  # [T, R, K_group, A, M]
    m = list(params.maxDets).index(100)
    out = {}
    for name, (iou, area) in _METRIC_SPECS.items():
        a = list(params.areaRngLbl).index(area)
        s = precision[..., a, m]
        if iou is not None:
            s = s[np.where(iou == params.iouThrs)[0]]
        s = s[s > -1]
        out[name] = float(np.mean(s)) if s.size else -1.0
    return out


def coco_evaluate(
    gt: str | os.PathLike | COCO,
    results: list[dict],
    set_a_cat_ids: Iterable[int],
    output_json: str | os.PathLike | None = None,
    image_ids: Iterable[int] | None = None,
    iou_types: Sequence[str] = IOU_TYPES,
    verbose: bool = True,
) -> dict:
    """pycocotools AP for all classes, set A and set B, for boxes and masks.

    Args:
      gt: ground-truth annotation file path or a loaded ``COCO``.
      results: COCO result dicts (from :func:`detections_to_coco`); ``segm`` uses those
        with a ``segmentation`` field. May be empty (every AP then 0, or -1 where there
        is no ground truth).
      set_a_cat_ids: COCO category ids of set A (trained with masks). Set B is every other
        category listed in the ground truth. Ids absent from the ground truth are ignored.
      output_json: if given, the returned dict is also written there (pretty JSON).
      image_ids: evaluate only these images (e.g. the ones actually run); default all.
      iou_types: subset of ("bbox", "segm").
      verbose: print the Markdown table of :func:`format_table`.

    Returns:
      ``{group: {iou_type: {metric: value}}}`` with group in ("all", "set_a", "set_b"),
      metric in ("AP", "AP50", "AP75", "APs", "APm", "APl"), values pycocotools fractions
      (-1: nothing to score); a group without categories maps to ``None``.
    """
    coco_gt = load_coco(gt)
    all_cats = sorted(coco_gt.getCatIds())
    set_a = set(int(c) for c in set_a_cat_ids)
    groups = {
        "all": list(range(len(all_cats))),
        "set_a": [i for i, c in enumerate(all_cats) if c in set_a],
        "set_b": [i for i, c in enumerate(all_cats) if c not in set_a],
    }
    metrics: dict[str, Any] = {g: ({} if idx else None) for g, idx in groups.items()}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type {iou_type!r} not in {IOU_TYPES}")
        coco_dt = _load_results(coco_gt, results, iou_type)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.catIds = all_cats
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(int(i) for i in image_ids))
        with _quiet():
            coco_eval.evaluate()
            coco_eval.accumulate()
        for group, idx in groups.items():
            if idx:
                metrics[group][iou_type] = _group_metrics(coco_eval, idx)
    if output_json is not None:
        directory = os.path.dirname(os.fspath(output_json))
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(output_json, "w") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
    if verbose:
        print(format_table(metrics))
    return metrics


def format_table(metrics: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`coco_evaluate`'s output, values in percent.

    One row per (group, iou type); ``-`` for -1 (nothing to score); groups without
    categories are listed as ``n/a``.
    """
    lines = ["| group | type | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    for group, by_type in metrics.items():
        if by_type is None:
            lines.append(f"| {group} | n/a | " + " | ".join("n/a" for _ in METRICS) + " |")
            continue
        for iou_type, values in by_type.items():
            cells = ["-" if values[m] < 0 else f"{100.0 * values[m]:.1f}" for m in METRICS]
            lines.append(f"| {group} | {iou_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
