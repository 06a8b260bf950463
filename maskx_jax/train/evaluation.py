"""Evaluating a run: COCO AP of a train state (or a work directory's latest checkpoint) on the validation set,
``metrics.json``, TensorBoard scalars and prediction pictures."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from maskx_jax.train.checkpointing import make_checkpoint_manager, restore_state
from maskx_jax.train.config_checks import check_resume_config
from maskx_jax.train.datasets import load_datasets
from maskx_jax.train.layout import CHECKPOINT_DIR, METRICS_FILE, PICTURES_DIR, TB_DIR
from maskx_jax.train.step import TrainState
from maskx_jax.train.trainer import Trainer
from maskx_jax.types import Batch, Detections


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, trainer: Trainer | None = None,
             state: TrainState | None = None, step: int | None = None, progress: bool = True,
             info: Any = None) -> dict | None:
    """COCO evaluation of ``state`` (default: the latest checkpoint in ``workdir``) on the validation set.

    Writes ``WORKDIR/metrics.json`` (AP for all / set A / set B, see :mod:`maskx_jax.eval.coco_eval`),
    ``eval.num_pictures`` prediction PNGs to ``WORKDIR/pictures`` and the APs to TensorBoard at
    ``step``. ``eval.max_images`` limits the images. Every process must call this (the forward
    pass is one program over the whole mesh); only process 0 writes. Returns the metrics
    (``None`` when the data has no validation set).
    """
    from maskx_jax.data import pipeline
    from maskx_jax.eval.run import evaluate_model

    workdir = os.path.abspath(workdir)
    if state is None:
        check_resume_config(workdir, config)
    if info is None:
        info = load_datasets(config)
    if not info.val_json or info.val is None:
        logging.warning("no validation set for data.source=%s; skipping evaluation", config.data.source)
        return None
    if trainer is None:
        trainer = Trainer(config, int(info.num_classes))
    if state is None:
        manager = make_checkpoint_manager(workdir, config)
        latest = manager.latest_step()
        if latest is None:
            manager.close()
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} to evaluate")
        state = restore_state(manager, trainer, latest, verify=bool(config.train.get("verify_checkpoints", True)))
        manager.close()
        logging.info("evaluating %s", os.path.join(workdir, CHECKPOINT_DIR, str(latest)))
        step = latest
    step = int(jax.device_get(state.step)) if step is None else step
    predict_fn = trainer.make_predict_fn(state)
    main = jax.process_index() == 0
    batches = pipeline.make_eval_batches(config, "val", max_images=int(config.eval.max_images), info=info)
    set_a_cat_ids = [info.contiguous_to_cat_id[i] for i in info.set_a_ids if i in info.contiguous_to_cat_id]
    metrics = evaluate_model(
        predict_fn, batches, info.val_json, info.contiguous_to_cat_id, set_a_cat_ids,
        output_json=os.path.join(workdir, METRICS_FILE) if main else None,
        with_masks=bool(info.val_has_masks) and config.model.mask_mode != "none", progress=progress and main,
        verbose=main, unscored_labels=getattr(info, "unscored_ids", ()))
    if main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(workdir, TB_DIR))
        for group, by_type in metrics.items():
            for iou_type, values in (by_type or {}).items():
                for name, v in values.items():
                    if v is not None and v >= 0:
                        writer.add_scalar(f"eval/{group}/{iou_type}/{name}", v, step)
        writer.close()
        logging.info("step %d: metrics written to %s", step, os.path.join(workdir, METRICS_FILE))
    if int(config.eval.num_pictures) > 0:
        write_pictures(config, os.path.join(workdir, PICTURES_DIR), predict_fn, info)
    if main:
        logging.info("%s", info.report())  # now including the validation images' problems
    return metrics


def write_pictures(config: ml_collections.ConfigDict, directory: str, predict_fn: Callable, info: Any) -> list[str]:
    """Draw the predictions on the first ``eval.num_pictures`` validation images (set-B classes marked).

    Detections with score >= ``eval.picture_score_thresh`` are drawn in the original image frame
    (boxes mapped back, masks pasted and thresholded at 0.5) by :mod:`maskx_jax.visualize`.
    Returns the written paths (process 0; other processes only take part in the forward pass).
    """
    from maskx_jax import visualize
    from maskx_jax.data import pipeline

    main = jax.process_index() == 0
    thresh = float(config.eval.picture_score_thresh)
    if main:
        os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    batches = pipeline.make_eval_batches(config, "val", max_images=int(config.eval.num_pictures), info=info)
    for batch, records in batches:
        det = predict_fn(batch.images, batch.image_sizes)
        if not main:
            continue
        for record, picture in draw_predictions(det, batch, records, info, thresh):
            path = os.path.join(directory, f"{int(record.image_id):012d}.png")
            visualize.save_png(path, picture)
            written.append(path)
    if main:
        logging.info("%d prediction pictures written to %s", len(written), directory)
    return written


def draw_predictions(det: Detections, batch: Batch, records: list, info: Any,
                     thresh: float) -> list[tuple[Any, np.ndarray]]:
    """[(record, uint8 HWC picture)] for the rows of an evaluation batch (``make_eval_batches``):
    detections scoring >= ``thresh`` drawn on the original image (set-B classes marked)."""
    from maskx_jax.eval import pictures

    det = jax.device_get(det)
    out = []
    for row, record in enumerate(records):
        example = info.val.load(record.index, info.has_mask_by_class)
        if example is None:
            continue
        picture, _ = pictures.draw_row(example.image, det, row, batch.image_sizes[row], score_thresh=thresh,
                                       class_names=info.class_names, set_b_ids=info.set_b_ids,
                                       with_masks=bool(info.val_has_masks))
        out.append((record, picture))
    return out
