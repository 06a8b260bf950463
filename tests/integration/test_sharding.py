"""Data parallelism: a train step on 8 (fake CPU) devices equals the same step on 1 device.

The device count is fixed when JAX starts, so each side runs in its own subprocess
(``tests/train_fixtures.py`` worker with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
and the saved losses and parameters are compared here. The batch is sharded on the mesh's
``data`` axis and the train state replicated (in the real model's case except Mask^X's MLP-fusion FC,
split over the devices: ``train.shard_params``), so the 8-device step computes per-device partial
gradients that XLA all-reduces; the result may differ from 1 device only by float summation order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.resources import ROOT, TESTS_DIR as HERE  # HERE: train_fixtures.py, the worker script


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def _run_workers(kind: str, steps: int, tmp_path) -> tuple[dict, dict]:
    """Both device counts, concurrently (compilation is mostly single-threaded)."""
    procs = {}
    for n in (1, 8):
        out = tmp_path / f"{kind}_{n}.npz"
        procs[n] = (out, subprocess.Popen([sys.executable, os.path.join(HERE, "train_fixtures.py"), kind, str(out),
                                           str(steps)], env=_env(n), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    results = {}
    for n, (out, p) in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-4000:]
        print(log.strip().splitlines()[-1])
        results[n] = dict(np.load(out))
    assert int(results[1]["devices"]) == 1 and int(results[8]["devices"]) == 8
    return results[1], results[8]


def _compare(one: dict, eight: dict) -> None:
    np.testing.assert_allclose(eight["total"], one["total"], rtol=1e-5)
    for k in one:
        if k.startswith("loss/"):
            np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    params = [k for k in one if k.startswith("param/")]
    assert params and set(params) == {k for k in eight if k.startswith("param/")}
    moved = 0
    for k in params:
        a, b, init = one[k], eight[k], one["init/" + k[len("param/"):]]
        np.testing.assert_array_equal(init, eight["init/" + k[len("param/"):]], err_msg=f"init differs: {k}")
        # the updated parameters, relative to their size plus summation-order noise of the update
        # (a zero-initialised bias *is* its update after one step; its gradient is a sum with
        # cancellation, which XLA:CPU's convolutions give to ~1e-4 relative in another order:
        # 7e-5 measured for the mask-head biases) ...
        du, dv = a - init, b - init
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1e-12) + 2e-4 * np.linalg.norm(du), k
        # ... and the update itself (a wrong gradient reduction, e.g. a sum over devices, fails here)
        if np.linalg.norm(du) > 0:
            moved += 1
            assert np.linalg.norm(du - dv) <= 1e-3 * np.linalg.norm(du), k
    assert moved > len(params) // 2


def test_stand_in_three_steps_8_devices_equal_1(tmp_path):
    _compare(*_run_workers("stand_in", 3, tmp_path))


def test_real_model_step_8_devices_equal_1(tmp_path):
    """Mask^X with MLP fusion; its FC and that FC's momentum split over the 8 devices (train.shard_params)."""
    one, eight = _run_workers("real", 1, tmp_path)
    _compare(one, eight)
    # on 8 devices the FC's kernel and bias (784 = 8 x 98) and their momentum are split, nothing else; on 1
    # device nothing is (a 1-device mesh has nothing to split)
    sharded = [str(k) for k in eight["sharded"]]
    assert len(one["sharded"]) == 0 and all("mask_mlp" in k for k in sharded), sharded
    for part in ("params", "opt_state"):  # kernel and bias, in the parameters and in the momentum
        assert len([k for k in sharded if k.startswith(f".{part}")]) >= 2, sharded


# The toy architecture of train_fixtures.tiny_config as command-line overrides of a shipped config.
TOY_OVERRIDES = {
    "model.fpn_channels": 32, "model.representation": 64, "model.mask_head_channels": 32,
    "model.transfer_hidden": 32, "model.mlp_fusion": False, "model.rpn_pre_nms_top_n_train": 64,
    "model.rpn_post_nms_top_n_train": 32, "model.rpn_pre_nms_top_n_test": 64, "model.rpn_post_nms_top_n_test": 32,
    "model.rpn_batch_size_per_image": 32, "model.roi_batch_size_per_image": 16, "model.max_mask_rois_per_image": 8,
    "model.detections_per_img": 10, "data.synthetic_image_size": 64, "data.synthetic_num_train": 16,
    "data.synthetic_num_val": 8, "data.min_size": 64, "data.max_size": 64, "data.pad_height": 64,
    "data.pad_width": 64, "data.max_instances": 4, "data.mask_crop_size": 14, "data.num_workers": 1,
    "train.batch_size": 8, "train.steps": 2, "train.warmup_steps": 1, "train.log_every": 1,
    "eval.batch_size": 8, "eval.max_images": 8, "eval.num_pictures": 1,
}


def test_train_py_8_devices(tmp_path):
    """``python train.py --config configs/demo_synthetic.py --workdir DIR --config.x=y`` on 8 devices,
    global batch 8: trains, checkpoints, logs, evaluates and draws."""
    wd = tmp_path / "run"
    overrides = dict(TOY_OVERRIDES)
    overrides.update({"data.synthetic_dir": tmp_path / "synthetic", "data.cache_dir": tmp_path / "cache"})
    cmd = [sys.executable, "train.py", "--config", "configs/demo_synthetic.py", "--workdir", str(wd), "--noprogress",
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=400)
    assert p.returncode == 0, p.stdout[-6000:]
    assert "mesh {'data': 8} over 8 devices" in p.stdout
    assert "step 2: loss/loss_box_reg=" in p.stdout
    assert os.path.isdir(wd / "checkpoints" / "2")
    saved = json.load(open(wd / "config.json"))
    assert saved["model"]["fpn_channels"] == 32 and saved["train"]["steps"] == 2
    metrics = json.load(open(wd / "metrics.json"))
    assert set(metrics) == {"all", "set_a", "set_b"} and "segm" in metrics["all"]
    assert len(os.listdir(wd / "pictures")) == 1
    assert os.listdir(wd / "tb")
