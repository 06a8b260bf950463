"""Training and evaluation driver: mesh and shardings, the jitted train step, checkpoints, logging.

Layout of a work directory::

    WORKDIR/config.json        the config of the run that created it (checked on every resume)
    WORKDIR/checkpoints/N/     orbax checkpoint of the TrainState after N completed steps
    WORKDIR/tb/                TensorBoard event files (every loss, lr, grad norm, images/s; prediction
                               images every ``eval.tb_images_every`` steps)
    WORKDIR/init_checkpoint_report.json   what ``train.init_checkpoint`` loaded, by name
    WORKDIR/metrics.json       COCO AP (all / set A / set B) of the final evaluation
    WORKDIR/pictures/          prediction PNGs (``eval.num_pictures``)

Determinism and resumption. The batch of step ``s`` is a pure function of ``(data seed, s)``
(``data.pipeline.make_train_iterator(start_step=s)``) and the step's randomness is
``fold_in(PRNGKey(train.seed), s)`` with ``s`` read from the train state, so a run interrupted
at any point and re-run with the same command restarts from its latest complete checkpoint and
continues exactly as if never stopped.

Scaling. One :class:`jax.sharding.Mesh` with a ``data`` axis over every device of every process;
batches are sharded on their leading axis, the train state is replicated (an ``fsdp`` axis would
only change :meth:`Trainer.state_shardings`). Each process loads its own ``1/process_count`` slice
of the global batch and :func:`jax.make_array_from_process_local_data` assembles the global array.
Multi-process runs call :func:`jax.distributed.initialize` when the environment asks for it, see
:func:`maybe_initialize_distributed`.

Non-finite losses. The step checks the total loss and the gradient norm; when either is not
finite the update is dropped inside the step (parameters and optimiser state stay as they were),
and ``train.on_nonfinite`` decides what the host does: ``'stop'`` ends the run with
:class:`NonFiniteLossError` naming the step (no checkpoint is written after it, so the last good
checkpoint stays the latest), ``'skip'`` counts the skip, logs it and goes on.
"""
from __future__ import annotations

import dataclasses
import json
import logging as logging_std
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskx_jax import integrity
from maskx_jax.optim import (is_frozen, make_optimizer, make_schedule, parse_freeze, skipped_losses,
                            trainable_filter)
from maskx_jax.state_utils import variable_path
from maskx_jax.types import Batch, Detections

Array = jax.Array
ModelFn = Callable[[ml_collections.ConfigDict, int, int], nnx.Module]

DATA_AXIS = "data"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # checkpoints that failed verification on resume, moved aside
TB_DIR = "tb"
METRICS_FILE = "metrics.json"
PICTURES_DIR = "pictures"
INIT_REPORT_FILE = "init_checkpoint_report.json"
ON_NONFINITE = ("stop", "skip")

# Config keys that fix the meaning or the shapes of the trained parameters: a checkpoint is only
# resumed (or evaluated) with the values it was trained with. Every ``model.*`` key counts except
# these inference-time settings, which may be changed freely at evaluation time.
INFERENCE_ONLY_MODEL_KEYS = frozenset({
    "model.rpn_pre_nms_top_n_test", "model.rpn_post_nms_top_n_test", "model.box_score_thresh",
    "model.box_nms_thresh", "model.detections_per_img",
})
# Model keys that change how a step computes, not what is saved: a run may resume with another value.
COMPUTE_ONLY_MODEL_KEYS = frozenset({"model.dtype", "model.mask_slot_buckets"})
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


