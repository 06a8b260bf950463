"""Reading a training work directory (``train.py --workdir``): its config, its checkpoints, its weights.

Layout (written by ``train_lib``)::

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
    from maskx_jax.train_lib import flat_config

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
    from maskx_jax.train_lib import CONFIG_FILE

    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return config_from_saved(json.load(f))


def find_workdir(path: str) -> tuple[str, int | None] | None:
    """(workdir, step or None) when ``path`` is a work directory or ``WORKDIR/checkpoints/<step>``."""
    from maskx_jax.train_lib import CHECKPOINT_DIR, CONFIG_FILE

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return path, None
    parent = os.path.dirname(path)
    if (os.path.basename(path).isdigit() and os.path.basename(parent) == CHECKPOINT_DIR
            and os.path.isfile(os.path.join(os.path.dirname(parent), CONFIG_FILE))):
        return os.path.dirname(parent), int(os.path.basename(path))
    return None


def num_classes_in_checkpoint(step_dir: str) -> int:
    """K+1 from the saved box classifier's bias shape (no arrays are read)."""
    import orbax.checkpoint as ocp

    absl_logger = logging_std.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging_std.ERROR)  # orbax warns about a per-item metadata file it does not need
    try:
        meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "default"))
    finally:
        absl_logger.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)
    # Trainable, or frozen with the detector (train.freeze): then it is saved with the other fixed variables.
    part = "params" if "box_predictor" in (tree["params"].get("roi_heads") or {}) else "rest"
    node = tree[part]["roi_heads"]["box_predictor"]["cls_score"]["bias"]
    node = node.get("value", node) if isinstance(node, Mapping) else node
    return int(node.shape[0])


def load_variables(path: str, step: int | None = None, *, verify: bool = True) -> tuple[dict[tuple, np.ndarray], dict]:
    """Every model variable of a work directory's checkpoint, by NNX path, as host arrays.

    Args:
      path: a work directory or ``WORKDIR/checkpoints/<step>``.
      step: the checkpoint to read (default: the one ``path`` names, else the latest).
      verify: check the arrays against the content hashes saved with them (``False``: skipped, logged).
    Returns:
      ({path: array} of the trainable and the fixed variables alike (no optimiser state),
      {"workdir", "step", "mask_mode", "num_classes"}).
    Raises:
      FileNotFoundError: ``path`` is no work directory, or holds no such checkpoint.
    """
    import jax

    from maskx_jax import train_lib
    from maskx_jax.state_utils import variable_path

    found = find_workdir(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a training work directory (config.json + checkpoints/)")
    workdir, path_step = found
    step = path_step if step is None else step
    config = read_config(workdir)
    manager = train_lib.make_checkpoint_manager(workdir, config)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, train_lib.CHECKPOINT_DIR)}")
        if step is None:
            step = manager.latest_step()
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {workdir} (steps: {sorted(steps)})")
        num_classes = num_classes_in_checkpoint(os.path.join(workdir, train_lib.CHECKPOINT_DIR, str(step)))
        trainer = train_lib.Trainer(config, num_classes)
        state = train_lib.restore_state(manager, trainer, step, verify=verify)
    finally:
        manager.close()
    flat: dict[tuple, np.ndarray] = {}
    for tree in (state.params, state.rest):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        for key_path, leaf in leaves:
            flat[variable_path(key_path)] = np.asarray(jax.device_get(leaf))
    meta = {"workdir": workdir, "step": int(step), "mask_mode": str(config.model.mask_mode),
            "num_classes": int(num_classes)}
    return flat, meta
