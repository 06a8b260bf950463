"""data.mask_supervision=by_annotation: each instance's own annotation decides whether it supervises
the mask loss; set A (for evaluation) is read from the training annotations.

Data: the built-in synthetic generator (16 images, 64x64) with data.synthetic_mask_fraction
'disk:0.5,ring:0,hexagon:0': half of the disks keep their mask, rings and hexagons none.
"""
import json
import os

import jax
import numpy as np
import pytest

import train_fixtures as F
from maskx_jax import config as config_lib
from maskx_jax.eval import coco_eval
from maskx_jax import train_lib
from maskx_jax.data import pipeline
from maskx_jax.data.coco import CocoSource
from maskx_jax.data.partial import keep_masks, parse_mask_fractions
from maskx_jax.data.synthetic_shapes import CLASS_NAMES

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FRACTIONS = "disk:0.5,ring:0,hexagon:0"


def _config(root: str):
    c = F.tiny_config(root)
    c.data.mask_supervision = "by_annotation"
    c.data.set_a = ""
    c.data.synthetic_mask_fraction = FRACTIONS
    c.data.max_instances = 8  # every synthetic instance gets a slot: slot k = annotation k of the image
    c.data.hflip_prob = 0.0
    c.train.batch_size = 4
    c.train.steps = 2
    c.train.checkpoint_every = 2
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("partial"))
    config = _config(root)
    info = pipeline.load_datasets(config)
    with open(info.train.json_path) as f:  # the derived, partially labelled training file
        coco = json.load(f)
    return config, info, coco


def test_segmentation_absent_empty_or_null_is_box_only(tmp_path):
    """The three ways a COCO file says "no mask": silent box-only under by_annotation, a counted
    ``segmentation_empty`` issue otherwise; a malformed segmentation is reported either way."""
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0,
             "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [3, 3, 10, 10], "iscrowd": 0, "segmentation": []},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0, "segmentation": None},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0, "segmentation": [[1, 2]]}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
                                "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    optional = CocoSource(str(path), str(tmp_path), segmentation_optional=True)
    assert optional.num_box_only == 3
    assert optional.issues.summary() == {"polygon_too_few_points": 1, "segmentation_empty": 1}  # annotation 5 only
    ex = optional.load(0)
    assert ex.has_segm.tolist() == [True, False, False, False, False]
    strict = CocoSource(str(path), str(tmp_path))
    assert strict.issues.summary() == {"polygon_too_few_points": 1, "segmentation_empty": 4}
    assert strict.load(0).has_segm.tolist() == [True, False, False, False, False]


def test_mask_fraction_spec_is_checked():
    names = ("__background__",) + CLASS_NAMES
    assert parse_mask_fractions(" Disk:0.5, ring:0 ", names) == {"disk": 0.5, "ring": 0.0}
    with pytest.raises(ValueError, match=r"unknown class 'unicorn'; valid names: \['disk'"):
        parse_mask_fractions("unicorn:0.5", names)
    for bad in ("disk", "disk:1.5", "disk:x", ":0.5"):
        with pytest.raises(ValueError, match="must be 'class name:fraction'"):
            parse_mask_fractions(bad, names)
    coco = {"categories": [{"id": 1, "name": "disk"}],
            "annotations": [{"id": i, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]}
                            for i in range(10)]}
    kept = keep_masks(coco, {"disk": 0.3}, seed=0)
    assert sum("segmentation" in a for a in kept["annotations"]) == 3
    assert kept == keep_masks(coco, {"disk": 0.3}, seed=0)  # deterministic
    assert all("segmentation" in a for a in coco["annotations"])  # the input is not modified


def test_config_rules():
    c = _config("unused")
    c.data.set_a = "disk"
    with pytest.raises(ValueError, match="data.set_a must be empty with data.mask_supervision=by_annotation"):
        config_lib.validate(c)
    c = _config("unused")
    c.data.mask_supervision = "by_class"  # transfer without a set A: only by_annotation may leave it empty
    with pytest.raises(ValueError, match=r"needs a non-empty data.set_a \(or data.mask_supervision=by_annotation\)"):
        config_lib.validate(c)


