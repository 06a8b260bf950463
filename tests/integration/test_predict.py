"""``python -m maskx_jax.predict``: pictures + COCO results for a converted torchvision checkpoint and
for a training work directory; inputs of every mode and odd sizes; one compile per run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskx_jax import predict, predictor

from tests.resources import ROOT
TESTS = os.path.join(ROOT, "tests")
NUM_CLASSES = 5  # torchvision's count, background included

# pycocotools' RLE decode trips a NumPy 2 DeprecationWarning on every call
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "maskx_jax.predict", "--no-progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _image_dir(path, size=64):
    """RGB, grayscale, RGBA and an odd-sized JPEG, plus one unreadable file."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.zeros((size, size, 3), np.uint8) + np.array([40, 90, 160], np.uint8)
    disk = (yy - size * 0.45) ** 2 + (xx - size * 0.4) ** 2 < (size * 0.25) ** 2
    rgb[disk] = (230, 200, 40)
    rgb = np.clip(rgb + rng.integers(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(os.path.join(path, "a_rgb.png"))
    Image.fromarray(rgb).convert("L").save(os.path.join(path, "b_gray.png"))
    rgba = np.concatenate([rgb, np.full((size, size, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(os.path.join(path, "c_rgba.png"))
    Image.fromarray(np.ascontiguousarray(rgb[:37, :59])).save(os.path.join(path, "d_odd.jpg"))
    with open(os.path.join(path, "e_broken.jpg"), "wb") as f:
        f.write(b"not an image")
    with open(os.path.join(path, "notes.txt"), "w") as f:  # not an image extension: not listed
        f.write("ignored")
    return {"a_rgb": (size, size), "b_gray": (size, size), "c_rgba": (size, size), "d_odd": (37, 59)}


def _check_outputs(out, expected_sizes, num_fg_classes, names=None):
    """PNGs exist and are at least the original size; results.json / images.json are valid COCO."""
    images = json.load(open(os.path.join(out, predict.IMAGES_FILE)))
    by_id = {im["id"]: im for im in images["images"]}
    assert sorted(os.path.splitext(im["picture"])[0] for im in images["images"]) == sorted(expected_sizes)
    for stem, (h, w) in expected_sizes.items():
        pic = np.asarray(Image.open(os.path.join(out, stem + ".png")))
        assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
        assert pic.shape[0] >= h and pic.shape[1] >= w
        # drawn on: small images are upscaled so the short side is >= 384 px, with the aspect ratio
        assert abs(pic.shape[0] / pic.shape[1] - h / w) < 0.05
    assert len(images["categories"]) == num_fg_classes
    if names is not None:
        assert [c["name"] for c in images["categories"]] == list(names)
    results = json.load(open(os.path.join(out, predict.RESULTS_FILE)))
    assert isinstance(results, list) and results, "no detections at all"
    cat_ids = {c["id"] for c in images["categories"]}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        im = by_id[r["image_id"]]
        assert r["category_id"] in cat_ids
        x, y, bw, bh = r["bbox"]
        assert -1e-3 <= x and -1e-3 <= y and bw >= 0 and bh >= 0
        assert x + bw <= im["width"] + 1e-3 and y + bh <= im["height"] + 1e-3
        assert r["segmentation"]["size"] == [im["height"], im["width"]]
        m = mask_utils.decode(dict(r["segmentation"], counts=r["segmentation"]["counts"].encode()))
        assert m.shape == (im["height"], im["width"])
    return results, images


# --------------------------------------------------------------------------- unit


def test_helpers():
    assert predict.parse_pad("800x1344") == (800, 1344) and predict.parse_pad("256") == (256, 256)
    with pytest.raises(Exception):
        predict.parse_pad("100x200")  # not multiples of 32
    assert predictor.derived_pad(800, 1333) == (800, 1344)
    assert predict.image_ids_for(["a/000000397133.jpg", "b/12.png"]) == [397133, 12]
    assert predict.image_ids_for(["a/1.jpg", "b/x.png"]) == [1, 2]
    assert predict.image_ids_for(["a/1.jpg", "b/01.png"]) == [1, 2]  # same integer twice
    assert predict.output_names(["a/x.jpg", "b/x.png", "c/X.gif", "y.jpg"]) == ["x.png", "x_1.png", "X_2.png",
                                                                                "y.png"]
    # every image fits one canvas: torchvision's resize, then shrunk (aspect kept) when too big
    images = [np.zeros((480, 640, 3), np.uint8), np.zeros((640, 480), np.uint8), np.zeros((5, 7, 4), np.uint8)]
    batch, sizes, originals = predict.prepare_images(images, 256, 512, (256, 512), batch_size=4)
    assert batch.shape == (4, 256, 512, 3) and batch.dtype == np.float32
    assert sizes.tolist() == [[256, 341], [256, 192], [256, 358], [256, 512]]
    assert originals.tolist() == [[480, 640], [640, 480], [5, 7], [256, 512]]
    assert not batch[3].any() and not batch[0, :, 341:].any()


def test_class_names_file(tmp_path):
    (tmp_path / "k.txt").write_text("cat\ndog\n\n")
    assert predictor.read_class_names(str(tmp_path / "k.txt"), 3) == ("__background__", "cat", "dog")
    (tmp_path / "k1.txt").write_text("bg\ncat\ndog\n")
    assert predictor.read_class_names(str(tmp_path / "k1.txt"), 3) == ("bg", "cat", "dog")
    with pytest.raises(ValueError, match="2 names"):
        predictor.read_class_names(str(tmp_path / "k.txt"), 5)
    names = predictor.torchvision_coco_names()
    assert len(names) == 91 and names[1] == "person" and names[12] == "N/A" and names[90] == "toothbrush"


# --------------------------------------------------------------------------- converted torchvision checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random torchvision Mask R-CNN R-18-FPN (4 classes) converted with convert.from_torch."""
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from convert import from_torch
    from tests.torch_utils import randomize_batchnorm_

    torch.manual_seed(0)
    model = torchvision.models.detection.MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None),
                                                  num_classes=NUM_CLASSES)
    randomize_batchnorm_(model)
    d = tmp_path_factory.mktemp("converted")
    torch.save(model.state_dict(), d / "maskrcnn_r18.pth")
    out = d / "ckpt"
    assert from_torch.main(["--arch", "maskrcnn_resnet18_fpn", "--checkpoint", str(d / "maskrcnn_r18.pth"),
                            "--output", str(out)]) == 0
    return str(out)


def test_converted_checkpoint_cli(converted, tmp_path):
    expected = _image_dir(tmp_path / "images")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\nfish\n")
    out = tmp_path / "out"
    proc = _cli("--checkpoint", converted, "--images", str(tmp_path / "images"), "--output", str(out),
                "--min-size", "256", "--max-size", "256", "--score-thresh", "0.2", "--class-names",
                str(tmp_path / "names.txt"))
    assert "1 unreadable image(s) skipped" in proc.stderr
    results, images = _check_outputs(str(out), expected, NUM_CLASSES - 1, names=["cat", "dog", "bird", "fish"])
    assert {r["image_id"] for r in results} <= {im["id"] for im in images["images"]}
    assert "wrote 4 picture(s)" in proc.stdout
    # the abstract-then-filled loader holds exactly the checkpoint's arrays
    from maskx_jax.checkpoint import load_flat
    from maskx_jax.state_utils import flat_arrays

    fast, ref = flat_arrays(predictor.load_converted_detector(converted)), load_flat(converted)
    assert fast.keys() == ref.keys()
    for k in ref:
        assert fast[k].dtype == ref[k].dtype and np.array_equal(fast[k], ref[k]), k


def test_converted_checkpoint_without_names_and_errors(converted, tmp_path, capsys):
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), "--images", str(tmp_path),
                         "--output", str(tmp_path / "o")]) == 1
    assert "no image files" in capsys.readouterr().err
    _image_dir(tmp_path / "im")
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), "--images", str(tmp_path / "im"),
                         "--output", str(tmp_path / "o")]) == 1
    assert "neither a converted checkpoint" in capsys.readouterr().err
    p = predictor.load_predictor(converted)  # no config: torchvision's sizes, 'class N' names
    assert (p.min_size, p.max_size, p.pad) == (800, 1333, (800, 1344)) and p.score_thresh == 0.5
    assert p.class_names == ("__background__", "class 1", "class 2", "class 3", "class 4")
    assert p.contiguous_to_cat_id == {1: 1, 2: 2, 3: 3, 4: 4}


