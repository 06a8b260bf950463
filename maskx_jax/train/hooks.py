"""What runs beside the train loop: progress bar and TensorBoard scalars, termination requests (SIGTERM,
preemption), and prediction images in TensorBoard."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from maskx_jax.train.datasets import load_datasets
from maskx_jax.train.evaluation import draw_predictions
from maskx_jax.train.layout import TB_DIR
from maskx_jax.train.step import TrainState
from maskx_jax.train.trainer import Trainer


class ProgressLogger:
    """tqdm progress bar + TensorBoard scalars, both on process 0 only."""

    def __init__(self, workdir: str, start: int, total: int, global_batch: int, log_every: int, progress: bool):
        self.main = jax.process_index() == 0
        self.global_batch = global_batch
        self.log_every = log_every
        self.writer = None
        self.bar = None
        if self.main:
            from tensorboardX import SummaryWriter
            from tqdm.auto import tqdm

            self.writer = SummaryWriter(os.path.join(workdir, TB_DIR))
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            disable=not progress, mininterval=1.0)
        self.progress = progress
        self.window: list[dict] = []
        self.window_start: float | None = None  # wall time when the window's first step finished
        self.window_steps = 0
        self.images_per_sec = float("nan")
        self.first_done: float | None = None  # wall time when this run's first step finished (compiled)
        self.last_done: float | None = None
        self.steps_done = 0

    def step_done(self, m: dict) -> None:
        """``m``: host metrics of one finished step (see :func:`make_train_step`)."""
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = now
        self.last_done = now
        self.steps_done += 1
        if self.window_start is None:  # first step: includes compilation, so not timed
            self.window_start = now
        else:
            self.window_steps += 1
        self.window.append(m)
        step = int(m["step"]) + 1
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{float(m['total']):.4g}"}
            post.update({k: f"{float(v):.3g}" for k, v in m["losses"].items()})
            post["lr"] = f"{float(m['lr']):.3g}"
            post["img/s"] = f"{self.images_per_sec:.1f}" if math.isfinite(self.images_per_sec) else "-"
            if int(m["skipped"]):
                post["skipped"] = int(m["skipped"])
            self.bar.set_postfix(post, refresh=False)
        if step % self.log_every == 0:
            self.flush_window(step, now)

    def seconds_per_step(self) -> float | None:
        """Mean wall time of this run's steps after the first (which includes compilation); None if < 2 steps."""
        if self.steps_done < 2:
            return None
        return (self.last_done - self.first_done) / (self.steps_done - 1)

    def flush_window(self, step: int, now: float) -> None:
        if not self.window:
            return
        if self.window_steps > 0 and now > self.window_start:
            self.images_per_sec = self.window_steps * self.global_batch / (now - self.window_start)
        mean = lambda xs: float(np.mean([float(x) for x in xs]))
        finite = [m for m in self.window if not bool(m["nonfinite"])] or self.window
        scalars = {f"loss/{k}": mean([m["losses"][k] for m in finite]) for k in finite[0]["losses"]}
        scalars["loss/total"] = mean([m["total"] for m in finite])
        scalars["lr"] = float(self.window[-1]["lr"])
        scalars["grad_norm"] = mean([m["grad_norm"] for m in finite])
        scalars["skipped"] = float(self.window[-1]["skipped"])
        if math.isfinite(self.images_per_sec):
            scalars["images_per_sec"] = self.images_per_sec
        if self.main:
            for k, v in scalars.items():
                if math.isfinite(v):  # a skipped step's NaN stays out of the curves (see 'skipped')
                    self.writer.add_scalar(k, v, step)
            if not self.progress:
                logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        self.window = []
        self.window_start = now
        self.window_steps = 0

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.main and self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class TerminationWatch:
    """Turns a termination request into "checkpoint after this step and stop".

    One process: SIGTERM (what SLURM, Kubernetes and most schedulers send before killing a job)
    sets a flag. Several processes: orbax's preemption sync point, which JAX's distributed
    runtime agrees on across processes, so every process stops after the same step.
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.flag = False
        self.previous = None
        self.installed = False
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
            self.installed = True

    def _on_signal(self, signum, frame) -> None:
        del signum, frame
        self.flag = True
        logging.warning("SIGTERM received: saving a checkpoint after the current step, then stopping")

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self.manager.reached_preemption(step))
        return self.flag

    def close(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


def make_tb_images_hook(config: ml_collections.ConfigDict, trainer: Trainer, info: Any,
                        writer: Any) -> Callable[[int, TrainState], None] | None:
    """``on_step`` for :func:`_train_loop`: every ``eval.tb_images_every`` steps, the predictions on
    the first ``eval.tb_num_images`` validation images (the same ones every time, prepared once)
    go to TensorBoard as ``predictions/<image id>`` (HWC uint8, drawn like ``write_pictures``,
    score >= ``eval.picture_score_thresh``). None when off (0) or without a validation set.

    Every process runs the forward pass (one program over the mesh); ``writer`` is None except on
    process 0, which draws and writes.
    """
    every = int(config.eval.tb_images_every)
    if every <= 0:
        return None
    from maskx_jax.data import pipeline

    info = info if info is not None else load_datasets(config)
    if info.val is None:
        logging.warning("eval.tb_images_every=%d but there is no validation set: no TensorBoard images", every)
        return None
    n = int(config.eval.tb_num_images)
    size = trainer.mesh.size
    batches = pipeline.make_eval_batches(config, "val", batch_size=-(-n // size) * size, max_images=n, info=info)
    try:
        batch, records = next(batches)  # the whole fixed set: one batch, padded to split over the mesh
    finally:
        batches.close()
    thresh = float(config.eval.picture_score_thresh)

    def hook(step: int, state: TrainState) -> None:
        if step % every:
            return
        det = trainer.make_predict_fn(state)(batch.images, batch.image_sizes)
        if writer is None:
            return
        try:
            pictures = draw_predictions(det, batch, records, info, thresh)
        except Exception:  # noqa: BLE001 - a picture is not worth a training run
            logging.exception("step %d: drawing the TensorBoard prediction images failed; training goes on", step)
            return
        for record, picture in pictures:
            writer.add_image(f"predictions/{int(record.image_id)}", picture, step, dataformats="HWC")
        writer.flush()

    return hook