class NonFiniteLossError(RuntimeError):
    """The loss was not finite at ``step`` and ``train.on_nonfinite='stop'``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class ConfigMismatchError(ValueError):
    """The work directory was trained with a different model architecture."""


class InitCheckpointError(ConfigMismatchError):
    """``train.init_checkpoint`` leaves variables that ``train.freeze`` keeps fixed at their random initialisation."""


# --------------------------------------------------------------------------- environment


def maybe_initialize_distributed() -> bool:
    """Call :func:`jax.distributed.initialize` when the environment says this is a multi-process run.

    The environment variable ``MASKX_DISTRIBUTED`` decides when set: ``1``/``true`` always
    initialises, ``0``/``false`` never does. When it is unset, initialisation happens if one of
    these is present: ``JAX_COORDINATOR_ADDRESS`` (plain multi-process launch; also set
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which are passed on), a SLURM job step with
    more than one task (``SLURM_STEP_ID`` and ``SLURM_NTASKS`` > 1), or Open MPI with more than
    one rank (``OMPI_COMM_WORLD_SIZE`` > 1). JAX then detects the coordinator, the process count
    and the process id itself (SLURM, Open MPI, Cloud TPU, Kubernetes). Must run before anything
    touches a device. Returns whether it initialised.
    """
    env = os.environ
    flag = env.get("MASKX_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    auto = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
            or ("SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1)
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
    if flag not in ("1", "true", "yes", "on") and not auto:
        return False
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


class _DropLibraryInfo(logging_std.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); warnings pass."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname.replace(os.sep, "/")


def quiet_library_logs() -> None:
    """Keep the console readable: library INFO logs (orbax) are dropped, this module's are kept."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
        handler.addFilter(_DropLibraryInfo())


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


# --------------------------------------------------------------------------- config checks


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
    """The global batch must split evenly over devices and processes; on_nonfinite must be known."""
    t = config.train
    errors = []
    if t.batch_size % mesh.size:
        errors.append(f"train.batch_size={t.batch_size} is not divisible by the {mesh.size} devices of the mesh")
    if t.batch_size % jax.process_count():
        errors.append(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes")
    if t.on_nonfinite not in ON_NONFINITE:
        errors.append(f"train.on_nonfinite must be one of {ON_NONFINITE}, got {t.on_nonfinite!r}")
    if t.checkpoint_every < 1 or t.log_every < 1:
        errors.append("train.checkpoint_every and train.log_every must be >= 1")
    if errors:
        raise ValueError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))


