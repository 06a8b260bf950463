"""The controlled transfer experiment (``python -m maskx_jax.transfer_experiment``) and ``make demo``, run for
real at toy size: two seeds, the demo's three arms (baseline, Mask^X with MLP fusion, oracle) and one end-to-end
arm, a few steps on tiny images. Checks what the protocol promises: one detector per seed, frozen bitwise in
every arm (so every arm of a seed has the same box AP), each arm's mask branch as configured (every arm's config,
the two arms not trained here included), the results file's layout, and its tables and chart.

The two arms left out of the training (``transfer``, ``random_embedding``) differ from the trained ones only in
their config, which ``test_arm_configs`` checks; their models train in tests/model/test_maskx.py. Training them
here too would cost four more runs (~75 s of the suite's 20 minutes)."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from maskx_jax import transfer_report, workdir as workdir_lib
from maskx_jax.transfer_experiment import ARMS, Protocol, arm_config, base_config, main as experiment_main, \
    run_experiment

# The module fixture trains 10 toy runs (~3 minutes on a quiet 2-core machine) inside the first test's time
# limit; on a shared machine 14 such runs took more than pytest's 900 s, so this file gets twice that.
pytestmark = pytest.mark.timeout(1800)

from tests.resources import ROOT
CONFIG = os.path.join(ROOT, "configs", "transfer_shapes10.py")  # what make demo runs too
# A toy-sized model and data on top of the experiment's config (the schedule comes from the protocol).
TOY = (("model.fpn_channels", 16), ("model.representation", 32), ("model.mask_head_channels", 8),
       ("model.transfer_hidden", 8), ("model.rpn_pre_nms_top_n_train", 100), ("model.rpn_post_nms_top_n_train", 50),
       ("model.rpn_pre_nms_top_n_test", 50), ("model.rpn_post_nms_top_n_test", 30),
       ("model.roi_batch_size_per_image", 32), ("model.max_mask_rois_per_image", 8), ("model.detections_per_img", 10),
       ("data.min_size", 64), ("data.max_size", 64), ("data.pad_height", 64), ("data.pad_width", 64),
       ("data.synthetic_image_size", 64), ("data.synthetic_num_train", 4), ("data.synthetic_num_val", 2),
       ("data.mask_crop_size", 16), ("train.batch_size", 2), ("eval.batch_size", 2), ("eval.num_pictures", 1),
       ("data.num_workers", 0))  # decoding in-process: 14 runs would each start worker processes


# The arms trained by the fixture: make demo's three (the baseline, Mask^X with MLP fusion, the oracle).
TRAINED_ARMS = ("class_agnostic", "transfer_mlp", "oracle")


def _toy(root) -> tuple[tuple[str, object], ...]:
    """TOY, with the data where ``make demo`` puts it for ``--workdir root/runs`` (the demo test reuses the runs)."""
    runs = root / "runs"
    return (("data.synthetic_dir", str(runs / "synthetic_data")), ("data.cache_dir", str(runs / "data_cache"))) + TOY


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    output = root / "transfer.json"
    assert experiment_main(["--config", CONFIG, "--workdir", str(root / "runs"), "--output", str(output),
                            "--chart", str(root / "chart.png"), "--seeds", "0,1", "--arms", ",".join(TRAINED_ARMS),
                            "--detector-steps", "3",
                            "--mask-steps", "2", "--end-to-end", "transfer_mlp", "--no-progress"]
                           + [f"--set={k}={v!r}" for k, v in _toy(root)]) == 0
    return root, json.load(open(output))


def test_every_arm_of_every_seed_is_written(experiment):
    root, results = experiment
    assert results["seeds"] == [0, 1] and results["complete"]
    assert set(results["arms"]) == set(TRAINED_ARMS) and set(results["end_to_end"]) == {"transfer_mlp"}
    for group in (results["arms"], results["end_to_end"], {"detector": results["detector"]}):
        for name, values in group.items():
            for metric in ("set_b_box_ap", "seconds_per_step"):
                assert len(values[metric]) == 2 and all(v is not None for v in values[metric]), (name, metric)
    for arm in TRAINED_ARMS:
        assert all(0 <= v <= 100 for v in results["arms"][arm]["set_b_mask_ap"])
    assert results["protocol"]["detector_steps"] == 3 and results["protocol"]["mask_steps"] == 2
    for seed in (0, 1):
        for run in ("detector", *TRAINED_ARMS, "e2e_transfer_mlp"):
            assert os.path.isfile(root / "runs" / f"seed{seed}" / run / "result.json"), (seed, run)


def test_each_seed_has_one_detector_frozen_in_every_arm(experiment):
    root, results = experiment
    for seed in (0, 1):
        det, meta = workdir_lib.load_variables(str(root / "runs" / f"seed{seed}" / "detector"))
        assert meta["mask_mode"] == "none" and not any("mask" in ".".join(map(str, p)) for p in det)
        for arm in TRAINED_ARMS:
            ours, meta = workdir_lib.load_variables(str(root / "runs" / f"seed{seed}" / arm))
            assert meta["mask_mode"] == ARMS[arm]["model.mask_mode"]
            assert all(np.array_equal(ours[p], a) for p, a in det.items()), (seed, arm)  # bitwise
            report = json.load(open(root / "runs" / f"seed{seed}" / arm / "init_checkpoint_report.json"))
            assert report["kind"] == "workdir" and not report["frozen_not_loaded"]
        # the same detector gives the same detections, whatever the mask branch
        boxes = {results["arms"][a]["set_b_box_ap"][seed] for a in TRAINED_ARMS}
        assert len(boxes) == 1, boxes
    # the seeds differ: two detectors, not one reused
    a, _ = workdir_lib.load_variables(str(root / "runs" / "seed0" / "detector"))
    b, _ = workdir_lib.load_variables(str(root / "runs" / "seed1" / "detector"))
    assert any(not np.array_equal(a[p], b[p]) for p in a)


def test_arm_configs(experiment):
    """Every arm's config as the driver builds it (``arm_config``; the trained arms' saved configs are those)."""
    root, _ = experiment
    detector = str(root / "runs" / "seed0" / "detector")
    base = base_config(Protocol(config_path=CONFIG, seeds=(0,), detector_steps=3, mask_steps=2,
                                overrides=_toy(root)))
    built = {arm: arm_config(base, arm, 0, 2, detector) for arm in ARMS}
    saved = {arm: workdir_lib.read_config(str(root / "runs" / "seed0" / arm)) for arm in TRAINED_ARMS}
    for arm, c in saved.items():
        assert c.to_dict() == built[arm].to_dict(), arm
    assert built["transfer"].model.transfer_input == "cls+box" and not built["transfer"].model.mlp_fusion
    assert built["transfer_mlp"].model.mlp_fusion and built["transfer_mlp"].model.mask_mode == "transfer"
    assert built["random_embedding"].model.transfer_input == "random"
    assert built["class_agnostic"].model.mask_mode == "class_agnostic"
    assert built["oracle"].data.set_a == "all" and built["oracle"].model.mask_mode == "class_specific"
    for arm, c in built.items():
        assert c.train.freeze == "detector" and c.train.init_checkpoint.endswith(os.path.join("seed0", "detector"))
        assert c.train.seed == 0 and c.train.steps == 2
        assert arm == "oracle" or c.data.set_a == base.data.set_a  # the same split, except the ceiling's masks
    # the oracle trains on every class's masks but is scored on the experiment's split, like the others
    metrics = json.load(open(root / "runs" / "seed0" / "oracle" / "metrics.json"))
    assert "set_b" in metrics and metrics["set_b"]


def test_report_tables_and_chart(experiment):
    root, results = experiment
    table = open(root / "transfer.md").read()
    assert table == transfer_report.markdown(results)
    for arm in TRAINED_ARMS:
        assert transfer_report.ARM_TITLES[arm] in table
    assert "End to end" in table and "Headroom (oracle - class-agnostic" in table
    assert Image.open(root / "chart.png").size == (760, 420)


def test_statistics():
    base, arm, ceiling = [10.0, 12.0, 11.0], [12.0, 13.0, 14.0], [15.0, 17.0, 16.0]
    mean, std = transfer_report.mean_std(arm)
    assert mean == 13.0 and std == pytest.approx(1.0)
    diff, se = transfer_report.paired(arm, base)
    d = np.array([2.0, 1.0, 3.0])
    assert diff == pytest.approx(2.0) and se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert transfer_report.gap_share(arm, base, ceiling) == pytest.approx(2.0 / 5.0)
    s = transfer_report.summarize({"seeds": [0, 1, 2], "arms": {
        "class_agnostic": {"set_b_mask_ap": base}, "transfer_mlp": {"set_b_mask_ap": arm},
        "oracle": {"set_b_mask_ap": ceiling}}})
    assert s["arms"]["transfer_mlp"]["gap_share"] == pytest.approx(0.4)
    assert s["arms"]["transfer_mlp"]["vs_baseline"]["t"] == pytest.approx(2.0 / se)
    assert s["headroom"]["mean"] == pytest.approx(5.0)
    assert math.isnan(transfer_report.gap_share(arm, base, base))  # no gap, no share


def test_finished_runs_are_not_run_again(experiment, monkeypatch):
    """A re-run of the same command reads every run's result.json and trains nothing."""
    root, results = experiment
    from maskx_jax import train_lib

    monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    protocol = Protocol(config_path=CONFIG, seeds=(0, 1), detector_steps=3, mask_steps=2, arms=TRAINED_ARMS,
                        end_to_end=("transfer_mlp",), overrides=_toy(root))
    again = run_experiment(protocol, str(root / "runs"), progress=False)
    assert again["arms"] == results["arms"] and again["end_to_end"] == results["end_to_end"]