def test_set_a_from_annotations_and_has_mask_per_instance(setup):
    config, info, coco = setup
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    with_mask = {cats[a["category_id"]] for a in coco["annotations"] if "segmentation" in a}
    disks = [a for a in coco["annotations"] if cats[a["category_id"]] == "disk"]
    assert 0 < sum("segmentation" in a for a in disks) < len(disks)  # disk: partly labelled
    assert round(0.5 * len(disks)) == sum("segmentation" in a for a in disks)
    names = [info.class_names[i] for i in info.set_a_ids]
    assert names == [n for n in CLASS_NAMES if n in with_mask] and "disk" in names
    assert [info.class_names[i] for i in info.set_b_ids] == ["ring", "hexagon"]
    assert info.issues.summary() == {}  # box-only by intent: not a data problem
    assert "set A read from the annotations" in info.report()

    # Every instance's gt_has_mask is its own annotation's: slot k of an image = its k-th annotation.
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    seen = 0
    for batch, records in pipeline.make_eval_batches(config, "train", batch_size=4, info=info):
        for row, rec in enumerate(records):
            anns = by_image[rec.image_id]
            assert batch.gt_valid[row].sum() == len(anns)
            expected = ["segmentation" in a for a in anns]
            assert batch.gt_has_mask[row, :len(anns)].tolist() == expected
            assert not batch.gt_masks[row][~batch.gt_has_mask[row]].any()  # box-only: zero crops
            assert all(batch.gt_masks[row, k].any() for k in np.nonzero(expected)[0])
            seen += 1
    assert seen == info.num_train


def test_mask_loss_counts_exactly_the_annotated_instances_and_eval_splits_sets(setup, tmp_path, monkeypatch):
    config, info, _ = setup
    trainer = train_lib.Trainer(config, info.num_classes)
    with pipeline.make_train_iterator(config, info=info) as it:
        batch = next(it)
    has, valid = batch.gt_has_mask, batch.gt_valid
    assert (valid & ~has).any() and has.any()

    def step(b):
        state, m = trainer.train_step(trainer.init_state(), trainer.global_batch(b))
        return jax.device_get((m["losses"]["loss_mask"], m["total"], state.params))

    loss, total, params = step(batch)
    assert loss > 0
    rng = np.random.default_rng(0)
    scrambled = batch.gt_masks.copy()
    scrambled[~has] = rng.random(scrambled[~has].shape)  # box-only slots (and padding): noise
    loss2, total2, params2 = step(batch.replace(gt_masks=scrambled))
    assert loss2 == loss and total2 == total  # bitwise
    jax.tree.map(np.testing.assert_array_equal, params, params2)  # the gradients did not see them either
    changed = batch.gt_masks.copy()
    changed[has] = 1.0 - changed[has]
    loss3, _, _ = step(batch.replace(gt_masks=changed))
    assert loss3 != loss

    # Training + evaluation: metrics for set A (classes with a mask annotation) and set B (the rest).
    calls = []
    real = coco_eval.coco_evaluate

    def spy(gt, results, set_a_cat_ids, **kw):
        calls.append(sorted(set_a_cat_ids))
        return real(gt, results, set_a_cat_ids, **kw)

    monkeypatch.setattr(coco_eval, "coco_evaluate", spy)
    result = train_lib.train(config, str(tmp_path / "run"), trainer=trainer, info=info, progress=False)
    assert calls == [sorted(info.contiguous_to_cat_id[i] for i in info.set_a_ids)]
    set_b_cat_ids = {info.contiguous_to_cat_id[i] for i in info.set_b_ids}
    assert set_b_cat_ids == {c for c, n in enumerate(CLASS_NAMES, start=1) if n in ("ring", "hexagon")}
    assert result.metrics["set_a"] is not None and result.metrics["set_b"] is not None
    assert set(result.metrics["set_b"]) == {"bbox", "segm"}
    assert os.path.isfile(tmp_path / "run" / train_lib.METRICS_FILE)
