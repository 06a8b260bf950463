"""A detector scored on evaluation batches: :func:`evaluate_model` dispatches each batch before converting the
previous one's detections (:mod:`maskx_jax.eval.coco_results`), then scores them all
(:func:`maskx_jax.eval.coco_eval.coco_evaluate`)."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from pycocotools.coco import COCO

from maskx_jax.eval import coco_eval
from maskx_jax.eval.coco_results import detections_to_coco
from maskx_jax.one_behind import OneBehind
from maskx_jax.types import Detections


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
    """Runs a detector over evaluation batches and scores it with :func:`~maskx_jax.eval.coco_eval.coco_evaluate`.

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
      The metrics dict of :func:`~maskx_jax.eval.coco_eval.coco_evaluate`.
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
    iou_types = coco_eval.IOU_TYPES if with_masks else ("bbox",)
    return coco_eval.coco_evaluate(
        gt, results, set_a_cat_ids, output_json=output_json, image_ids=sorted(seen_ids), iou_types=iou_types,
        verbose=verbose)