def test_unknown_arm_is_refused(tmp_path):
    protocol = Protocol(config_path=CONFIG, seeds=(0,), detector_steps=1, mask_steps=1, arms=("agnostic",))
    with pytest.raises(ValueError, match="unknown arms"):
        run_experiment(protocol, str(tmp_path))


def test_finished_runs_with_other_settings_are_refused(experiment):
    root, _ = experiment
    protocol = Protocol(config_path=CONFIG, seeds=(0,), detector_steps=5, mask_steps=2, arms=(), end_to_end=(),
                        overrides=_toy(root))
    with pytest.raises(ValueError, match="finished run with other settings") as err:
        run_experiment(protocol, str(root / "runs"), progress=False)
    assert "train.steps: 3 (saved) -> 5 (now)" in str(err.value)


def test_demo_shows_the_controlled_comparison(experiment, capsys):
    """``make demo`` = the experiment's first seed with three arms; on the toy runs above (same settings, so
    nothing is trained again) it writes its table with one row per arm and points at the pictures."""
    root, results = experiment
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the demo imports configs.transfer_shapes10
    from maskx_jax import demo

    workdir = root / "runs"
    assert demo.main(["--workdir", str(workdir), "--detector-steps", "3", "--mask-steps", "2"]
                     + [f"--set={k}={v!r}" for k, v in TOY]) == 0
    shown = json.load(open(workdir / "results.json"))
    assert set(shown["arms"]) == set(demo.ARMS) and shown["seeds"] == [0] and shown["end_to_end"] == {}
    for arm in demo.ARMS:
        assert shown["arms"][arm]["set_b_mask_ap"] == results["arms"][arm]["set_b_mask_ap"][:1]
    table = open(workdir / "results.md").read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == [demo.TITLES[a] for a in demo.ARMS]
    for arm in demo.ARMS:
        assert str(workdir / "seed0" / arm / "pictures") in table
        assert os.listdir(workdir / "seed0" / arm / "pictures")
    assert demo.MULTI_SEED_TABLE in table and table in capsys.readouterr().out


