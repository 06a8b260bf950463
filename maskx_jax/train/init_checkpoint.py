"""``train.init_checkpoint``: fill a fresh train state from a converted checkpoint, a backbone, or another run's
work directory, and report by name what was loaded and what was not.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from maskx_jax.optim import is_frozen, parse_freeze
from maskx_jax.state_utils import path_name, variable_path
from maskx_jax.train.config_checks import ConfigMismatchError
from maskx_jax.train.layout import INIT_REPORT_FILE
from maskx_jax.train.step import TrainState
from maskx_jax.train.trainer import Trainer


class InitCheckpointError(ConfigMismatchError):
    """``train.init_checkpoint`` leaves variables that ``train.freeze`` keeps fixed at their random initialisation."""


def load_init_checkpoint(trainer: Trainer, state: TrainState, directory: str) -> tuple[TrainState, dict]:
    """Fill ``state`` from a converted maskx_jax checkpoint (see :mod:`maskx_jax.checkpoint`) or from
    another training run's work directory.

    kind ``detector`` (Mask R-CNN) or ``box_detector`` (Faster R-CNN: no mask branch, which then stays
    at its initialisation): every model variable with the same path and shape is loaded;
    kind ``resnet``: the checkpoint's variables go under ``backbone.body``; kind ``workdir`` (a
    ``train.py`` work directory or ``WORKDIR/checkpoints/<step>``, latest step by default): its
    model variables, like a detector (e.g. a box detector trained here with ``mask_mode='none'``).
    Returns the new state and a report {kind, loaded, not_loaded (model variables left at their
    initialisation), unused (checkpoint entries the model lacks), shape_mismatch, frozen_not_loaded
    (the not_loaded ones that ``train.freeze`` keeps fixed)}, all by name.
    """
    from maskx_jax import workdir as workdir_lib
    from maskx_jax.checkpoint import load_flat, read_meta

    if workdir_lib.find_workdir(directory) is not None:
        flat, found = workdir_lib.load_variables(directory, verify=trainer.verify_checkpoints)
        kind = "workdir"
        source = f"{found['workdir']} step {found['step']} (mask_mode={found['mask_mode']})"
    else:
        meta = read_meta(directory)
        kind = meta.get("kind")
        if kind not in ("detector", "box_detector", "resnet"):
            raise ValueError(f"{directory}: unknown checkpoint kind {kind!r} "
                             f"(expected 'detector', 'box_detector' or 'resnet')")
        prefix = ("backbone", "body") if kind == "resnet" else ()
        flat = {prefix + tuple(p): a for p, a in load_flat(directory, verify=trainer.verify_checkpoints).items()}
        source = meta.get("source", "")
    report = {"checkpoint": os.path.abspath(directory), "kind": kind, "source": source,
              "loaded": [], "not_loaded": [], "unused": [], "shape_mismatch": [], "frozen_not_loaded": []}
    used = set()
    frozen_groups = parse_freeze(trainer.freeze)

    def not_loaded(path: tuple, name: str) -> None:
        report["not_loaded"].append(name)
        if is_frozen(path, frozen_groups):
            report["frozen_not_loaded"].append(name)

    def fill(key_path, leaf):
        path = variable_path(key_path)
        name = path_name(path)
        if path not in flat:
            not_loaded(path, name)
            return leaf
        used.add(path)
        value = np.asarray(flat[path])
        if tuple(value.shape) != tuple(leaf.shape):
            report["shape_mismatch"].append(f"{name}: checkpoint {tuple(value.shape)}, model {tuple(leaf.shape)}")
            not_loaded(path, name)
            return leaf
        report["loaded"].append(name)
        value = value.astype(leaf.dtype)
        return jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx: value[idx])

    params = jax.tree_util.tree_map_with_path(fill, state.params)
    rest = jax.tree_util.tree_map_with_path(fill, state.rest)
    report["unused"] = sorted(path_name(p) for p in flat if p not in used)
    # A fresh optimiser state: momentum buffers start at zero for the loaded values too.
    opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(params)
    return state.replace(params=params, rest=rest, opt_state=opt_state), report


def log_init_report(workdir: str, report: dict) -> None:
    logging.info("init checkpoint %s (%s): loaded %d variables, %d left at initialisation, "
                 "%d checkpoint entries unused", report["checkpoint"], report["kind"], len(report["loaded"]),
                 len(report["not_loaded"]), len(report["unused"]))
    if report["not_loaded"]:
        logging.info("not loaded (kept at initialisation):\n  %s", "\n  ".join(report["not_loaded"]))
    if report["shape_mismatch"]:
        logging.warning("shape mismatch (not loaded):\n  %s", "\n  ".join(report["shape_mismatch"]))
    if report["unused"]:
        logging.info("checkpoint entries the model does not have:\n  %s", "\n  ".join(report["unused"]))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, INIT_REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
