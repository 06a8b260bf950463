"""COCO evaluation: detections -> COCO result dicts (RLE masks) -> pycocotools AP per class group.

Three steps, each usable alone:

  * :func:`detections_to_coco` turns a host (NumPy) :class:`~maskx_jax.types.Detections` batch
    into COCO result dicts: boxes mapped back to the original image and written as XYWH, masks
    pasted into the original image with :func:`maskx_jax.paste.paste_masks`, thresholded at
    0.5 and RLE-encoded.
  * :func:`coco_evaluate` runs pycocotools ``COCOeval`` for ``bbox`` and ``segm`` once over
    every category and reports AP, AP50, AP75, APs, APm, APl for three groups: all classes,
    set A (classes trained with masks) and set B (the others, whose masks come from weight
    transfer in Mask^X R-CNN), as in Hu et al. 2018. Set A is ``data.set_a``, or with
    ``data.mask_supervision=by_annotation`` every class with at least one mask annotation
    in the training data (``DatasetInfo.set_a_ids``); set-B mask AP is then the headline.
  * :func:`evaluate_model` loops a ``predict_fn`` over evaluation batches and does both.

Metric values are pycocotools' own: fractions in [0, 1] (not percent); ``-1`` where
pycocotools finds no ground truth to score (e.g. APs on a group without small objects);
a group without categories is ``None``. A group whose categories have ground truth but
no detections scores ``0.0``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskx_jax import paste
from maskx_jax.one_behind import OneBehind
from maskx_jax.transform import resize_boxes
from maskx_jax.types import Detections

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


# --------------------------------------------------------------------------- detections -> COCO


def _round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def _num_rows_bucket(n: int, minimum: int = 16) -> int:
    """Rounds a row count up to one of 8 sizes per octave (at least ``minimum``).

    Few distinct compiled shapes (7 for up to 100 detections), at most 1/8 padded work.
    """
    step = max(minimum, 1 << max(max(int(n) - 1, 0).bit_length() - 3, 0))
    return _round_up(max(int(n), 1), step)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _paste_binary_transposed(masks: jax.Array, boxes: jax.Array, height: int, width: int) -> jax.Array:
    """Pastes and binarises masks on the device; returns bool [N, width, height].

    Thresholding before the transfer moves a quarter of the bytes, and the [N, W, H] layout
    is, read on the host as ``.transpose(2, 1, 0)``, the Fortran-ordered [H, W, N] array
    that ``pycocotools.mask.encode`` wants.
    """
    soft = paste.paste_masks(masks, boxes, height, width)
    return jnp.swapaxes(soft > 0.5, 1, 2)


def paste_binary_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, canvas_multiple: int = 128
) -> np.ndarray:
    """Pastes box-frame mask probabilities into an image and thresholds them at 0.5.

    To bound the number of jit compilations the paste runs on a canvas whose sides are
    rounded up to ``canvas_multiple``, with the row count rounded up to 16, 32, ..., 112,
    128, 160, ... (padding rows paste nothing), then crops. Each output pixel depends only on its own coordinates
    and the box, so the crop equals a paste at the exact size.

    Args:
      masks: float [N, M, M] mask probabilities in the box frame (M = 28).
      boxes: float [N, 4] XYXY boxes in the (height, width) image frame.
      height, width: output size (the original image).
      canvas_multiple: rounding of the pasting canvas (1 = exact size, one compile per size).

    Returns:
      np.uint8 [height, width, N], Fortran-ordered, 1 inside a mask: the layout
      ``pycocotools.mask.encode`` takes.
    """
    n = masks.shape[0]
    if n == 0:
        return np.zeros((height, width, 0), dtype=np.uint8, order="F")
    rows = _num_rows_bucket(n)
    padded_masks = np.zeros((rows,) + masks.shape[1:], dtype=np.float32)
    padded_masks[:n] = masks
    padded_boxes = np.zeros((rows, 4), dtype=np.float32)
    padded_boxes[:n] = boxes
    canvas_h = _round_up(height, canvas_multiple)
    canvas_w = _round_up(width, canvas_multiple)
    out = _paste_binary_transposed(padded_masks, padded_boxes, height=canvas_h, width=canvas_w)
    out = np.asarray(out)[:n, :width, :height]  # [n, W, H]
    return np.asfortranarray(out.transpose(2, 1, 0)).view(np.uint8)


def _category_lookup(contiguous_to_cat_id: Mapping[int, int] | Sequence[int]) -> np.ndarray:
    """int64 table ``lut[label] = COCO category id`` (-1 where unmapped)."""
    if isinstance(contiguous_to_cat_id, Mapping):
        items = [(int(k), int(v)) for k, v in contiguous_to_cat_id.items()]
    else:
        items = [(i, int(v)) for i, v in enumerate(contiguous_to_cat_id)]
    lut = np.full(max(k for k, _ in items) + 1, -1, dtype=np.int64)
    for k, v in items:
        lut[k] = v
    return lut


def detections_to_coco(
    det: Detections,
    image_ids: np.ndarray,
    image_sizes: np.ndarray,
    original_sizes: np.ndarray,
    contiguous_to_cat_id: Mapping[int, int] | Sequence[int],
    with_masks: bool = True,
    canvas_multiple: int = 128,
    unscored_labels: Iterable[int] = (),
) -> list[dict]:
    """Converts a batch of detections to COCO result dicts in the original image frames.

    Args:
      det: host (NumPy) detections for B images: boxes float [B, D, 4] XYXY in the resized
        input frame, scores [B, D], labels int [B, D] contiguous 1..K, valid bool [B, D],
        masks float [B, D, M, M] probabilities in each box's frame.
      image_ids: int [B] COCO image ids; images with id < 0 (batch padding) are skipped.
      image_sizes: int [B, 2] (h, w) of each resized image inside the padded input.
      original_sizes: int [B, 2] (h, w) of each image on disk.
      contiguous_to_cat_id: contiguous label -> COCO category id, a mapping or a sequence
        indexed by label (entry 0, background, unused).
      with_masks: False for a box-only model: no ``segmentation`` field, no pasting.
      canvas_multiple: see :func:`paste_binary_masks`.
      unscored_labels: labels of classes the ground truth does not have (e.g. added by a
        box-only training source): their detections are left out (pycocotools could not
        score them); any other label without a category id is an error.

    Returns:
      One dict per valid detection: ``image_id`` int, ``category_id`` int (COCO id),
      ``bbox`` [x, y, w, h] floats in original pixels, ``score`` float and, with masks,
      ``segmentation`` a compressed RLE {"size": [h, w], "counts": str} (JSON-serialisable).

    Raises:
      ValueError: a valid detection's label has no COCO category.
    """
    lut = _category_lookup(contiguous_to_cat_id)
    unscored = np.asarray(sorted(int(i) for i in unscored_labels), np.int64)
    boxes_all = np.asarray(det.boxes, dtype=np.float32)
    scores_all = np.asarray(det.scores, dtype=np.float32)
    labels_all = np.asarray(det.labels).astype(np.int64)
    valid_all = np.asarray(det.valid, dtype=bool)
    image_ids = np.asarray(image_ids).reshape(-1)
    image_sizes = np.asarray(image_sizes).reshape(-1, 2)
    original_sizes = np.asarray(original_sizes).reshape(-1, 2)
    results: list[dict] = []
    for b in range(boxes_all.shape[0]):
        image_id = int(image_ids[b])
        keep = np.flatnonzero(valid_all[b] & ~np.isin(labels_all[b], unscored))
        if image_id < 0 or keep.size == 0:
            continue
        labels = labels_all[b, keep]
        bad = (labels < 0) | (labels >= lut.size)
        cat_ids = np.where(bad, -1, lut[np.clip(labels, 0, lut.size - 1)])
        if (cat_ids < 0).any():
            raise ValueError(f"labels {sorted(set(labels[cat_ids < 0].tolist()))} have no COCO category id")
        height, width = (int(s) for s in original_sizes[b])
        boxes = resize_boxes(boxes_all[b, keep], image_sizes[b], original_sizes[b])
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        scores = scores_all[b, keep].tolist()
        rles = None
        if with_masks:
            masks = np.asarray(det.masks[b], dtype=np.float32)[keep]
            binary = paste_binary_masks(masks, boxes, height, width, canvas_multiple)
            rles = mask_utils.encode(binary)
        for i in range(keep.size):
            result = {
                "image_id": image_id,
                "category_id": int(cat_ids[i]),
                "bbox": [float(v) for v in xywh[i]],
                "score": float(scores[i]),
            }
            if rles is not None:
                rle = rles[i]
                result["segmentation"] = {"size": [int(s) for s in rle["size"]],
                                          "counts": rle["counts"].decode("ascii")}
            results.append(result)
    return results


# --------------------------------------------------------------------------- pycocotools


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


# --------------------------------------------------------------------------- model loop


def evaluate_model(
    predict_fn: Callable[[Any, Any], Detections],
    eval_batches: Iterable[tuple[Any, Any]],
    gt: str | os.PathLike | COCO,
    contiguous_to_cat_id: Mapping[int, int] | Sequence[int],
    set_a_cat_ids: Iterable[int],
    output_json: str | os.PathLike | None = None,
    results_json: str | os.PathLike | None = None,
    with_masks: bool = True,
    num_batches: int | None = None,
    progress: bool = True,
    verbose: bool = True,
    unscored_labels: Iterable[int] = (),
) -> dict:
    """Runs a detector over evaluation batches and scores it with :func:`coco_evaluate`.

    The next batch is dispatched before the previous one's detections are converted, so
    on an accelerator the host work (pasting transfer, RLE) overlaps the forward pass.
    Only the images seen (ids >= 0) are scored, so a truncated run is not penalised for
    images it never ran.

    Args:
      predict_fn: ``(images [B, H, W, 3] float32, image_sizes [B, 2] int32) -> Detections``
        (e.g. a jitted ``model.predict``), detections in the resized input frame.
      eval_batches: iterable of ``(batch, records)``; ``batch`` has ``images``,
        ``image_sizes``, ``image_ids`` (-1 for padding) and ``original_sizes``; ``records``
        is ignored.
      gt: annotation file path or ``COCO`` of the evaluated split.
      contiguous_to_cat_id: contiguous label -> COCO category id (see
        :func:`detections_to_coco`).
      set_a_cat_ids: COCO category ids of set A.
      output_json: where to write the metrics (pretty JSON), optional.
      results_json: where to write the raw COCO results, optional.
      with_masks: False for a box-only model (``segm`` is then skipped).
      num_batches: length of ``eval_batches`` for the progress bar, if it has no ``len``.
      progress: show a tqdm progress bar.
      verbose: print the metrics table.
      unscored_labels: classes absent from ``gt`` (see :func:`detections_to_coco`).

    Returns:
      The metrics dict of :func:`coco_evaluate`.
    """
    from tqdm.auto import tqdm

    results: list[dict] = []
    seen_ids: set[int] = set()
    unscored_labels = tuple(unscored_labels)

    def convert(pending) -> None:
        det, batch = pending
        det = jax.device_get(det)
        image_ids = np.asarray(batch.image_ids).reshape(-1)
        seen_ids.update(int(i) for i in image_ids if i >= 0)
        results.extend(
            detections_to_coco(
                det, image_ids, batch.image_sizes, batch.original_sizes, contiguous_to_cat_id, with_masks=with_masks,
                unscored_labels=unscored_labels,
            )
        )

    total = num_batches
    if total is None and hasattr(eval_batches, "__len__"):
        total = len(eval_batches)
    behind = OneBehind(convert)
    for batch, _ in tqdm(eval_batches, total=total, desc="eval", disable=not progress, unit="batch"):
        behind.push((predict_fn(batch.images, batch.image_sizes), batch))
    behind.flush()
    if results_json is not None:
        with open(results_json, "w") as f:
            json.dump(results, f)
    iou_types = IOU_TYPES if with_masks else ("bbox",)
    return coco_evaluate(
        gt, results, set_a_cat_ids, output_json=output_json, image_ids=sorted(seen_ids), iou_types=iou_types,
        verbose=verbose)
