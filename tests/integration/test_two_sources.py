"""Two training sources, one vocabulary: masks from data.source, boxes from data.box_source.

The mask source is the built-in synthetic dataset (seed 0); the box source is a COCO JSON built
from the generator with another seed, with "disk" renamed "circle" (mapped back by a class map
file) and its segmentations left in place to show they are never used.
"""
import json

import jax
import numpy as np
import pytest

import train_fixtures as F
from maskx_jax import config as config_lib
from maskx_jax import train_lib
from maskx_jax.data import mixture, pipeline
from maskx_jax.data.synthetic import generate_synthetic
from maskx_jax.data.synthetic_shapes import CLASS_NAMES
from maskx_jax.data.vocab import merge_vocabularies, read_class_map

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BG = ("__background__",)


@pytest.fixture(scope="module")
def box_files(tmp_path_factory):
    """(box-source JSON with 'disk' renamed 'circle', its image folder, class map file)."""
    root = tmp_path_factory.mktemp("boxes")
    paths = generate_synthetic(str(root / "syn"), 12, 0, 64, seed=5)
    with open(paths.train_json) as f:
        coco = json.load(f)
    for c in coco["categories"]:
        if c["name"] == "disk":
            c["name"] = "circle"
    (root / "boxes.json").write_text(json.dumps(coco))
    (root / "map.json").write_text(json.dumps({"circle": "disk"}))
    return str(root / "boxes.json"), paths.train_images, str(root / "map.json")


def _config(root, box_files, **data):
    c = F.tiny_config(root)
    d = c.data
    d.box_source = "coco"
    d.box_source_json, d.box_source_images, d.box_source_class_map = box_files
    d.box_source_fraction = 0.25
    d.mask_supervision = "by_annotation"  # set A = the classes with masks: the mask source's
    d.set_a = ""
    c.train.batch_size = 4
    c.train.steps = 2
    c.train.checkpoint_every = 2
    for k, v in data.items():
        setattr(d, k, v)
    config_lib.validate(c)
    return c


def test_merge_vocabularies_by_name_with_a_map():
    mask = BG + ("person", "Traffic Light", "dog")
    names, lut = merge_vocabularies(mask, BG + ("traffic  light", "puppy", "person"), {"puppy": "dog"})
    assert names == mask and lut.tolist() == [0, 2, 3, 1]
    with pytest.raises(ValueError, match=r"box-source class\(es\) \['puppy', 'kite'\] match no class of data.source"):
        merge_vocabularies(mask, BG + ("puppy", "kite", "dog"))
    with pytest.raises(ValueError, match=r"\['kite -> bird'\] match no class"):
        merge_vocabularies(mask, BG + ("kite",), {"kite": "bird"})
    names, lut = merge_vocabularies(mask, BG + ("kite", "dog", "puppy"), {"puppy": "kite"}, unmatched="add")
    assert names == mask + ("kite",) and lut.tolist() == [0, 4, 3, 4]  # puppy and kite: one new class
    with pytest.raises(ValueError, match=r"names class\(es\) \['cat'\] that the box source does not have"):
        merge_vocabularies(mask, BG + ("dog",), {"cat": "dog"})


