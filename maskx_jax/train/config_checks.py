"""Which settings a work directory may be resumed with, and the checks run before anything compiles.

A checkpoint is resumed (or evaluated) only with the architecture it was trained with: every ``model.*`` key
counts except inference-time, compute-only and training-recipe keys; the data keys that decide the class list
and set A, and ``train.freeze`` (the layout of the saved state), count too. Other differences are logged.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import jax
import ml_collections
from jax.sharding import Mesh

from maskx_jax.config import ON_NONFINITE  # noqa: F401 - re-exported (train_lib's public names)
from maskx_jax.train.layout import CONFIG_FILE

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from maskx_jax.train.trainer import Trainer

# Config keys that fix the meaning or the shapes of the trained parameters: a checkpoint is only
# resumed (or evaluated) with the values it was trained with. Every ``model.*`` key counts except
# these inference-time settings, which may be changed freely at evaluation time.
INFERENCE_ONLY_MODEL_KEYS = frozenset({
    "model.rpn_pre_nms_top_n_test", "model.rpn_post_nms_top_n_test", "model.box_score_thresh",
    "model.box_nms_thresh", "model.detections_per_img",
})
# Model keys that change how a step computes, not what is saved: a run may resume with another value.
COMPUTE_ONLY_MODEL_KEYS = frozenset({"model.dtype", "model.mask_slot_buckets", "model.mask_chunk_slots",
                                     "model.exact_canvas", "model.conv_impl"})
# Model keys that only shape the losses or the initial values (the training recipe): a run may resume with
# another value, and a config.json written before they existed resumes as it is.
TRAINING_ONLY_MODEL_KEYS = frozenset({"model.box_predictor_init", "model.box_reg_beta", "model.binarize_mask_targets"})
# Data keys that decide the class list (num_classes) and which classes have mask supervision.
ARCHITECTURE_DATA_KEYS = frozenset({"data.source", "data.set_a", "data.mask_supervision", "data.synthetic_variant"})
# Train keys that decide which variables are trainable (``TrainState.params``) and which are not
# (``rest``), i.e. the layout of a saved train state; {key: the value an older config.json without it meant}.
STATE_LAYOUT_KEYS = {"train.freeze": ""}
# Architecture keys added after runs were written: {key: the value a config.json without it meant}.
ABSENT_MEANT = {**STATE_LAYOUT_KEYS, "data.synthetic_variant": "shapes10"}


class ConfigMismatchError(ValueError):
    """The work directory was trained with a different model architecture."""


def flat_config(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> {"section.key": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists), as written to ``config.json``."""
    return json.loads(json.dumps(config.to_dict()))


def is_architecture_key(key: str) -> bool:
    return ((key.startswith("model.") and key not in INFERENCE_ONLY_MODEL_KEYS and key not in COMPUTE_ONLY_MODEL_KEYS
             and key not in TRAINING_ONLY_MODEL_KEYS)
            or key in ARCHITECTURE_DATA_KEYS
            or key in STATE_LAYOUT_KEYS)


def config_differences(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """[(dotted key, saved value, current value)] for every key that differs (absent = '<absent>')."""
    a, b = flat_config(saved), flat_config(current)
    missing = "<absent>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def format_differences(diffs: Iterable[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {old!r} (saved) -> {new!r} (now)" for k, old, new in diffs)


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """Compare ``config`` with ``WORKDIR/config.json``; refuse architecture changes.

    Returns the (allowed) differences in the other keys. Raises :class:`ConfigMismatchError`
    with a readable diff when a model-architecture key (see :func:`is_architecture_key`) differs.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    diffs = config_differences(saved, config_to_json_dict(config))
    arch = [d for d in diffs if is_architecture_key(d[0])
            and not (d[0] in ABSENT_MEANT and d[1] == "<absent>" and d[2] == ABSENT_MEANT[d[0]])]
    if arch:
        raise ConfigMismatchError(
            f"{workdir} holds a run trained with a different model architecture; "
            f"refusing to resume or evaluate it.\n"
            f"{format_differences(arch)}\n"
            f"Use a new --workdir, or pass the saved values (see {path}).")
    return diffs


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_to_json_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def check_scaling(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The config against the hardware: the global batch must split evenly over the mesh's devices and the
    processes. (Everything that needs only the config is :func:`maskx_jax.config.validate`'s.)"""
    t = config.train
    errors = []
    if t.batch_size % mesh.size:
        errors.append(f"train.batch_size={t.batch_size} is not divisible by the {mesh.size} devices of the mesh")
    if t.batch_size % jax.process_count():
        errors.append(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes")
    if errors:
        raise ValueError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))


# Keys the host loop reads on every call; everything else is baked into a Trainer's compiled step.
LOOP_ONLY_KEYS = frozenset({"train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                            "train.init_checkpoint", "train.verify_checkpoints"})


def check_trainer_config(trainer: Trainer, config: ml_collections.ConfigDict) -> None:
    """A reused Trainer must have been built from the same config up to loop-only and eval keys."""
    diffs = [d for d in config_differences(config_to_json_dict(trainer.config), config_to_json_dict(config))
             if d[0] not in LOOP_ONLY_KEYS and not d[0].startswith("eval.")]
    if diffs:
        raise ValueError("the given Trainer was compiled for a different config:\n" + format_differences(diffs))
