"""The built-in synthetic dataset: deterministic, COCO-loadable, shape-defined classes, occlusion."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskx_jax.data import synthetic
from maskx_jax.data.synthetic import generate_synthetic, is_complete
from maskx_jax.data.synthetic_shapes import CLASS_NAMES, SHAPES, rasterize

# pycocotools calls numpy.asarray(copy=False) internally (numpy 2 deprecation): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NUM_TRAIN, NUM_VAL, SIZE = 40, 8, 96


def _digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("syn") / "a"), NUM_TRAIN, NUM_VAL, SIZE, seed=3)


def test_deterministic_and_seed_dependent(dataset, tmp_path):
    again = generate_synthetic(str(tmp_path / "b"), NUM_TRAIN, NUM_VAL, SIZE, seed=3)
    first, second = _digest(dataset.root), _digest(again.root)
    assert first == second
    assert len([k for k in first if k.endswith(".png")]) == NUM_TRAIN + NUM_VAL
    other = generate_synthetic(str(tmp_path / "c"), 4, 1, SIZE, seed=4)
    assert _digest(other.root)["images/train/000000.png"] != first["images/train/000000.png"]


def test_idempotent_and_atomic(dataset, tmp_path):
    stamp = os.stat(dataset.train_json).st_mtime_ns
    assert generate_synthetic(dataset.root, NUM_TRAIN, NUM_VAL, SIZE, seed=3) == dataset
    assert os.stat(dataset.train_json).st_mtime_ns == stamp  # not rewritten
    # No temporary folders left next to it.
    assert [d for d in os.listdir(os.path.dirname(dataset.root)) if d.startswith(".")] == []
    # A half-written folder (no meta.json, as a crash before the rename would never leave,
    # but e.g. a manual copy might) is not taken for a dataset: it is replaced.
    half = tmp_path / "half"
    (half / "images" / "train").mkdir(parents=True)
    (half / "train.json").write_text("{}")
    assert not is_complete(str(half), 2, 1, 64, 0)
    paths = generate_synthetic(str(half), 2, 1, 64, seed=0)
    assert is_complete(str(half), 2, 1, 64, 0)
    assert len(json.load(open(paths.train_json))["images"]) == 2
    # Different parameters regenerate.
    paths = generate_synthetic(str(half), 3, 1, 64, seed=0)
    assert len(json.load(open(paths.train_json))["images"]) == 3


def test_loads_through_pycocotools_with_nonempty_masks(dataset):
    coco = COCO(dataset.train_json)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 10
    counts = {img_id: len(coco.getAnnIds(imgIds=img_id)) for img_id in coco.getImgIds()}
    assert min(counts.values()) >= 1 and max(counts.values()) <= 8
    assert np.mean(list(counts.values())) > 3  # cluttered
    for ann in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(ann)
        assert m.shape == (SIZE, SIZE)
        assert m.sum() == ann["area"] > 0
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    seen = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds())}
    assert len(seen) >= 8  # most classes appear even in 40 images


def test_occlusion_present(dataset):
    anns = json.load(open(dataset.train_json))["annotations"]
    fractions = np.array([a["visible_fraction"] for a in anns])
    assert (fractions < 0.95).mean() > 0.1  # a good share is partly hidden
    assert fractions.min() >= 0.4 - 1e-6  # but none beyond recognition


def test_classes_differ_in_shape_not_colour(dataset):
    # Shapes: same placement at each class's typical aspect, pairwise IoU well below 1.
    masks = [rasterize(n, 60, float(np.sqrt(np.prod(SHAPES[n][2]))), 0.2, (48, 48), 96) for n in CLASS_NAMES]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (CLASS_NAMES[i], CLASS_NAMES[j], iou)
    # Colour: a nearest-centroid classifier on the instances' mean colour is near chance.
    from PIL import Image
    coco = COCO(dataset.train_json)
    feats, labels = [], []
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(os.path.join(dataset.train_images, img["file_name"])), np.float32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            feats.append(pixels[coco.annToMask(ann) > 0].mean(0))
            labels.append(ann["category_id"])
    feats, labels = np.array(feats), np.array(labels)
    centroids = {c: feats[labels == c].mean(0) for c in np.unique(labels)}
    keys = np.array(list(centroids))
    pred = keys[np.argmin([[np.linalg.norm(f - centroids[c]) for c in keys] for f in feats], axis=1)]
    assert (pred == labels).mean() < 0.3  # chance is 0.1; shape is what identifies the class


def test_render_scene_is_pure():
    a, inst_a = synthetic.render_scene(7, "val", 5, 64)
    b, inst_b = synthetic.render_scene(7, "val", 5, 64)
    assert np.array_equal(a, b) and len(inst_a) == len(inst_b)
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(inst_a, inst_b))


def test_shapes10_images_are_unchanged_by_variants():
    """shapes10 renders byte for byte what the generator gave before variants existed (the SHA-256 below was
    computed with that earlier code), so datasets already generated stay valid."""
    h = hashlib.sha256()
    for index in range(4):
        image, instances = synthetic.render_scene(0, "train", index, 64)
        h.update(image.tobytes())
        for inst in instances:
            h.update(inst["mask"].tobytes())
    assert h.hexdigest() == "8971eff6a50ead1eaff79294cf891366d7f2e6c5ec8731d6b7ed9dfca4fe4bec"


def test_shapes24_classes_and_camouflage(tmp_path):
    from maskx_jax.data.synthetic_shapes import CLASS_NAMES_24

    spec = synthetic.VARIANTS["shapes24"]
    assert spec.classes == CLASS_NAMES_24 and len(set(CLASS_NAMES_24)) == 24 and CLASS_NAMES_24[:10] == CLASS_NAMES
    masks = [rasterize(n, 60, float(np.sqrt(np.prod(SHAPES[n][2]))), 0.2, (48, 48), 96) for n in CLASS_NAMES_24]
    for i in range(24):
        for j in range(i + 1, 24):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (CLASS_NAMES_24[i], CLASS_NAMES_24[j], iou)
    paths = generate_synthetic(str(tmp_path / "s24"), 40, 4, 128, seed=0, variant="shapes24")
    coco = json.load(open(paths.train_json))
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES_24)
    assert json.load(open(os.path.join(paths.root, "meta.json")))["variant"] == "shapes24"
    counts = np.bincount([len([a for a in coco["annotations"] if a["image_id"] == im["id"]])
                          for im in coco["images"]])
    assert counts[7:].sum() == 0 and counts[2:].sum() == 40  # 2-6 objects per image
    # Camouflage repaints part of the objects with what is behind them and nothing else: the same scene with
    # camouflage off (camouflage draws from a stream of its own) differs only inside the annotated masks.
    plain = dataclasses.replace(spec, camouflage=0.0)
    synthetic.VARIANTS["_plain"] = plain
    try:
        faded = total = 0
        for index in range(6):
            a, inst_a = synthetic.render_scene(0, "train", index, 128, "shapes24")
            b, inst_b = synthetic.render_scene(0, "train", index, 128, "_plain")
            union = np.any([i["mask"] for i in inst_a], axis=0)
            assert [i["category"] for i in inst_a] == [i["category"] for i in inst_b]
            assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(inst_a, inst_b))  # same annotations
            diff = np.abs(a.astype(int) - b.astype(int)).max(-1) > 0
            assert not (diff & ~union).any()
            faded += int(diff.sum())
            total += int(union.sum())
        assert faded > 0.1 * total  # a good share of the object pixels are repainted
    finally:
        del synthetic.VARIANTS["_plain"]
    with pytest.raises(ValueError, match="unknown synthetic dataset variant"):
        generate_synthetic(str(tmp_path / "x"), 1, 1, 64, variant="shapes11")
    assert not os.path.exists(tmp_path / "x")