def test_trained_workdirs_export_to_torchvision(experiment, tmp_path):
    """``python -m convert.to_torch`` on work directories trained here (the seed-0 detector, box-only, and its
    Mask^X + MLP fusion arm): the files are written, load_exported builds the model and loads them strictly, and
    its mask predictor computes the JAX model's logits for every class (full parity:
    tests/parity/test_export_torch.py)."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from convert import to_torch
    from convert.torch_models import load_exported
    from maskx_jax.detector import MaskRCNN
    from maskx_jax.model_builder import detector_config
    from maskx_jax.state_utils import abstract_module, from_flat

    root, _ = experiment
    det_out = tmp_path / "detector.pth"
    assert to_torch.main(["--checkpoint", str(root / "runs" / "seed0" / "detector"), "--output", str(det_out)]) == 0
    assert type(load_exported(str(det_out))).__name__ == "FasterRCNN"
    workdir = root / "runs" / "seed0" / "transfer_mlp"
    out = tmp_path / "maskx.safetensors"
    assert to_torch.main(["--checkpoint", str(workdir / "checkpoints" / "2"), "--output", str(out)]) == 0
    spec = json.load(open(str(out) + ".json"))
    assert spec["kind"] == "detector" and spec["min_size"] == 64 and spec["detector"]["mask_mode"] == "transfer"
    model = load_exported(str(out))
    assert type(model.roi_heads.mask_predictor).__name__ == "MaskXPredictor"
    flat, found = workdir_lib.load_variables(str(workdir))
    cfg = detector_config(workdir_lib.read_config(str(workdir)), found["num_classes"])
    ours = from_flat(abstract_module(lambda: MaskRCNN(cfg, rngs=nnx.Rngs(0))), flat)
    x = np.random.default_rng(0).normal(size=(2, 14, 14, cfg.mask_head_channels)).astype(np.float32)
    with torch.no_grad():
        logits = model.roi_heads.mask_predictor(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    feats = ours.roi_heads.mask_predictor.features(jnp.asarray(x))
    for c in range(1, cfg.num_classes):
        want = np.asarray(ours.mask_logits(feats, jnp.full((2,), c)))
        np.testing.assert_allclose(logits[:, c], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # --step names a checkpoint of the work directory: one it does not hold is an error
    assert to_torch.main(["--checkpoint", str(workdir), "--step", "1", "--output", str(tmp_path / "s1.pth")]) == 1


def test_evaluate_any_checkpoint_reproduces_the_runs_metrics(experiment, tmp_path):
    """``maskx-evaluate`` on a work directory and a COCO JSON gives the metrics the run itself wrote (same model,
    images, split): the set A / set B split comes from the work directory's dataset."""
    from maskx_jax.eval import cli as evaluate_cli

    root, _ = experiment
    workdir = root / "runs" / "seed0" / "transfer_mlp"
    data = root / "runs" / "synthetic_data"
    out = tmp_path / "metrics.json"
    assert evaluate_cli.main(["--checkpoint", str(workdir), "--val-json", str(data / "val.json"), "--val-images",
                              str(data / "images" / "val"), "--batch-size", "2", "--output", str(out),
                              "--no-progress"]) == 0
    got, want = json.load(open(out)), json.load(open(workdir / "metrics.json"))
    assert set(got) == {"all", "set_a", "set_b"}
    for group in got:
        for iou_type in ("bbox", "segm"):
            for k, v in want[group][iou_type].items():
                assert got[group][iou_type][k] == pytest.approx(v, abs=1e-9), (group, iou_type, k)
    # a box-only work directory: box AP only
    det_out = tmp_path / "det.json"
    assert evaluate_cli.main(["--checkpoint", str(root / "runs" / "seed0" / "detector"), "--val-json",
                              str(data / "val.json"), "--val-images", str(data / "images" / "val"), "--output",
                              str(det_out), "--no-progress"]) == 0
    assert set(json.load(open(det_out))["all"]) == {"bbox"}
