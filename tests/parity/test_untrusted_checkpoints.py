"""Checkpoints that do not fit: refused with a readable list of names, never a crash deep inside JAX/orbax.

* a training work directory whose orbax checkpoint was written with another config, through
  ``train.py --mode=eval`` and ``--mode=train``: with its ``config.json`` (a diff of the settings),
  without it (a diff of the saved arrays), and with another dataset's class count (shape diffs);
* ``maskx_jax.checkpoint.load_detector`` on a converted checkpoint whose ``maskx_meta.json``
  describes another architecture than its parameters, or is malformed.

(Malicious torch pickles, torch state dicts with missing / unexpected / mis-shaped keys and the
wrong architecture are covered in ``test_convert.py``.)
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import train_subprocess as TS
import tiny_train_config
from maskx_jax import train_lib

NUM_CLASSES = 11  # the synthetic dataset's 10 shapes + background


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from maskx_jax.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    generate_synthetic(str(root / "synthetic"), 16, 8, 64, 0)
    return str(root)


def _config(data_dir, **model):
    cfg = tiny_train_config.get_config()
    cfg.data.synthetic_dir = os.path.join(data_dir, "synthetic")
    cfg.data.cache_dir = os.path.join(data_dir, "cache")
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def _write_run(workdir, cfg, num_classes=NUM_CLASSES, step=2, with_config=True):
    """A work directory as ``train.py`` leaves it: config.json + an orbax TrainState checkpoint of the real
    detector built from ``cfg`` (zeros: only the structure and shapes matter; nothing is compiled)."""
    trainer = train_lib.Trainer(cfg, num_classes)
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), trainer.abstract_state())
    manager = train_lib.make_checkpoint_manager(str(workdir), cfg)
    train_lib.save_state(manager, state, step)
    manager.wait_until_finished()
    manager.close()
    if with_config:
        train_lib.write_config(str(workdir), cfg)
    return sorted(os.listdir(workdir / "checkpoints"))


def _train_py(workdir, data_dir, mode):
    proc = TS.run(TS.command(str(workdir), f"--mode={mode}", data_dir=data_dir), timeout=180, JAX_LOG_COMPILES="1")
    out = proc.stdout
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out and "Compiling" not in out, out[-4000:]
    return out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_checkpoint_from_another_config_is_refused_with_a_settings_diff(tmp_path, data_dir, mode):
    wd = tmp_path / "run"
    before = _write_run(wd, _config(data_dir, depth=34, aligned=True))
    out = _train_py(wd, data_dir, mode)
    assert "holds a run trained with a different model architecture" in out
    assert "model.depth: 34 (saved) -> 18 (now)" in out
    assert "model.aligned: True (saved) -> False (now)" in out
    assert "data.synthetic_dir" not in out  # only architecture keys are listed
    assert sorted(os.listdir(wd / "checkpoints")) == before
    assert not os.path.exists(wd / "metrics.json")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_checkpoint_without_its_config_is_checked_against_the_model(tmp_path, data_dir, mode):
    """No config.json (e.g. only the checkpoints were copied): the saved arrays are compared with the model."""
    wd = tmp_path / "run"
    before = _write_run(wd, _config(data_dir, depth=34), with_config=False)
    out = _train_py(wd, data_dir, mode)
    assert "does not fit the model built from this config" in out
    assert "in the checkpoint, not in the model (" in out
    assert "params.backbone.body.layer1.2.conv1.kernel" in out  # ResNet-34 has 3 blocks in layer1, ResNet-18 2
    assert "opt_state" not in out.split("in the checkpoint, not in the model")[1].splitlines()[1]  # params first
    assert len(out.splitlines()) < 120, "the diff is summarised, not dumped"
    assert sorted(os.listdir(wd / "checkpoints")) == before


def test_checkpoint_with_another_class_count_lists_the_shapes(tmp_path, data_dir):
    """Same architecture settings (config.json agrees), but trained on a dataset with 5 classes."""
    wd = tmp_path / "run"
    _write_run(wd, _config(data_dir), num_classes=6)
    out = _train_py(wd, data_dir, "eval")
    assert "shape differs" in out
    assert "params.roi_heads.box_predictor.cls_score.kernel: checkpoint (64, 6), model (64, 11)" in out


# --------------------------------------------------------------------------- converted checkpoints


def _detector_checkpoint(directory, **cfg):
    """A converted-detector checkpoint of zeros (shapes from the abstract model; nothing initialised)."""
    from flax import nnx

    from maskx_jax.checkpoint import config_to_json, save_flat
    from maskx_jax.detector import DetectorConfig, MaskRCNN

    c = DetectorConfig(**dict(dict(depth=18, num_classes=5, fpn_channels=32, representation=64,
                                   mask_head_channels=32, transfer_hidden=32), **cfg))
    abstract = nnx.eval_shape(lambda: MaskRCNN(c, rngs=nnx.Rngs(0)))
    flat = {tuple(p): np.zeros(v.shape, v.dtype) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    save_flat(str(directory), flat, {"kind": "detector", "config": config_to_json(c), "source": "test"})
    return str(directory)


def _edit_meta(directory, **config):
    from maskx_jax.checkpoint import META_FILE

    path = os.path.join(directory, META_FILE)
    meta = json.load(open(path))
    meta["config"].update(config)
    json.dump(meta, open(path, "w"))


def test_load_detector_refuses_parameters_of_another_architecture(tmp_path):
    from maskx_jax.checkpoint import load_detector

    d = _detector_checkpoint(tmp_path / "det")
    _edit_meta(d, depth=34)  # the meta says ResNet-34, the parameters are ResNet-18's
    with pytest.raises(ValueError) as err:
        load_detector(d)
    msg = str(err.value)
    assert "do not fit the architecture its maskx_meta.json describes (depth=34, num_classes=5" in msg
    assert "missing: backbone.body.layer1.2.conv1.kernel" in msg
    assert "more missing" in msg and len(msg.splitlines()) < 30  # summarised

    _edit_meta(d, depth=18, num_classes=7)  # the parameters have 5 classes
    with pytest.raises(ValueError) as err:
        load_detector(d)
    msg = str(err.value)
    assert "shape: roi_heads.box_predictor.cls_score.kernel: checkpoint (64, 5), model (64, 7)" in msg
    assert "shape: roi_heads.mask_predictor.mask_fcn_logits.bias: checkpoint (5,), model (7,)" in msg
    assert "missing" not in msg and "unexpected" not in msg

    _edit_meta(d, num_classes=5, mask_mode="transfer")  # extra weight-transfer parameters expected
    with pytest.raises(ValueError, match=r"missing: roi_heads\.weight_transfer\.fc1\.kernel"):
        load_detector(d)


@pytest.mark.parametrize("meta, message", [
    ('{"format": 1, "kind": "detector", "config": {"depth": "eighteen"}}',
     "checkpoint config has values of the wrong type: depth='eighteen' (expected int)"),
    ('{"format": 1, "kind": "detector", "config": {"depth": 18, "backbone": "vit"}}',
     "checkpoint config has keys this version does not know: ['backbone']"),
    ('{"format": 1, "kind": "resnet", "config": {"depth": 18}}', "holds a 'resnet' checkpoint, not a detector"),
    ('{"format": 7, "kind": "detector"}', "checkpoint format 7, this version reads 1"),
    ('{"format": 1, "kind": "detec', "maskx_meta.json is not valid JSON"),
    ('[1, 2]', "maskx_meta.json: expected a JSON object, got list"),
])
def test_load_detector_refuses_a_malformed_meta_file(tmp_path, meta, message):
    from maskx_jax.checkpoint import META_FILE, load_detector

    d = tmp_path / "det"
    d.mkdir()
    (d / META_FILE).write_text(meta)
    with pytest.raises(ValueError) as err:
        load_detector(str(d))
    assert message in str(err.value)