# Keys the host loop reads on every call; everything else is baked into a Trainer's compiled step.
LOOP_ONLY_KEYS = frozenset({"train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                            "train.init_checkpoint", "train.verify_checkpoints"})


def check_trainer_config(trainer: "Trainer", config: ml_collections.ConfigDict) -> None:
    """A reused Trainer must have been built from the same config up to loop-only and eval keys."""
    diffs = [d for d in config_differences(config_to_json_dict(trainer.config), config_to_json_dict(config))
             if d[0] not in LOOP_ONLY_KEYS and not d[0].startswith("eval.")]
    if diffs:
        raise ValueError("the given Trainer was compiled for a different config:\n" + format_differences(diffs))


# --------------------------------------------------------------------------- train state


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, checkpointed as a whole.

    step:      int32 scalar, the number of completed steps (the next step's index).
    params:    ``nnx.State`` of the trainable ``nnx.Param`` variables (what the optimiser sees): every
               ``nnx.Param`` outside the ``train.freeze`` parts (see ``optim.trainable_filter``).
    opt_state: optax state of ``params`` (nothing for frozen variables: they are not in ``params``).
    rest:      ``nnx.State`` of every other variable (FrozenBN buffers, ``model.freeze_at`` stages, the
               ``train.freeze`` parts), never updated and never differentiated.
    skipped:   int32 scalar, steps whose update was dropped for a non-finite loss (``on_nonfinite='skip'``).
    halted_at: int32 scalar, the first non-finite step under ``on_nonfinite='stop'`` (-1 if none); once
               set, no later step changes params or opt_state.
    """

    step: Array
    params: Any
    opt_state: Any
    rest: Any
    skipped: Array
    halted_at: Array


def _tree_select(pred: Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    seed: int, on_nonfinite: str, skip_losses: tuple[str, ...] = ()
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The pure train step ``(state, batch) -> (state, metrics)``.

    ``skip_losses``: loss groups the model does not compute (``MaskRCNN.losses(skip=...)``; see
    ``optim.skipped_losses``: the losses of frozen parts).

    metrics: ``losses`` {name: scalar} as returned by ``model.losses``, ``total``, ``lr`` (of this
    step), ``grad_norm`` (global L2 norm of the gradients), ``nonfinite`` (bool: this step's update
    was dropped), ``skipped`` (running count) and ``step`` (this step's index).
    """
    stop_mode = on_nonfinite == "stop"

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.rest)
            if skip_losses:
                return model.losses(batch, rng, skip=skip_losses)
            return model.losses(batch, rng)

        (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        apply = finite & (state.halted_at < 0) if stop_mode else finite
        halted_at = state.halted_at
        skipped = state.skipped
        if stop_mode:
            halted_at = jnp.where(~finite & (halted_at < 0), state.step, halted_at)
        else:
            skipped = skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=_tree_select(apply, new_params, state.params),
            opt_state=_tree_select(apply, new_opt_state, state.opt_state),
            skipped=skipped,
            halted_at=halted_at,
        )
        metrics = {
            "losses": losses,
            "total": total,
            "lr": schedule(state.step),
            "grad_norm": grad_norm,
            "nonfinite": ~finite,
            "skipped": skipped,
            "step": state.step,
        }
        return new_state, metrics

    return train_step


def _default_model_fn(config: ml_collections.ConfigDict, num_classes: int, seed: int) -> nnx.Module:
    from maskx_jax.model_builder import build_model

    return build_model(config, num_classes, seed=seed)


def _path_name(path: tuple) -> str:
    return ".".join(map(str, path))


class Trainer:
    """The compiled pieces of one experiment on one mesh: init, train step and predict.

    Args:
      config: the full config (``model``, ``train`` sections are read).
      num_classes: number of classes including the background.
      model_fn: ``(config, num_classes, seed) -> nnx.Module`` with ``losses(batch, rng)`` and
        ``predict(images, image_sizes)``; defaults to ``model_builder.build_model``.
      mesh: defaults to :func:`create_mesh` over every device.
    """

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, *, model_fn: ModelFn | None = None,
                 mesh: Mesh | None = None):
        self.config = config
        self.num_classes = num_classes
        self.model_fn = model_fn or _default_model_fn
        self.mesh = mesh or create_mesh()
        check_scaling(config, self.mesh)
        t = config.train
        self.freeze = str(t.get("freeze", ""))
        self.verify_checkpoints = bool(t.get("verify_checkpoints", True))
        self.tx = make_optimizer(t)
        self.schedule = make_schedule(t)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

        graphdefs = []

        def init() -> TrainState:
            model = self.model_fn(config, num_classes, int(t.seed))
            # Frozen parts go to ``rest``: the step differentiates only ``params``, so JAX computes no
            # backward pass into them and the optimiser holds no state (and applies no decay) for them.
            graphdef, params, rest = nnx.split(model, trainable_filter(self.freeze), ...)
            graphdefs.append(graphdef)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), rest=rest,
                              skipped=jnp.zeros((), jnp.int32), halted_at=jnp.full((), -1, jnp.int32))

        # Trace once without computing anything: shapes for the shardings and the graph definition.
        shapes = jax.eval_shape(init)
        self.graphdef = graphdefs[-1]
        self.state_shardings = self._state_shardings(shapes)
        self._abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings)
        # Parameters are created directly with their sharding (no host copy, no device-0 detour).
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        self.skip_losses = skipped_losses(self.freeze)
        step_fn = make_train_step(self.graphdef, self.tx, self.schedule, int(t.seed), t.on_nonfinite,
                                  self.skip_losses)
        self.train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

        graphdef = self.graphdef

        def predict(params, rest, images, image_sizes) -> Detections:
            return nnx.merge(graphdef, params, rest).predict(images, image_sizes)

        self._predict = jax.jit(predict)

    def _state_shardings(self, shapes: TrainState) -> TrainState:
        """Everything replicated; the place to add an ``fsdp`` axis (shard large params and their opt state)."""
        return jax.tree.map(lambda _: self.replicated, shapes)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        return self._abstract_state

    def init_state(self) -> TrainState:
        return self._init()

    def global_batch(self, local: Batch) -> Batch:
        """Process-local NumPy batch (``batch_size / process_count`` images) -> global sharded arrays."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), local)

    def param_count(self, state: TrainState) -> tuple[int, int]:
        """(trainable, frozen) scalar counts."""
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
        return count(state.params), count(state.rest)

    # ----------------------------------------------------------------------- init checkpoint

    def load_init_checkpoint(self, state: TrainState, directory: str) -> tuple[TrainState, dict]:
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
            flat, found = workdir_lib.load_variables(directory, verify=self.verify_checkpoints)
            kind = "workdir"
            source = f"{found['workdir']} step {found['step']} (mask_mode={found['mask_mode']})"
        else:
            meta = read_meta(directory)
            kind = meta.get("kind")
            if kind not in ("detector", "box_detector", "resnet"):
                raise ValueError(f"{directory}: unknown checkpoint kind {kind!r} "
                                 f"(expected 'detector', 'box_detector' or 'resnet')")
            prefix = ("backbone", "body") if kind == "resnet" else ()
            flat = {prefix + tuple(p): a for p, a in load_flat(directory, verify=self.verify_checkpoints).items()}
            source = meta.get("source", "")
        report = {"checkpoint": os.path.abspath(directory), "kind": kind, "source": source,
                  "loaded": [], "not_loaded": [], "unused": [], "shape_mismatch": [], "frozen_not_loaded": []}
        used = set()
        frozen_groups = parse_freeze(self.freeze)

        def not_loaded(path: tuple, name: str) -> None:
            report["not_loaded"].append(name)
            if is_frozen(path, frozen_groups):
                report["frozen_not_loaded"].append(name)

        def fill(key_path, leaf):
            path = variable_path(key_path)
            name = _path_name(path)
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
        report["unused"] = sorted(_path_name(p) for p in flat if p not in used)
        # A fresh optimiser state: momentum buffers start at zero for the loaded values too.
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        return state.replace(params=params, rest=rest, opt_state=opt_state), report

    # ----------------------------------------------------------------------- inference

    def make_predict_fn(self, state: TrainState) -> Callable[[Any, Any], Detections]:
        """``(images [B, H, W, 3], image_sizes [B, 2]) -> host NumPy Detections`` with ``state``'s weights.

        Every process passes the *whole* evaluation batch; it is sharded over the mesh when B divides
        evenly, replicated otherwise, and every process gets the whole result back.
        """
        params, rest = state.params, state.rest
        warned = []

        def predict(images, image_sizes) -> Detections:
            images = np.asarray(images, np.float32)
            image_sizes = np.asarray(image_sizes, np.int32)
            sharding = self.batch_sharding if images.shape[0] % self.mesh.size == 0 else self.replicated
            if sharding is self.replicated and self.mesh.size > 1 and not warned:
                warned.append(True)
                logging.warning("eval batch of %d images does not split over %d devices: every device runs the whole "
                                "batch (set eval.batch_size to a multiple of the device count)", images.shape[0],
                                self.mesh.size)
            put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
            det = self._predict(params, rest, put(images), put(image_sizes))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                return multihost_utils.process_allgather(det, tiled=True)
            return jax.device_get(det)

        return predict


# --------------------------------------------------------------------------- checkpoints


def make_checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, *,
                            cleanup_tmp: bool = False) -> ocp.CheckpointManager:
    """Orbax manager over ``WORKDIR/checkpoints``.

    A save goes to ``N.orbax-checkpoint-tmp`` and is renamed to ``N`` only once complete, so a
    process killed mid-save leaves that temporary directory behind, which the manager never
    lists as a step (it is removed when step N is saved again). ``cleanup_tmp`` also deletes
    such leftovers when the manager opens: :func:`train` asks for it; evaluation does not, as it
    may run while a training process is writing a checkpoint.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=int(config.train.keep_checkpoints), create=True,
                                           enable_async_checkpointing=True, cleanup_tmp_directories=cleanup_tmp)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options)


