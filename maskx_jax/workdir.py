"""Reading a training work directory (``train.py --workdir``): its config, its checkpoints, its weights.

Layout (written by ``train.py``, see :mod:`maskx_jax.train.layout`)::

    WORKDIR/config.json              the run's full config
    WORKDIR/checkpoints/<step>/      orbax checkpoints of the TrainState (params, opt_state, rest, ...)

Used by ``predict`` (a work directory as the model to run) and by ``train.init_checkpoint`` (a work
directory as the starting point of another run: stage-wise Mask^X on a detector trained here).
"""
from __future__ import annotations

import json
import logging as logging_std
import os
from typing import Any, Mapping

import numpy as np

log = logging_std.getLogger("maskx_jax.workdir")


def _as_config_value(value: Any, current: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_config_value(v, None) for v in value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_saved(saved: Mapping) -> Any:
    """The config of a work directory's ``config.json``: :func:`base_config` with every saved value.

    Keys this version does not know are ignored (with a warning)."""
    from maskx_jax import config as config_lib
    from maskx_jax.train.config_checks import flat_config

    config = config_lib.base_config()
    unknown = []
    for key, value in flat_config(saved).items():
        *parents, leaf = key.split(".")
        node = config
        try:
            for p in parents:
                node = node[p]
            current = node[leaf]
        except (KeyError, AttributeError):
            unknown.append(key)
            continue
        node[leaf] = _as_config_value(value, current)
    if unknown:
        log.warning("config.json keys unknown to this version, ignored: %s", unknown)
    return config


def read_config(workdir: str) -> Any:
    """:func:`config_from_saved` of ``WORKDIR/config.json``."""
    from maskx_jax.train.layout import CONFIG_FILE

    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return config_from_saved(json.load(f))


def find_workdir(path: str) -> tuple[str, int | None] | None:
    """(workdir, step or None) when ``path`` is a work directory or ``WORKDIR/checkpoints/<step>``."""
    from maskx_jax.train.layout import CHECKPOINT_DIR, CONFIG_FILE

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return path, None
    parent = os.path.dirname(path)
    if (os.path.basename(path).isdigit() and os.path.basename(parent) == CHECKPOINT_DIR
            and os.path.isfile(os.path.join(os.path.dirname(parent), CONFIG_FILE))):
        return os.path.dirname(parent), int(os.path.basename(path))
    return None


CLASS_COUNT_VARIABLE = "roi_heads.box_predictor.cls_score.bias"  # [K+1]: the class count of a detector


def _checkpoint_step(manager: Any, workdir: str, step: int | None) -> int:
    """``step`` if the work directory's checkpoint ``manager`` holds it (default: the latest complete one), else
    FileNotFoundError."""
    from maskx_jax.train.layout import CHECKPOINT_DIR

    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}")
    if step is None:
        return int(max(steps))
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir} (steps: {sorted(steps)})")
    return int(step)


def load_variables(path: str, step: int | None = None, *, verify: bool = True) -> tuple[dict[tuple, np.ndarray], dict]:
    """Every model variable of a work directory's checkpoint, by NNX path, as host arrays: no model, optimiser
    or mesh is built (:func:`maskx_jax.train.checkpointing.restore_variables`).

    Args:
      path: a work directory or ``WORKDIR/checkpoints/<step>``.
      step: the checkpoint to read (default: the one ``path`` names, else the latest).
      verify: check the arrays against the content hashes saved with them (``False``: skipped, logged).
    Returns:
      ({path: array} of the trainable and the fixed variables alike (no optimiser state),
      {"workdir", "step", "mask_mode", "num_classes", "config"} (``config``: the run's saved config)).
    Raises:
      FileNotFoundError: ``path`` is no work directory, or holds no such checkpoint.
      integrity.CorruptCheckpointError: the checkpoint's arrays are not the ones that were saved.
    """
    from maskx_jax.state_utils import name_path
    from maskx_jax.train.checkpointing import make_checkpoint_manager, restore_variables

    found = find_workdir(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a training work directory (config.json + checkpoints/)")
    workdir, path_step = found
    config = read_config(workdir)
    manager = make_checkpoint_manager(workdir, config)
    try:
        step = _checkpoint_step(manager, workdir, path_step if step is None else step)
        named = restore_variables(manager, step, verify=verify)
    finally:
        manager.close()
    flat = {name_path(name): array for name, array in named.items()}
    num_classes = int(named[CLASS_COUNT_VARIABLE].shape[0])
    meta = {"workdir": workdir, "step": int(step), "mask_mode": str(config.model.mask_mode),
            "num_classes": num_classes, "config": config}
    return flat, meta


def load_model(path: str, step: int | None = None, *, config: Any = None, verify: bool = True) -> tuple[Any, dict]:
    """The detector of a work directory's checkpoint, ready for inference (nothing trained or initialised).

    ``config``: build it from this config instead of the run's own (its architecture must match, e.g. another
    ``box_score_thresh``). Returns (``MaskRCNN``, :func:`load_variables`'s meta).
    Raises:
      ValueError: the checkpoint's variables do not fit the model the config builds (each misfit named).
    """
    from maskx_jax.model_builder import build_model
    from maskx_jax.state_utils import abstract_module, from_flat

    flat, meta = load_variables(path, step, verify=verify)
    config = meta["config"] if config is None else config
    abstract = abstract_module(lambda: build_model(config, meta["num_classes"]))
    try:
        model = from_flat(abstract, flat)
    except ValueError as e:
        raise ValueError(f"{meta['workdir']} step {meta['step']}: {e}") from None
    return model, meta
