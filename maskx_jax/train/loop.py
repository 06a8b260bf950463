"""``train()``: resume or initialise, the loop, the final evaluation.

Determinism and resumption. The batch of step ``s`` is a pure function of ``(data seed, s)``
(``data.pipeline.make_train_iterator(start_step=s)``) and the step's randomness is
``fold_in(PRNGKey(train.seed), s)`` with ``s`` read from the train state, so a run interrupted
at any point and re-run with the same command restarts from its latest complete checkpoint and
continues exactly as if never stopped.

Non-finite losses: the step drops the update (``step.py``); here ``train.on_nonfinite`` decides what the host
does: ``'stop'`` ends the run with :class:`NonFiniteLossError` naming the step (no checkpoint is written after
it, so the last good checkpoint stays the latest), ``'skip'`` counts the skip, logs it and goes on.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from maskx_jax.one_behind import OneBehind
from maskx_jax.train import checkpointing
from maskx_jax.train.checkpointing import make_checkpoint_manager
from maskx_jax.config import validate
from maskx_jax.train.config_checks import (check_resume_config, check_scaling, check_trainer_config,
                                           format_differences, write_config)
from maskx_jax.train.datasets import default_train_iter, load_datasets
from maskx_jax.train.evaluation import evaluate
from maskx_jax.train.hooks import ProgressLogger, TerminationWatch, make_tb_images_hook
from maskx_jax.train.init_checkpoint import InitCheckpointError, log_init_report
from maskx_jax.train.layout import CHECKPOINT_DIR, CONFIG_FILE, INIT_REPORT_FILE
from maskx_jax.train.step import TrainState
from maskx_jax.train.trainer import ModelFn, Trainer
from maskx_jax.types import Batch


class NonFiniteLossError(RuntimeError):
    """The loss was not finite at ``step`` and ``train.on_nonfinite='stop'``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step




@dataclasses.dataclass
class TrainResult:
    state: TrainState
    trainer: Trainer
    step: int
    skipped: int
    metrics: dict | None  # evaluation metrics, when evaluated
    preempted: bool = False  # stopped early by SIGTERM / a preemption notice, after saving a checkpoint
    seconds_per_step: float | None = None  # mean wall time of this call's steps after the first (None: < 2 run)


def train(config: ml_collections.ConfigDict, workdir: str, *, trainer: Trainer | None = None,
          model_fn: ModelFn | None = None, num_classes: int | None = None,
          train_iter_fn: Callable[..., Iterator[Batch]] | None = None, evaluate_at_end: bool = True,
          progress: bool = True, info: Any = None) -> TrainResult:
    """Train for ``train.steps`` steps in ``workdir``, resuming from its latest checkpoint if any.

    Args:
      config: the full config (:func:`maskx_jax.config.validate` runs first).
      workdir: output directory (created); see the module docstring for its layout.
      trainer: reuse compiled functions (tests); built from ``config`` otherwise.
      model_fn, num_classes, train_iter_fn: overrides of the model builder, the class count (else
        from ``data.pipeline.load_datasets``) and ``data.pipeline.make_train_iterator`` (same signature).
      info: an already loaded ``DatasetInfo`` (loaded when needed otherwise).
      evaluate_at_end: run :func:`evaluate` after the last step.
      progress: show the tqdm bar (scalars are logged every ``train.log_every`` steps either way).
    Raises:
      ConfigMismatchError: ``workdir`` holds a checkpoint trained with another architecture.
      NonFiniteLossError: a non-finite loss under ``train.on_nonfinite='stop'``.
    """
    validate(config)  # before anything is written
    t = config.train
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    manager = make_checkpoint_manager(workdir, config, cleanup_tmp=True)
    latest = manager.latest_step()
    if latest is not None:
        changed = check_resume_config(workdir, config)
        if changed:
            logging.warning("resuming %s with changed settings:\n%s", workdir, format_differences(changed))
    else:
        if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
            logging.info("%s has no checkpoint yet: starting fresh and replacing its config.json", workdir)
        write_config(workdir, config)

    if info is None and (train_iter_fn is None or (trainer is None and num_classes is None)):
        info = load_datasets(config)
    own_trainer = trainer is None  # a trainer passed in is the caller's to reuse: its compiled init is kept
    if own_trainer:
        if num_classes is None:
            num_classes = int(info.num_classes)
        trainer = Trainer(config, num_classes, model_fn=model_fn)
    else:
        check_scaling(config, trainer.mesh)
        check_trainer_config(trainer, config)

    if latest is not None:
        manager, state, latest = checkpointing.restore_intact(manager, trainer, workdir, config)
        logging.info("resumed from %s at step %d", os.path.join(workdir, CHECKPOINT_DIR, str(latest)), latest)
    else:
        state = trainer.init_state()
        if own_trainer:  # the init program is not needed again: its host memory goes back
            trainer.release_init()
        if t.init_checkpoint:
            state, report = trainer.load_init_checkpoint(state, t.init_checkpoint)
            log_init_report(workdir, report)
            if report["frozen_not_loaded"]:
                names = report["frozen_not_loaded"]
                raise InitCheckpointError(
                    f"train.freeze={trainer.freeze!r} keeps {len(names)} variable(s) fixed that "
                    f"{t.init_checkpoint} does not provide (they would stay random): "
                    f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''} (full list in "
                    f"{os.path.join(workdir, INIT_REPORT_FILE)}). Convert a checkpoint with those parts and the "
                    f"dataset's class count (--classes coco80 maps torchvision's 91 COCO labels to 80), "
                    f"or freeze less.")
    trainable, frozen = trainer.param_count(state)
    logging.info("parameters: %.2fM trainable, %.2fM frozen; mesh %s over %d devices (%d processes)",
                 trainable / 1e6, frozen / 1e6, dict(trainer.mesh.shape), trainer.mesh.size, jax.process_count())

    start = int(jax.device_get(state.step))
    total = int(t.steps)
    iter_fn = train_iter_fn or default_train_iter(info)
    logger = ProgressLogger(workdir, min(start, total), total, int(t.batch_size), int(t.log_every), progress)
    skipped = int(jax.device_get(state.skipped))
    preempted = False
    watch = TerminationWatch(manager)
    try:
        if start < total:
            tb_images = make_tb_images_hook(config, trainer, info, logger.writer)
            batches = iter_fn(config, start_step=start, process_index=jax.process_index(),
                              process_count=jax.process_count())
            try:
                state, skipped, preempted = _train_loop(trainer, state, batches, start, total, manager, logger,
                                                        watch, t, on_step=tb_images)
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
    finally:
        watch.close()
        manager.wait_until_finished()  # a pending async save completes even when the loop raised
        manager.close()
        logger.close()
    if skipped:
        logging.warning("%d step(s) were skipped for non-finite losses", skipped)
    if info is not None and start < total:
        logging.info("%s", info.report())  # bad records met while decoding, by kind
    result = TrainResult(state=state, trainer=trainer, step=int(jax.device_get(state.step)), skipped=skipped,
                         metrics=None, preempted=preempted, seconds_per_step=logger.seconds_per_step())
    if preempted:
        logging.warning("stopped at step %d of %d on a termination request; the checkpoint is saved: run the same "
                        "command again to continue", result.step, total)
    elif evaluate_at_end:
        result.metrics = evaluate(config, workdir, trainer=trainer, state=state, step=result.step, info=info,
                                  progress=progress)
    return result


