"""Checkpoints you can trust: damaged bytes are caught, never loaded as weights.

Every kind of file this project writes (converted detector, box-only detector, training checkpoint, PyTorch
export) gets three kinds of damage: 64 bytes inverted in the middle of its largest data file (orbax reads
that back as different numbers, silently, without the hashes), the file cut in half, the file deleted. Each is
refused with the array and the path named, and nothing downstream is written. Resume falls back past a
damaged newest checkpoint and ends bitwise where an uninterrupted run ends; a write that fails stops the run
with a clear error and leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import train_fixtures as F
from maskx_jax import integrity, predict, train_lib
from maskx_jax.checkpoint import META_FILE, load_detector, load_flat, save_detector, save_flat
from maskx_jax.detector import MaskRCNN
from maskx_jax.state_utils import flat_arrays, named_leaves
from maskx_jax.train import checkpointing
from tests.model_utils import tiny_config


def _largest_data_file(root: str) -> str:
    """The biggest file of the arrays' data (OCDBT's ``ocdbt.process_*/d/``; not the root B-tree's ``d/``)."""
    files = [f for f in glob.glob(os.path.join(root, "**", "ocdbt.process_*", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(64):
        data[mid + i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


DAMAGE = {"flipped": _flip, "truncated": _truncate, "missing": os.remove}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted detector (Mask^X with MLP fusion) and a box-only one, each written by save_flat."""
    root = tmp_path_factory.mktemp("integrity")
    model = MaskRCNN(tiny_config(), rngs=nnx.Rngs(0))
    save_detector(str(root / "detector"), model, source="test")
    flat = {p: a for p, a in flat_arrays(model).items() if "mask" not in str(p) and "weight_transfer" not in str(p)}
    meta = json.load(open(root / "detector" / META_FILE))
    save_flat(str(root / "box_detector"), flat, {"kind": "box_detector", "config": meta["config"], "source": "test"})
    return root


def _damaged_copy(src, dst, how: str) -> str:
    shutil.copytree(src, dst)
    DAMAGE[how](_largest_data_file(str(dst)))
    return str(dst)


def test_intact_checkpoints_verify(converted):
    meta = json.load(open(converted / "detector" / META_FILE))
    assert len(meta[integrity.KEY]) == len(load_flat(str(converted / "detector")))
    assert all(d.startswith("sha256:") for d in meta[integrity.KEY].values())
    load_detector(str(converted / "detector"))


@pytest.mark.parametrize("kind", ["detector", "box_detector"])
@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_converted_checkpoint_is_refused(converted, tmp_path, kind, how):
    bad = _damaged_copy(converted / kind, tmp_path / kind, how)
    with pytest.raises(integrity.CorruptCheckpointError) as err:
        load_flat(bad)
    msg = str(err.value)
    assert bad in msg and "damaged" in msg
    # the array is named: the one whose content changed, or the one that could not be read
    names = json.load(open(os.path.join(bad, META_FILE)))[integrity.KEY]
    assert any(name in msg for name in names), msg
    if how == "flipped":  # the read itself succeeds: only the hashes can tell, and skipping them is possible
        assert "content differs" in msg
        assert len(load_flat(bad, verify=False)) == len(names)
    # nothing downstream is written: no predictions, no export
    from convert import to_torch

    out = tmp_path / "export.pth"
    assert to_torch.main(["--checkpoint", bad, "--output", str(out)]) == 1
    assert not out.exists() and not os.path.exists(str(out) + ".json")
    if kind == "detector":
        images = tmp_path / "images"
        images.mkdir()
        from PIL import Image

        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
        assert predict.main(["--checkpoint", bad, "--images", str(images), "--output", str(tmp_path / "pred"),
                             "--no-progress"]) == 1
        assert not (tmp_path / "pred").exists()


def test_skipping_the_check_is_logged_and_legacy_checkpoints_load_with_a_notice(converted, tmp_path, caplog):
    bad = _damaged_copy(converted / "detector", tmp_path / "flipped", "flipped")
    with caplog.at_level(logging.WARNING, logger="maskx_jax.integrity"):
        load_detector(bad, verify=False)
    assert "NOT checked" in caplog.text
    legacy = tmp_path / "legacy"
    shutil.copytree(converted / "detector", legacy)
    meta = json.load(open(legacy / META_FILE))
    del meta[integrity.KEY]  # as written before content hashes existed
    json.dump(meta, open(legacy / META_FILE, "w"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskx_jax.integrity"):
        load_detector(str(legacy))
    assert "loaded unverified" in caplog.text and len(caplog.records) == 1


# --------------------------------------------------------------------------- training checkpoints


class _WithBigArray(F.TinyDetector):
    """The stand-in detector plus one 1 MiB trained array: big arrays live in OCDBT's data files (tiny ones are
    kept inline in its index), where damage to a data file lands."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        super().__init__(num_classes, rngs=rngs)
        self.big = nnx.Param(jax.random.normal(rngs.params(), (256, 1024)) * 0.01)

    def losses(self, batch, rng):
        total, parts = super().losses(batch, rng)
        reg = 1e-3 * jax.numpy.mean(jax.numpy.square(self.big[...]))
        return total + reg, {**parts, "loss_reg": reg}


@pytest.fixture(scope="module")
def trainer():
    return train_lib.Trainer(F.stand_in_config(), F.NUM_CLASSES,
                             model_fn=lambda config, num_classes, seed: _WithBigArray(num_classes, rngs=nnx.Rngs(seed)))


def _train(workdir, trainer, steps):
    cfg = F.stand_in_config(steps=steps)
    return train_lib.train(cfg, str(workdir), trainer=trainer, train_iter_fn=F.make_synthetic_iter(),
                           evaluate_at_end=False, progress=False)


def _bitwise(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _variables(workdir, step):
    manager = train_lib.make_checkpoint_manager(str(workdir), F.stand_in_config())
    try:
        return checkpointing.restore_variables(manager, step)
    finally:
        manager.close()


def _restore(workdir, trainer, step, verify=True):
    manager = train_lib.make_checkpoint_manager(str(workdir), F.stand_in_config())
    try:
        return train_lib.restore_state(manager, trainer, step, verify=verify)
    finally:
        manager.close()


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_training_checkpoint_is_refused_and_resume_falls_back(tmp_path, trainer, how):
    straight = _train(tmp_path / "straight", trainer, 6)
    _train(tmp_path / "run", trainer, 4)  # checkpoints 2 and 4
    DAMAGE[how](_largest_data_file(str(tmp_path / "run" / "checkpoints" / "4")))
    with pytest.raises(integrity.CorruptCheckpointError) as err:
        _restore(tmp_path / "run", trainer, 4)
    msg = str(err.value)
    assert os.path.join("checkpoints", "4") in msg and any(f"{part}." in msg for part in ("params", "opt_state"))
    with pytest.raises(integrity.CorruptCheckpointError, match=os.path.join("checkpoints", "4")):
        _variables(tmp_path / "run", 4)  # the weights-only read (predict, export, init_checkpoint) refuses it too
    # resume: checkpoint 4 is said to be damaged and moved aside, training continues from 2, and ends
    # bitwise where the uninterrupted run ends
    resumed = _train(tmp_path / "run", trainer, 6)
    _bitwise(straight.state, resumed.state)
    moved = os.listdir(tmp_path / "run" / train_lib.DAMAGED_DIR)
    assert len(moved) == 1 and moved[0].startswith("4-")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4", "6"]
    _bitwise(_restore(tmp_path / "straight", trainer, 4), _restore(tmp_path / "run", trainer, 4))
    # the weights-only read gives the restored state's variables, bitwise, by name
    state = _restore(tmp_path / "run", trainer, 6)
    named = named_leaves({"params": state.params, "rest": state.rest})
    variables = _variables(tmp_path / "run", 6)
    assert sorted(variables) == sorted(k.partition(".")[2] for k in named) and "big" in variables
    for name, leaf in named.items():
        np.testing.assert_array_equal(variables[name.partition(".")[2]], np.asarray(leaf))


def test_no_intact_checkpoint_stops_without_training(tmp_path, trainer):
    _train(tmp_path / "run", trainer, 4)
    for step in ("2", "4"):
        _flip(_largest_data_file(str(tmp_path / "run" / "checkpoints" / step)))
    with pytest.raises(integrity.CorruptCheckpointError, match="no intact checkpoint"):
        _train(tmp_path / "run", trainer, 6)
    assert not os.listdir(tmp_path / "run" / "checkpoints")  # both moved aside, nothing new written
    assert len(os.listdir(tmp_path / "run" / train_lib.DAMAGED_DIR)) == 2


def test_checkpoints_without_hashes_restore_with_a_notice(tmp_path, trainer, caplog):
    state = trainer.init_state()
    manager = train_lib.make_checkpoint_manager(str(tmp_path), F.stand_in_config())
    manager.save(0, args=ocp.args.StandardSave(state))  # as written before content hashes existed
    manager.wait_until_finished()
    manager.close()
    with caplog.at_level(logging.WARNING, logger="maskx_jax.integrity"):
        _bitwise(state, _restore(tmp_path, trainer, 0))
    assert "loaded unverified" in caplog.text


def test_a_failed_write_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, trainer, monkeypatch):
    """No space left while checkpoint 4 is written (simulated inside orbax's writer): the run stops with one
    clear error, checkpoint 2 is intact and verifies, and the same command resumes from it once space is back."""
    real = ocp.StandardCheckpointHandler.async_save
    calls = []

    async def full_disk(self, directory, *args, **kwargs):
        calls.append(str(directory))
        if len(calls) == 2:  # the second save: checkpoint 4
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk)
    with pytest.raises(train_lib.CheckpointSaveError) as err:
        _train(tmp_path / "run", trainer, 6)
    msg = str(err.value)
    assert "could not write checkpoint 4" in msg and "No space left on device" in msg
    assert "checkpoint 2 is intact" in msg
    manager = train_lib.make_checkpoint_manager(str(tmp_path / "run"), F.stand_in_config())
    assert manager.all_steps() == [2]
    manager.close()
    straight2 = _train(tmp_path / "straight", trainer, 2)
    _bitwise(straight2.state, _restore(tmp_path / "run", trainer, 2))
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", real)
    resumed = _train(tmp_path / "run", trainer, 6)
    _bitwise(_train(tmp_path / "straight", trainer, 6).state, resumed.state)


# --------------------------------------------------------------------------- exported files


def test_damaged_export_is_refused(converted, tmp_path):
    from convert import to_torch
    from convert.torch_models import load_exported

    out = tmp_path / "model.safetensors"
    assert to_torch.main(["--checkpoint", str(converted / "detector"), "--output", str(out)]) == 0
    load_exported(str(out))
    data = bytearray(open(out, "rb").read())
    for i in range(64):
        data[len(data) // 2 + i] ^= 0xFF  # inside the tensor data: safetensors itself reads it without a word
    open(out, "wb").write(bytes(data))
    with pytest.raises(integrity.CorruptCheckpointError, match="content differs"):
        load_exported(str(out))
