"""Training checkpoints: the orbax manager, save (with content hashes), restore (checked against the model and
the hashes), and resume from the newest intact checkpoint.
"""
from __future__ import annotations

import logging as logging_std
import os
import time
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from maskx_jax import integrity
from maskx_jax.state_utils import named_leaves
from maskx_jax.train.config_checks import ConfigMismatchError
from maskx_jax.train.layout import CHECKPOINT_DIR, DAMAGED_DIR
from maskx_jax.train.step import TrainState

if TYPE_CHECKING:  # annotations only: the trainer's users import this module beside it
    from maskx_jax.train.trainer import Trainer


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


def _host_arrays(tree: Any) -> dict[str, np.ndarray]:
    """``named_leaves(tree)`` as host arrays. On several hosts a process reads a replicated leaf from its
    own devices' copy (no cross-host fetch); a leaf split over the hosts (``train.shard_params``) is gathered,
    which every process does in the same order (save and restore run on all of them)."""
    def host(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.sharding.is_fully_replicated:
                return np.asarray(leaf.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    return {k: host(leaf) for k, leaf in named_leaves(tree).items()}


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{'params.rpn.head.conv.kernel': shape} for every array leaf."""
    return {k: tuple(leaf.shape) for k, leaf in named_leaves(tree).items()}


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


MODEL_PARTS = ("params", "rest")  # the TrainState fields that hold model variables (the rest is optimiser/counters)


def restore_variables(manager: ocp.CheckpointManager, step: int, *, verify: bool = True) -> dict[str, np.ndarray]:
    """The model variables of checkpoint ``step`` as host NumPy arrays by dotted name
    (``'backbone.body.conv1.kernel'``, trainable and fixed alike), for inference or as another run's start.

    Needs no model, optimiser or mesh: the arrays are read as the checkpoint's metadata describes them. The
    whole checkpoint is read (optimiser state included) so that every recorded content hash is checked, as a
    training restore checks them; whether the variables fit a model is the caller's check
    (:func:`maskx_jax.state_utils.from_flat` names every misfit).

    Raises:
      integrity.CorruptCheckpointError: an array differs from what was saved or cannot be read, named.
    """
    where = os.path.join(str(manager.directory), str(step))
    try:
        from etils import epath

        item = os.path.join(where, "default")
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item))
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        tree = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax re-raises tensorstore's read errors as a bare Exception
        raise integrity.read_error(e, where) from None
    named = named_leaves(tree)
    integrity.check(named, recorded_digests(manager, step) if verify else None, where, verify=verify)
    out = {}
    for name, array in named.items():
        part, _, variable = name.partition(".")
        if part in MODEL_PARTS:
            out[variable] = np.asarray(array)
    return out


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


def restore_intact(manager: ocp.CheckpointManager, trainer: Trainer, workdir: str, config: ml_collections.ConfigDict
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