def _named_leaves(tree: Any) -> dict[str, Any]:
    """{'params.rpn.head.conv.kernel': leaf} for every array leaf (attribute, dict and list keys alike)."""
    def name(k) -> str:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape"):
            key = ".".join(name(k) for k in path)
            out[key[:-len(".value")] if key.endswith(".value") else key] = leaf
    return out


def _host_arrays(tree: Any) -> dict[str, np.ndarray]:
    """``_named_leaves`` of ``tree`` as host arrays. The train state is replicated: on several hosts a process
    holds the whole value of every leaf in its own devices' copy, which is what it reads (no cross-host fetch)."""
    def host(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(jax.device_get(leaf))

    return {k: host(leaf) for k, leaf in _named_leaves(tree).items()}


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{'params.rpn.head.conv.kernel': shape} for every array leaf."""
    return {k: tuple(leaf.shape) for k, leaf in _named_leaves(tree).items()}


def check_checkpoint_fits(manager: ocp.CheckpointManager, trainer: Trainer, step: int, max_lines: int = 15) -> None:
    """Compare checkpoint ``step``'s saved arrays (orbax metadata, no data read) with the state ``trainer``
    builds; raise :class:`ConfigMismatchError` listing missing / unexpected variables and shape differences.

    Catches a checkpoint from another config even without ``config.json`` (copied checkpoints, another
    dataset's class count), where orbax would fail deep inside the restore with a dump of both trees.
    """
    path = os.path.join(str(manager.directory), str(step), "default")
    try:
        from etils import epath

        saved = _leaf_shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(path)))
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the restore itself will report it
        logging.warning("could not read the metadata of %s (%s); restoring without checking it first", path, e)
        return
    want = _leaf_shapes(trainer.abstract_state())

    def listed(title: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = [f"    ... and {len(items) - max_lines} more"] if len(items) > max_lines else []
        return [f"  {title} ({len(items)}):"] + [f"    {i}" for i in items[:max_lines]] + more

    order = lambda k: (not k.startswith(("params.", "rest.")), k)  # the variables before their optimiser state
    missing = sorted(set(want) - set(saved), key=order)
    unexpected = sorted(set(saved) - set(want), key=order)
    shapes = [f"{k}: checkpoint {saved[k]}, model {want[k]}" for k in sorted(set(want) & set(saved), key=order)
              if saved[k] != want[k]]
    if missing or unexpected or shapes:
        raise ConfigMismatchError(
            f"the checkpoint {path} does not fit the model built from this config ({len(saved)} arrays saved, "
            f"{len(want)} expected); refusing to restore it.\n"
            + "\n".join(listed("in the model, not in the checkpoint", missing)
                        + listed("in the checkpoint, not in the model", unexpected)
                        + listed("shape differs", shapes))
            + "\nIt was written with another model config or dataset (class count): use its config, "
              "or a new --workdir.")


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (no space left, no permission, ...); the previous checkpoints are untouched."""


def recorded_digests(manager: ocp.CheckpointManager, step: int) -> dict[str, str] | None:
    """The content hashes saved with checkpoint ``step`` (None: written before hashes were recorded)."""
    absl_logger = logging_std.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging_std.ERROR)  # orbax warns that it cannot restore items it was not asked to
    try:
        custom = manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 - unreadable metadata: nothing recorded to check against
        custom = {}
    finally:
        absl_logger.setLevel(level)
    return custom.get(integrity.KEY)


def restore_state(manager: ocp.CheckpointManager, trainer: Trainer, step: int | None = None, *,
                  verify: bool = True) -> TrainState:
    """Checkpoint ``step`` (default the latest), checked against the model first and against its recorded
    content hashes after reading, before anything uses it.

    Raises:
      ConfigMismatchError: the checkpoint was written for another model.
      integrity.CorruptCheckpointError: an array differs from what was saved or cannot be read, named.
    """
    step = manager.latest_step() if step is None else step
    check_checkpoint_fits(manager, trainer, step)
    where = os.path.join(str(manager.directory), str(step))
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(trainer.abstract_state()))
    except Exception as e:  # noqa: BLE001 - orbax re-raises tensorstore's read errors as a bare Exception
        raise integrity.read_error(e, where) from None
    if verify:
        integrity.check(_host_arrays(state), recorded_digests(manager, step), where)
    else:
        integrity.check({}, None, where, verify=False)
    return state