def test_class_map_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="box_source_class_map"):
        read_class_map(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('["circle", "disk"]')
    with pytest.raises(ValueError, match="must be a JSON object of strings"):
        read_class_map(str(tmp_path / "bad.json"))


def test_sampling_ratio_is_exact_and_each_source_is_permuted():
    sizes, b, f = (40, 13), 8, 0.3
    steps = 500
    idx = np.concatenate([mixture.mixed_step_indices(0, s, b, sizes, f) for s in range(steps)])
    box = idx >= sizes[0]
    assert box.sum() == int(0.3 * steps * b)  # exact over the whole run ...
    windows = box[: (len(box) // 10) * 10].reshape(-1, 10).sum(1)
    assert (windows == 3).all()  # ... and in every window of 10 samples (0.3 = 3/10)
    mask_seq, box_seq = idx[~box], idx[box] - sizes[0]
    for seq, n in ((mask_seq, sizes[0]), (box_seq, sizes[1])):  # each epoch of a source: a permutation
        for e in range(len(seq) // n):
            assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
    # A pure function of (seed, step); the mask source keeps the single-source order.
    np.testing.assert_array_equal(mixture.mixed_step_indices(0, 7, b, sizes, f), idx[7 * b:8 * b])
    single = np.concatenate([pipeline.global_step_indices(0, s, 1, sizes[0]) for s in range(len(mask_seq))])
    np.testing.assert_array_equal(mask_seq, single)


def test_config_rules(tmp_path, box_files):
    c = _config(str(tmp_path), box_files)
    c.data.box_source_fraction = 1.0
    with pytest.raises(ValueError, match=r"data.box_source_fraction must be in \(0, 1\)"):
        config_lib.validate(c)
    c = _config(str(tmp_path), box_files)
    c.data.box_source = ""
    with pytest.raises(ValueError, match="are set but data.box_source is empty"):
        config_lib.validate(c)


def test_unknown_names_are_an_error_or_new_classes(tmp_path, box_files):
    with pytest.raises(ValueError, match=r"\['circle'\] match no class of data.source"):
        pipeline.load_datasets(_config(str(tmp_path), box_files, box_source_class_map=""))
    info = pipeline.load_datasets(_config(str(tmp_path), box_files, box_source_class_map="",
                                          box_source_unmatched="add"))
    assert info.class_names == BG + CLASS_NAMES + ("circle",)
    assert info.set_b_ids == (11,) and info.unscored_ids == (11,)  # no masks, no validation ground truth


def test_two_sources_merged_classes_mix_and_mask_supervision(tmp_path, box_files):
    config = _config(str(tmp_path), box_files)
    info = pipeline.load_datasets(config)
    assert info.class_names == BG + CLASS_NAMES  # circle -> disk: no new class
    assert info.train_sizes == (16, 12) and info.num_train == 28
    assert info.set_a_ids == tuple(range(1, 11))  # every synthetic class has masks in the mask source
    box_view = info.train.parts[1]
    disk = CLASS_NAMES.index("disk") + 1
    assert box_view.lut[box_view.inner.class_names.index("circle")] == disk
    assert any(i.category == disk for r in range(len(box_view)) for i in box_view.record(r).instances)
    assert info.issues.summary().get("segmentation_empty", 0) == 0

    # Batches: box-source rows never carry a mask, mask-source rows do (all synthetic instances have one).
    steps, b = 8, config.train.batch_size
    from_box = 0
    with pipeline.make_train_iterator(config, info=info) as it:
        for step in range(steps):
            batch = next(it)
            rows = info.train_indices(config.train.seed, step, b) >= info.train_sizes[0]
            from_box += rows.sum()
            assert not batch.gt_has_mask[rows].any() and not batch.gt_masks[rows].any()
            assert batch.gt_valid[rows].any()
            assert (batch.gt_has_mask[~rows] == batch.gt_valid[~rows]).all()
            if step == 0:
                first, first_rows = batch, rows
    assert from_box == steps * b // 4  # box_source_fraction = 1/4

    # The mask loss only sees mask-source instances: noise in the box-source rows' masks changes nothing.
    assert first_rows.any()
    trainer = train_lib.Trainer(config, info.num_classes)

    def step_fn(batch):
        state, m = trainer.train_step(trainer.init_state(), trainer.global_batch(batch))
        return jax.device_get((m["losses"]["loss_mask"], m["total"]))

    loss, total = step_fn(first)
    noisy = first.gt_masks.copy()
    noisy[first_rows] = np.random.default_rng(0).random(noisy[first_rows].shape)
    assert step_fn(first.replace(gt_masks=noisy)) == (loss, total)

    # A few real training steps over both sources.
    result = train_lib.train(config, str(tmp_path / "run"), trainer=trainer, info=info, evaluate_at_end=False,
                             progress=False)
    assert result.step == 2 and result.skipped == 0


def test_detections_of_classes_absent_from_the_ground_truth_are_left_out():
    from maskx_jax.eval import coco_results
    from maskx_jax.types import Detections

    det = Detections(boxes=np.tile(np.array([1.0, 2.0, 9.0, 9.0], np.float32), (1, 3, 1)),
                     scores=np.array([[0.9, 0.8, 0.7]], np.float32), labels=np.array([[1, 3, 2]], np.int32),
                     valid=np.ones((1, 3), bool), masks=np.zeros((1, 3, 28, 28), np.float32))
    args = (det, np.array([5]), np.array([[16, 16]]), np.array([[16, 16]]), {1: 11, 2: 22})
    out = coco_results.detections_to_coco(*args, with_masks=False, unscored_labels=(3,))
    assert [r["category_id"] for r in out] == [11, 22]
    with pytest.raises(ValueError, match=r"labels \[3\] have no COCO category id"):
        coco_results.detections_to_coco(*args, with_masks=False)
