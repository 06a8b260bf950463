"""A whole ``train.py`` run (train + evaluate, real toy model) over a COCO folder full of bad records.

The dataset is generated here: the synthetic shapes (real images and masks) plus one record of every
kind of damage issue 5 lists, in the training and the validation file. The run must complete, and the
summary it prints must count each kind and name the records.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
from PIL import Image

import train_subprocess as TS
from maskx_jax.data.synthetic import generate_synthetic
from tests.unit.test_data_coco import huge_png

STEPS, BATCH = 8, 2  # 16 samples: every one of the 13 usable training records is decoded at least once


def _png(path, array):
    Image.fromarray(array).save(path)


def _build_corrupt_coco(root) -> dict:
    """{train_json, train_images, val_json, val_images} of the synthetic data plus bad records."""
    syn = generate_synthetic(str(root / "synthetic"), 6, 4, 64, 0)
    out = {}
    rng = np.random.default_rng(0)
    for split, src_json, src_images in (("train", syn.train_json, syn.train_images),
                                        ("val", syn.val_json, syn.val_images)):
        images = root / f"{split}_images"
        shutil.copytree(src_images, images)
        data = json.load(open(src_json))
        first = data["images"][0]
        good = np.asarray(Image.open(images / first["file_name"]).convert("RGB"))
        next_img, next_ann = 1000, 10000

        def add_image(file_name, height=64, width=64, image_id=None):
            nonlocal next_img
            rec = {"id": image_id if image_id is not None else next_img, "file_name": file_name}
            if height is not None:
                rec.update(height=height, width=width)
            data["images"].append(rec)
            next_img += 1
            return rec["id"]

        def add_ann(image_id, bbox, segmentation=None, category_id=1):
            nonlocal next_ann
            x, y, w, h = bbox
            segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]] if segmentation is None else segmentation
            data["annotations"].append({"id": next_ann, "image_id": image_id, "category_id": category_id,
                                        "bbox": bbox, "segmentation": segmentation, "area": 1.0, "iscrowd": 0})
            next_ann += 1

        box = [16.0, 16.0, 24.0, 24.0]
        buf = io.BytesIO()
        Image.fromarray(good).save(buf, format="JPEG")
        (images / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        (images / "corrupt.jpg").write_bytes(rng.integers(0, 255, 2000, dtype=np.uint8).tobytes())
        _png(images / "gray.png", good[:, :, 1])
        _png(images / "rgba.png", np.concatenate([good, np.full((64, 64, 1), 200, np.uint8)], axis=2))
        _png(images / "gray16.png", good[:, :, 0].astype(np.uint16) * 257)
        _png(images / "noann.png", good)
        _png(images / "damaged_anns.png", good)
        (images / "huge.png").write_bytes(huge_png())
        for name in ("truncated.jpg", "corrupt.jpg", "gray.png", "rgba.png", "gray16.png"):
            add_ann(add_image(name), box)
        add_image("missing.png")  # no file
        add_image("noann.png")  # no annotation at all
        add_ann(add_image("huge.png", 100_000, 100_000), box)  # very large (annotated size)
        add_ann(add_image("huge.png", 64, 64), box)  # very large (the header says so; found when decoding)
        add_ann(add_image(first["file_name"], image_id=first["id"]), box)  # duplicate image id
        damaged = add_image("damaged_anns.png")
        add_ann(damaged, box)  # one good instance
        add_ann(damaged, [10.0, 10.0, 0.0, 12.0])  # zero area
        add_ann(damaged, [10.0, 10.0, -5.0, 12.0])  # negative size
        add_ann(damaged, [80.0, 90.0, 10.0, 10.0])  # outside the image
        add_ann(damaged, [50.0, 50.0, 30.0, 30.0])  # partly outside: clipped
        add_ann(damaged, box, segmentation=[[16.0, 16.0, 40.0, 16.0]])  # polygon with 2 points
        add_ann(damaged, box, segmentation=[])  # empty segmentation
        add_ann(damaged, box, category_id=99)  # unknown category
        add_ann(damaged, [float("nan"), 16.0, 24.0, 24.0])  # non-finite box (json writes NaN; json.load reads it)
        add_ann(damaged, box, segmentation={"size": [10, 10], "counts": [100]})  # RLE of the wrong size
        add_ann(987654, box)  # an image id the file does not have
        data["categories"].append({"id": 2, "name": "square again"})  # a category id given twice
        path = root / f"{split}.json"
        path.write_text(json.dumps(data))
        out[f"{split}_json"], out[f"{split}_images"] = str(path), str(images)
    return out


def _last_report(log: str) -> dict[str, int]:
    """{kind: count} from the last bad-record summary the run printed."""
    start = log.rindex("record problem(s) repaired or skipped")
    counts = {}
    for line in log[start:].splitlines()[1:]:
        m = re.match(r"^  (\w+)\s+(\d+)  ", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
        elif not line.startswith("      e.g. "):
            break
    return counts


def test_training_over_a_corrupt_coco_dataset_completes_with_a_summary(tmp_path):
    paths = _build_corrupt_coco(tmp_path)
    cmd = TS.command(str(tmp_path / "run"), "--config.data.source=coco",
                     *(f"--config.data.{k}={v}" for k, v in paths.items()),
                     f"--config.train.steps={STEPS}", f"--config.train.batch_size={BATCH}",
                     "--config.train.checkpoint_every=4", "--config.eval.batch_size=2", "--config.eval.max_images=0",
                     # decoded in 2 worker processes: what they find must reach the summary, counted once
                     "--config.data.num_workers=2", data_dir=str(tmp_path / "data"))
    proc = TS.run(cmd)
    log = proc.stdout
    (tmp_path / "train.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(STEPS))
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert set(metrics) == {"all", "set_a", "set_b"}
    assert f"step {STEPS}: loss/" in log and "skipped=0" in log

    counts = _last_report(log)  # printed after the evaluation, so validation problems are in
    # Train and validation file each hold one record of every kind (validation images with no
    # annotations are kept: evaluation scores every image).
    expected = {
        "image_missing": 2, "image_duplicate_id": 2, "image_no_annotations": 1,
        "image_too_large": 4,  # 2 per file: from the annotated size, and from the header when decoded
        "image_unreadable": 4,  # truncated JPEG + corrupt bytes
        "image_grayscale": 4,  # gray.png and the 16-bit one
        "image_rgba": 2, "image_16bit": 2,
        "box_degenerate": 2, "box_negative_size": 2, "box_outside_image": 2, "box_clipped": 2,
        "polygon_too_few_points": 2, "segmentation_empty": 4,  # the 2-point polygon leaves none + []
        "unknown_category": 2, "box_invalid": 2, "rle_size_mismatch": 2, "annotation_unknown_image": 2,
        "duplicate_category": 2,
    }
    for kind, n in expected.items():
        assert counts.get(kind) == n, (kind, counts)
    assert set(counts) - set(expected) <= {"too_many_instances"}, counts  # (the synthetic images' own, if any)
    # Each warning names its record.
    for what in ("image_unreadable: train.json image", "(truncated.jpg)", "(corrupt.jpg)", "(missing.png)",
                 "image_too_large: val.json image", "image_duplicate_id", "box_negative_size: train.json ann"):
        assert what in log, what