def save_state(manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
    """Save ``state`` as checkpoint ``step``, with every array's content hash in the same atomic write (the
    loop's one save call: tests replace it to inject faults).

    Raises:
      CheckpointSaveError: the write failed; the checkpoints saved before it are intact.
    """
    digests = integrity.digests(_host_arrays(state))
    try:
        manager.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata={integrity.KEY: digests})
        # The save returns once the arrays are on the host; the next step may then donate (overwrite)
        # their device buffers. On CPU the "host copy" can alias the device buffer, so wait there.
        if jax.default_backend() == "cpu":
            manager.wait_until_finished()
    except OSError as e:
        previous = [s for s in manager.all_steps() if s != step]
        kept = f"checkpoint {max(previous)} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"could not write checkpoint {step} to {manager.directory}: {e}. Nothing of it is used; {kept}. "
            f"Free space or fix the folder's permissions, then run the same command again to resume.") from e


# --------------------------------------------------------------------------- logging


class _Logger:
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


# --------------------------------------------------------------------------- train


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    trainer: Trainer
    step: int
    skipped: int
    metrics: dict | None  # evaluation metrics, when evaluated
    preempted: bool = False  # stopped early by SIGTERM / a preemption notice, after saving a checkpoint
    seconds_per_step: float | None = None  # mean wall time of this call's steps after the first (None: < 2 run)