# --------------------------------------------------------------------------- training work directory


def _make_workdir(tmp_path):
    """A work directory as train() leaves it (config.json + an orbax checkpoint), without compiling a
    train step: the tiny real detector's initial state saved at step 0."""
    sys.path.insert(0, TESTS)
    import train_fixtures as F
    from maskx_jax import train_lib

    data = str(tmp_path / "data")
    cfg = F.tiny_config(data)
    info = train_lib.load_datasets(cfg)
    wd = str(tmp_path / "wd")
    train_lib.write_config(wd, cfg)
    trainer = train_lib.Trainer(cfg, info.num_classes)
    manager = train_lib.make_checkpoint_manager(wd, cfg)
    state = trainer.init_state()
    train_lib.save_state(manager, state, 0)
    manager.wait_until_finished()
    manager.close()
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nimport train_fixtures as F\n\n\n"
                           f"def get_config():\n    return F.tiny_config({data!r})\n")
    return wd, str(config_file), info, trainer.make_predict_fn(state)


def test_workdir_cli(tmp_path, monkeypatch):
    wd, config_file, info, trainer_predict = _make_workdir(tmp_path)
    expected = _image_dir(tmp_path / "images")
    # the saved config.json; class names and set B from the dataset
    out = tmp_path / "out"
    _cli("--checkpoint", wd, "--images", str(tmp_path / "images"), "--output", str(out), "--score-thresh", "0")
    _check_outputs(str(out), expected, info.num_classes - 1, names=info.class_names[1:])

    # --config + a WORKDIR/checkpoints/<step> path: the config file's sizes, names and set B
    p = predictor.load_predictor(os.path.join(wd, "checkpoints", "0"), config_path=config_file)
    assert p.kind == "workdir" and p.pad == (64, 64) and (p.min_size, p.max_size) == (64, 64)
    assert p.class_names == info.class_names and p.set_b_ids == info.set_b_ids and p.set_b_ids
    assert predictor.load_predictor(wd, config_path=config_file, min_size=96, max_size=128).pad == (96, 128)

    # another architecture in --config is refused with the differing keys named
    bad = tmp_path / "bad_config.py"
    bad.write_text(open(config_file).read() + "\n\n_g = get_config\n\n\ndef get_config():\n    c = _g()\n"
                   "    c.model.fpn_channels = 16\n    return c\n")
    out3 = tmp_path / "out3"
    files = [str(tmp_path / "images" / "a_rgb.png")]
    code = predict.main(["--config", str(bad), "--checkpoint", wd, "--images", *files, "--output", str(out3)])
    assert code == 1 and not (out3 / predict.RESULTS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        predictor.load_predictor(wd, step=7)

    # Predicting reads the weights alone: no trainer (optimiser, training mesh policy) is built, and the
    # detections are bitwise those of the trainer's own predict on the state that was saved.
    from maskx_jax.train import trainer as trainer_lib

    def no_trainer(*args, **kwargs):
        raise AssertionError("predict built a Trainer")

    monkeypatch.setattr(trainer_lib.Trainer, "__init__", no_trainer)
    p = predictor.load_predictor(wd)
    images, sizes, _ = predict.prepare_images([np.asarray(Image.open(tmp_path / "images" / "a_rgb.png"))] * 2,
                                              p.min_size, p.max_size, p.pad)
    ours, theirs = p.predict_fn(images, sizes), trainer_predict(images, sizes)
    assert np.asarray(ours.scores).size and np.asarray(ours.valid).any()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_exif_orientation_is_applied_to_photos(tmp_path):
    """A phone photo stored sideways with EXIF Orientation 6 (rotate 90 degrees clockwise to view) is read the
    way a viewer shows it, as PIL's exif_transpose gives it; training data keeps the stored pixels."""
    from PIL import ImageOps

    from maskx_jax.data.image_io import decode_image
    from maskx_jax.data.issues import Issues

    stored = np.zeros((30, 50, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # a red band on the stored image's left
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    path = str(tmp_path / "sideways.jpg")
    img.save(path, exif=exif.tobytes(), quality=95)
    issues = Issues()
    upright = predict._read(path, issues)
    assert upright.shape == (50, 30, 3)  # rotated: viewers show it 50 tall, 30 wide
    np.testing.assert_array_equal(upright, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
    assert upright[:10, :, 0].mean() > 200 and upright[-10:, :, 0].mean() < 60  # the band is now at the top
    assert issues.summary() == {"image_exif_rotated": 1}
    assert decode_image(path, "x", Issues()).shape == (30, 50, 3)  # as stored (COCO's convention)


def test_config_overrides(converted, tmp_path):
    from maskx_jax import config as config_lib

    c = config_lib.base_config()
    config_lib.apply_overrides(c, [("model.box_score_thresh", "0.3"), ("model.aligned", "true"),
                                   ("data.set_a", "voc"), ("model.anchor_sizes", "((8,), (16,), (32,), (64,), (128,))"),
                                   ("train.steps", "7")])
    assert (c.model.box_score_thresh, c.model.aligned, c.data.set_a, c.train.steps) == (0.3, True, "voc", 7)
    assert c.model.anchor_sizes == ((8,), (16,), (32,), (64,), (128,))
    with pytest.raises(ValueError, match="unknown config key 'model.no_such_key'"):
        config_lib.apply_overrides(c, [("model.no_such_key", "1")])
    with pytest.raises(ValueError, match="expected a int"):
        config_lib.apply_overrides(c, [("train.steps", "1.5")])
    # a converted checkpoint takes its inference settings from the command line; the architecture is its own
    p = predictor.load_predictor(converted, overrides=[("model.detections_per_img", "7")], min_size=64, max_size=64)
    rng = np.random.default_rng(0)
    det = p.predict_fn(rng.normal(size=(1, 64, 64, 3)).astype(np.float32), np.array([[64, 64]], np.int32))
    assert np.asarray(det.boxes).shape == (1, 7, 4)
    with pytest.raises(ValueError, match="inference settings only"):
        predictor.load_predictor(converted, overrides=[("model.fpn_channels", "16")])
    _image_dir(tmp_path / "im")
    assert predict.main(["--checkpoint", converted, "--images", str(tmp_path / "im"), "--output",
                         str(tmp_path / "o"), "--config.model.detections_per_img=3", "--min-size", "64",
                         "--max-size", "64", "--no-progress"]) == 0
    results = json.load(open(tmp_path / "o" / predict.RESULTS_FILE))
    assert max(np.unique([r["image_id"] for r in results], return_counts=True)[1], default=0) <= 3


def test_package_version_and_console_scripts(tmp_path):
    import importlib.metadata as md

    import maskx_jax

    assert maskx_jax.__version__ == md.version("maskx_jax")
    scripts = {e.name: e.value for e in md.entry_points(group="console_scripts") if e.name.startswith("maskx-")}
    assert scripts == {"maskx-train": "maskx_jax.train_cli:run", "maskx-predict": "maskx_jax.predict:main",
                       "maskx-evaluate": "maskx_jax.eval.cli:main",
                       "maskx-convert": "maskx_jax.convert.from_torch:main",
                       "maskx-export": "maskx_jax.convert.to_torch:main",
                       "maskx-transfer-experiment": "maskx_jax.transfer_experiment:main"}
    for name in scripts:  # installed beside python, and each answers --help, from outside the checkout too
        exe = os.path.join(os.path.dirname(sys.executable), name)
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        # absl (maskx-train) exits 1 after printing its usage; argparse exits 0
        assert proc.returncode == (1 if name == "maskx-train" else 0), (name, proc.stderr[-2000:])
        assert "usage" in (proc.stdout + proc.stderr).lower(), (name, proc.stdout[-2000:])