def _train_loop(trainer: Trainer, state: TrainState, batches: Iterator[Batch], start: int, total: int,
                manager: ocp.CheckpointManager, logger: ProgressLogger, watch: TerminationWatch,
                t: ml_collections.ConfigDict, on_step: Callable[[int, TrainState], None] | None = None
                ) -> tuple[TrainState, int, bool]:
    """Steps ``start .. total-1``. Metrics are read one step late, so the host never stalls the device.

    ``on_step(completed_steps, state)`` runs after every step (e.g. :func:`make_tb_images_hook`).
    Returns (state, skipped steps, whether a termination request stopped the loop early).
    """
    skipped = 0

    def handle(m_dev) -> None:
        nonlocal skipped
        m = jax.device_get(m_dev)
        step = int(m["step"])
        skipped = int(m["skipped"])
        if bool(m["nonfinite"]):
            losses = ", ".join(f"{k}={float(v):.4g}" for k, v in m["losses"].items())
            what = "loss" if not math.isfinite(float(m["total"])) else "gradient"
            if t.on_nonfinite == "stop":
                latest = manager.latest_step()
                where = (f"the latest checkpoint is step {latest} ({latest} completed steps) in {manager.directory}"
                         if latest is not None else "no checkpoint was written yet")
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step} (the step after {step} completed steps; "
                    f"total={float(m['total'])}, {losses}, grad_norm={float(m['grad_norm'])}); "
                    f"stopping because train.on_nonfinite='stop'. "
                    f"That step's update was not applied and nothing was saved after it; {where}. "
                    f"Re-running the same command resumes from it (e.g. with a lower train.lr, or "
                    f"train.on_nonfinite='skip').", step)
            logging.warning("step %d: non-finite %s (total=%s, %s, grad_norm=%s); update skipped (%d skipped so far)",
                            step, what, float(m["total"]), losses, float(m["grad_norm"]), skipped)
        logger.step_done(m)

    metrics_behind = OneBehind(handle)  # a step's metrics are read once the next step is dispatched
    for step in range(start, total):
        local = next(batches)
        if step == start:  # which slice of the global batch this process loads (one line per run)
            logging.info("process %d of %d loads images %s of step %d's global batch", jax.process_index(),
                         jax.process_count(), [int(i) for i in np.asarray(local.image_ids).reshape(-1)], step)
        batch = trainer.global_batch(local)
        if step == start:  # compiled before its first run, and the compiler's leftovers handed back
            trainer.train_step.compile(state, batch)
        state, metrics = trainer.train_step(state, batch)
        metrics_behind.push(metrics)
        done = step + 1
        if on_step is not None:
            on_step(done, state)
        stop = watch.requested(done)
        if done % int(t.checkpoint_every) == 0 or done == total or stop:
            metrics_behind.flush()  # know this step's outcome before saving it
            checkpointing.save_state(manager, state, done)  # through the module: tests wrap it
        if stop and done < total:
            return state, skipped, True
    metrics_behind.flush()
    return state, skipped, False