def load_datasets(config: ml_collections.ConfigDict):
    """``data.pipeline.load_datasets`` (imported lazily: the data stack is not needed to build a Trainer)."""
    from maskx_jax.data.pipeline import load_datasets as load

    info = load(config)
    logging.info("%s", info.report())
    return info


def _default_train_iter(info) -> Callable[..., Iterator[Batch]]:
    from maskx_jax.data.pipeline import make_train_iterator

    def make(config, *, start_step, process_index, process_count) -> Iterator[Batch]:
        return make_train_iterator(config, start_step=start_step, process_index=process_index,
                                   process_count=process_count, info=info)

    return make


def train(config: ml_collections.ConfigDict, workdir: str, *, trainer: Trainer | None = None,
          model_fn: ModelFn | None = None, num_classes: int | None = None,
          train_iter_fn: Callable[..., Iterator[Batch]] | None = None, evaluate_at_end: bool = True,
          progress: bool = True, info: Any = None) -> TrainResult:
    """Train for ``train.steps`` steps in ``workdir``, resuming from its latest checkpoint if any.

    Args:
      config: the full, validated config.
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
    if trainer is None:
        if num_classes is None:
            num_classes = int(info.num_classes)
        trainer = Trainer(config, num_classes, model_fn=model_fn)
    else:
        check_scaling(config, trainer.mesh)
        check_trainer_config(trainer, config)

    if latest is not None:
        manager, state, latest = _restore_intact(manager, trainer, workdir, config)
        logging.info("resumed from %s at step %d", os.path.join(workdir, CHECKPOINT_DIR, str(latest)), latest)
    else:
        state = trainer.init_state()
        if t.init_checkpoint:
            state, report = trainer.load_init_checkpoint(state, t.init_checkpoint)
            _log_init_report(workdir, report)
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
    iter_fn = train_iter_fn or _default_train_iter(info)
    logger = _Logger(workdir, min(start, total), total, int(t.batch_size), int(t.log_every), progress)
    skipped = int(jax.device_get(state.skipped))
    preempted = False
    watch = _TerminationWatch(manager)
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


def _restore_intact(manager: ocp.CheckpointManager, trainer: Trainer, workdir: str, config: ml_collections.ConfigDict
                    ) -> tuple[ocp.CheckpointManager, TrainState, int]:
    """The newest checkpoint that verifies, newest first; each damaged one is said, and moved to
    ``WORKDIR/damaged_checkpoints/`` (kept for inspection, out of the way of the steps that will be saved
    again). Returns the (reopened) manager, the state and its step.

    Raises:
      integrity.CorruptCheckpointError: no checkpoint is intact (training never continues from a damaged one).
    """
    verify = bool(config.train.get("verify_checkpoints", True))
    moved = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager, restore_state(manager, trainer, step, verify=verify), step
        except integrity.CorruptCheckpointError as e:
            logging.error("%s", e)
            target = os.path.join(workdir, DAMAGED_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.rename(os.path.join(str(manager.directory), str(step)), target)
            if jax.process_count() > 1:  # every process sees the move before it lists the steps again
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"maskx_jax moved damaged checkpoint {step}")
            moved.append(target)
            logging.warning("checkpoint %d is damaged: moved to %s; trying the one before it", step, target)
            manager.close()
            manager = make_checkpoint_manager(workdir, config, cleanup_tmp=True)
    raise integrity.CorruptCheckpointError(
        f"no intact checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}: every one was damaged (moved to "
        f"{', '.join(moved)}). Training does not continue from a damaged state; start again in a new work "
        f"directory (or from train.init_checkpoint).")


def _train_loop(trainer: Trainer, state: TrainState, batches: Iterator[Batch], start: int, total: int,
                manager: ocp.CheckpointManager, logger: _Logger, watch: "_TerminationWatch",
                t: ml_collections.ConfigDict, on_step: Callable[[int, TrainState], None] | None = None
                ) -> tuple[TrainState, int, bool]:
    """Steps ``start .. total-1``. Metrics are read one step late, so the host never stalls the device.

    ``on_step(completed_steps, state)`` runs after every step (e.g. :func:`make_tb_images_hook`).
    Returns (state, skipped steps, whether a termination request stopped the loop early).
    """
    skipped = 0
    pending = None  # device metrics of the step before the one in flight

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

    for step in range(start, total):
        local = next(batches)
        if step == start:  # which slice of the global batch this process loads (one line per run)
            logging.info("process %d of %d loads images %s of step %d's global batch", jax.process_index(),
                         jax.process_count(), [int(i) for i in np.asarray(local.image_ids).reshape(-1)], step)
        batch = trainer.global_batch(local)
        state, metrics = trainer.train_step(state, batch)
        if pending is not None:
            handle(pending)
        pending = metrics
        done = step + 1
        if on_step is not None:
            on_step(done, state)
        stop = watch.requested(done)
        if done % int(t.checkpoint_every) == 0 or done == total or stop:
            handle(pending)  # know this step's outcome before saving it
            pending = None
            save_state(manager, state, done)
        if stop and done < total:
            return state, skipped, True
    if pending is not None:
        handle(pending)
    return state, skipped, False


class _TerminationWatch:
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


def _log_init_report(workdir: str, report: dict) -> None:
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


# --------------------------------------------------------------------------- evaluate


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, trainer: Trainer | None = None,
             state: TrainState | None = None, step: int | None = None, progress: bool = True,
             info: Any = None) -> dict | None:
    """COCO evaluation of ``state`` (default: the latest checkpoint in ``workdir``) on the validation set.

    Writes ``WORKDIR/metrics.json`` (AP for all / set A / set B, see :mod:`maskx_jax.evaluate`),
    ``eval.num_pictures`` prediction PNGs to ``WORKDIR/pictures`` and the APs to TensorBoard at
    ``step``. ``eval.max_images`` limits the images. Every process must call this (the forward
    pass is one program over the whole mesh); only process 0 writes. Returns the metrics
    (``None`` when the data has no validation set).
    """
    from maskx_jax import evaluate as evaluate_lib
    from maskx_jax.data import pipeline

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
    metrics = evaluate_lib.evaluate_model(
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
    from maskx_jax import visualize
    from maskx_jax.evaluate import paste_binary_masks
    from maskx_jax.transform import resize_boxes

    out = []
    for row, record in enumerate(records):
        example = info.val.load(record.index, info.has_mask_by_class)
        if example is None:
            continue
        keep = np.flatnonzero(np.asarray(det.valid[row]) & (np.asarray(det.scores[row]) >= thresh))
        height, width = example.image.shape[:2]
        boxes = resize_boxes(np.asarray(det.boxes[row])[keep], batch.image_sizes[row], (height, width))
        masks = None
        if info.val_has_masks and det.masks is not None:
            masks = paste_binary_masks(np.asarray(det.masks[row], np.float32)[keep], boxes, height, width)
            masks = np.transpose(masks, (2, 0, 1)).astype(bool)
        picture = visualize.draw_detections(
            example.image, boxes, np.asarray(det.labels[row])[keep], np.asarray(det.scores[row])[keep], masks,
            class_names=info.class_names, set_b_ids=info.set_b_ids)
        out.append((record, picture))
    return out


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
