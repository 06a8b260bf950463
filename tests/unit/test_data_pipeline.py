"""Records -> static-shape Batches: shapes, alignment, flips, exact resume, process slices, set A."""
import dataclasses
import os
import shutil
import threading
import time

import numpy as np
import pytest

from maskx_jax import transform
from maskx_jax.config import base_config
from maskx_jax.data import masks as mask_lib
from maskx_jax.data import pipeline
from maskx_jax.data.classes import COCO_CATEGORIES, parse_set_a
from maskx_jax.data.synthetic import generate_synthetic
from maskx_jax.types import Batch
import resources

# pycocotools calls numpy.asarray(copy=False) internally (numpy 2 deprecation): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FIELDS = [f.name for f in dataclasses.fields(Batch)]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("pipe") / "syn"), 20, 5, 96, seed=1).root


def _config(synth_dir, **data):
    c = base_config()
    c.unlock()
    d = c.data
    d.synthetic_dir = synth_dir
    d.synthetic_num_train, d.synthetic_num_val, d.synthetic_image_size, d.synthetic_seed = 20, 5, 96, 1
    d.min_size, d.max_size, d.pad_height, d.pad_width = 160, 200, 192, 192
    d.max_instances, d.mask_crop_size, d.num_workers, d.prefetch = 10, 28, 0, 2  # worker processes: test_data_workers
    d.cache_dir = os.path.join(synth_dir, "..", "cache")
    for k, v in data.items():
        setattr(d, k, v)
    c.train.batch_size = 6
    c.train.seed = 5
    c.eval.batch_size = 4
    return c


def _batches(config, steps, **kw):
    with pipeline.make_train_iterator(config, **kw) as it:
        return [next(it) for _ in range(steps)]


def _equal(a: Batch, b: Batch) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_shapes_and_dtypes_match_batch_doc(synth_dir):
    c = _config(synth_dir)
    (b,) = _batches(c, 1)
    B, G, S, H, W = 6, 10, 28, 192, 192
    want = {
        "images": ((B, H, W, 3), np.float32), "image_sizes": ((B, 2), np.int32), "gt_boxes": ((B, G, 4), np.float32),
        "gt_classes": ((B, G), np.int32), "gt_valid": ((B, G), np.bool_), "gt_crowd": ((B, G), np.bool_),
        "gt_has_mask": ((B, G), np.bool_), "gt_masks": ((B, G, S, S), np.float32), "image_ids": ((B,), np.int32),
        "original_sizes": ((B, 2), np.int32),
    }
    assert set(want) == set(FIELDS)
    for f, (shape, dtype) in want.items():
        v = getattr(b, f)
        assert isinstance(v, np.ndarray) and v.shape == shape and v.dtype == dtype, (f, v.shape, v.dtype)
    assert b.gt_valid.any() and (b.gt_classes[~b.gt_valid] == 0).all()
    assert ((b.gt_classes[b.gt_valid] >= 1) & (b.gt_classes[b.gt_valid] <= 10)).all()
    assert (b.gt_masks >= 0).all() and (b.gt_masks <= 1).all()
    assert (b.image_sizes == 160).all() and (b.original_sizes == 96).all()
    assert (b.images[:, 160:] == 0).all() and (b.images[:, :, 160:] == 0).all()


def _original(info, image_id):
    rec = next(r for r in info.train.records if r.image_id == image_id)
    i = info.train.records.index(rec)
    return rec, info.train.load(i)


def _resized_mask(mask, h, w):
    """The original binary mask in the resized frame (bilinear, thresholded at 0.5)."""
    return transform.bilinear_resize(mask[:, :, None].astype(np.float32), h, w)[:, :, 0] > 0.5


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _check_alignment(b, info, flipped, min_iou=0.9):
    """Pastes every gt mask crop at its gt box and compares with the resized original mask.

    Instances under 100 original pixels are left out: there the raster noise of the two
    resamplings, not alignment, sets the IoU. A one-pixel offset would cost far more.
    """
    ious = []
    for i in range(b.images.shape[0]):
        rec, ex = _original(info, int(b.image_ids[i]))
        h, w = b.image_sizes[i]
        # The image is torchvision's preprocessing of the original (mirrored if flipped).
        ref = transform.preprocess([ex.image], 160, 200).images[0][:h, :w]
        got = b.images[i, :h, :w]
        np.testing.assert_array_equal(got[:, ::-1] if flipped else got, ref)
        for g in np.nonzero(b.gt_has_mask[i])[0]:
            if ex.masks[g].sum() < 100:  # synthetic: no crowd, so slot g is instance g
                continue
            full = _resized_mask(ex.masks[g], h, w)
            if flipped:
                full = full[:, ::-1]
            ious.append(_iou(mask_lib.paste_crop(b.gt_masks[i, g], b.gt_boxes[i, g], h, w) > 0.5, full))
    assert len(ious) >= 5 and min(ious) > min_iou and np.mean(ious) > 0.95, sorted(ious)[:5]


def test_boxes_and_crops_line_up_with_image(synth_dir):
    c = _config(synth_dir, hflip_prob=0.0, mask_crop_size=56)
    info = pipeline.load_datasets(c)
    (b,) = _batches(c, 1, info=info)
    _check_alignment(b, info, flipped=False)


def test_flip_flips_image_boxes_and_masks_consistently(synth_dir):
    info = pipeline.load_datasets(_config(synth_dir))
    plain = _batches(_config(synth_dir, hflip_prob=0.0, mask_crop_size=56), 2, info=info)[1]
    flipped = _batches(_config(synth_dir, hflip_prob=1.0, mask_crop_size=56), 2, info=info)[1]
    np.testing.assert_array_equal(plain.image_ids, flipped.image_ids)
    for i in range(6):
        h, w = plain.image_sizes[i]
        np.testing.assert_array_equal(flipped.images[i, :h, :w], plain.images[i, :h, :w][:, ::-1])
        v = plain.gt_valid[i]
        pb, fb = plain.gt_boxes[i][v], flipped.gt_boxes[i][v]
        np.testing.assert_allclose(fb[:, [0, 2]], w - pb[:, [2, 0]], atol=1e-4)
        np.testing.assert_allclose(fb[:, [1, 3]], pb[:, [1, 3]])
        np.testing.assert_array_equal(flipped.gt_masks[i], plain.gt_masks[i][:, :, ::-1])
    _check_alignment(flipped, info, flipped=True)


def test_exact_resume_across_epochs(synth_dir):
    c = _config(synth_dir)  # hflip 0.5; 20 images, batch 6: step 3 straddles epochs 0 and 1
    info = pipeline.load_datasets(c)
    from_zero = _batches(c, 6, info=info)
    resumed = _batches(c, 2, info=info, start_step=4)
    assert _equal(from_zero[4], resumed[0]) and _equal(from_zero[5], resumed[1])
    assert not _equal(from_zero[4], from_zero[5])
    # Epochs are permutations: the first 20 samples are the 20 images once each.
    ids = np.concatenate([b.image_ids for b in from_zero])
    assert len(set(ids[:20].tolist())) == 20
    flips = [pipeline.flip_decision(5, s, p, 0.5) for s in range(6) for p in range(6)]
    assert 0 < sum(flips) < len(flips)


def test_process_slices_concatenate_to_global_batch(synth_dir):
    c = _config(synth_dir)
    info = pipeline.load_datasets(c)
    whole = _batches(c, 1, info=info, start_step=2)[0]
    parts = [_batches(c, 1, info=info, start_step=2, process_index=p, process_count=2)[0] for p in range(2)]
    for f in FIELDS:
        np.testing.assert_array_equal(np.concatenate([getattr(p, f) for p in parts]), getattr(whole, f))
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_iterator(c, info=info, process_count=4)


def test_set_a_selects_mask_supervision(synth_dir):
    c = _config(synth_dir, set_a="disk, Square")
    info = pipeline.load_datasets(c)
    assert info.set_a_ids == (1, 2) and info.set_b_ids == tuple(range(3, 11))
    assert info.has_mask_by_class.tolist() == [False, True, True] + [False] * 8
    batches = _batches(c, 3, info=info)
    for b in batches:
        in_a = np.isin(b.gt_classes, [1, 2]) & b.gt_valid
        np.testing.assert_array_equal(b.gt_has_mask, in_a)
        assert (b.gt_masks[~b.gt_has_mask] == 0).all()
        assert (b.gt_masks[b.gt_has_mask].reshape(-1, 28 * 28).max(1) > 0.5).all()
    with pytest.raises(ValueError, match="valid names.*disk"):
        pipeline.load_datasets(_config(synth_dir, set_a="disk,blob"))
    with pytest.raises(ValueError, match="selects no class"):
        pipeline.load_datasets(_config(synth_dir, set_a="voc"))


def test_set_a_presets_on_coco_names():
    names = ("__background__",) + tuple(n for _, n in COCO_CATEGORIES)
    voc = parse_set_a("voc", names)
    assert voc == (1, 2, 3, 4, 5, 6, 7, 9, 15, 16, 17, 18, 19, 20, 40, 57, 58, 59, 61, 63)
    nonvoc = parse_set_a("nonvoc", names)
    assert len(nonvoc) == 60 and not set(voc) & set(nonvoc)
    assert parse_set_a("", names) == parse_set_a("all", names) == tuple(range(1, 81))
    assert parse_set_a("person,dining table", names) == (1, names.index("dining table"))
    with pytest.raises(ValueError, match="unknown class.*'unicorn'"):
        parse_set_a("person,unicorn", names)


def test_eval_batches_in_order_with_padding(synth_dir):
    c = _config(synth_dir)
    info = pipeline.load_datasets(c)
    out = list(pipeline.make_eval_batches(c, info=info))
    assert [len(r) for _, r in out] == [4, 1]
    ids = [r.image_id for _, recs in out for r in recs]
    assert ids == [r.image_id for r in info.val.records]
    last = out[-1][0]
    assert last.image_ids[0] == ids[-1] and (last.image_ids[1:] == -1).all()
    assert not last.gt_valid[1:].any() and (last.images[1:] == 0).all()
    assert (out[0][0].image_ids == ids[:4]).all()
    assert info.val_json.endswith("val.json") and info.val_has_masks
    assert [len(r) for _, r in pipeline.make_eval_batches(c, batch_size=2, max_images=3, info=info)] == [2, 1]


def _all_end(threads, timeout=10.0):
    """The decoding thread ends once the batch it is building is done (grain does not wait for it)."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    return not any(t.is_alive() for t in threads)


def test_background_thread_shuts_down(synth_dir):
    c = _config(synth_dir)
    info = pipeline.load_datasets(c)
    before = set(threading.enumerate())
    it = pipeline.make_train_iterator(c, info=info)
    next(it)
    started = set(threading.enumerate()) - before
    assert started  # decoding ahead on a thread of this process
    it.close()
    assert _all_end(started)
    with pytest.raises(StopIteration):
        next(it)
    before = set(threading.enumerate())
    gen = pipeline.make_eval_batches(c, batch_size=1, info=info)
    next(gen)
    started = set(threading.enumerate()) - before
    gen.close()
    assert _all_end(started)


def test_scaled_down_to_fit_and_too_many_instances(synth_dir):
    c = _config(synth_dir, min_size=800, max_size=1333, pad_height=64, pad_width=96, max_instances=2)
    info = pipeline.load_datasets(c)
    (b,) = _batches(c, 1, info=info)
    assert (b.image_sizes == 64).all()  # 96x96 -> 800x800 by torchvision's rule -> 64x64 to fit
    assert b.images.shape == (6, 64, 96, 3)
    assert (b.gt_boxes[b.gt_valid] <= 64).all()
    assert info.summary().get("too_many_instances", 0) >= 1
    assert "too_many_instances" in info.report()


def test_unreadable_image_is_replaced_deterministically(synth_dir, tmp_path):
    root = tmp_path / "syn"
    shutil.copytree(synth_dir, root)
    victim = root / "images" / "train" / "000003.png"
    victim.write_bytes(victim.read_bytes()[:200])
    c = _config(str(root))
    info = pipeline.load_datasets(c)
    first = _batches(c, 4, info=info)
    again = _batches(c, 4, info=info)
    assert all(_equal(a, b) for a, b in zip(first, again))
    assert info.summary() == {"image_unreadable": 1}
    epoch0 = np.concatenate([b.image_ids for b in first])[:20].tolist()
    assert 4 not in epoch0 and epoch0.count(5) == 2  # image id 4 (file 3) -> the next record, id 5


def test_bad_val_json_is_cleaned_for_evaluation(synth_dir, tmp_path):
    import contextlib
    import io
    import json
    from pycocotools.coco import COCO
    root = tmp_path / "syn"
    shutil.copytree(synth_dir, root)
    val = json.loads((root / "val.json").read_text())
    val["annotations"].append({"id": 999999, "image_id": val["images"][0]["id"], "category_id": 1,
                               "bbox": [1, 1, -4, 3], "segmentation": [[1, 1, 2, 2]], "iscrowd": 0, "area": 1})
    (root / "val.json").write_text(json.dumps(val))
    c = _config(str(root), source="coco", train_json=str(root / "train.json"),
                train_images=str(root / "images" / "train"), val_json=str(root / "val.json"),
                val_images=str(root / "images" / "val"), cache_dir=str(tmp_path / "cache"))
    info = pipeline.load_datasets(c)
    assert info.summary() == {"box_negative_size": 1}
    assert info.val_json.startswith(str(tmp_path / "cache")) and ".clean-" in info.val_json
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(info.val_json)
    assert len(coco.getAnnIds()) == len(val["annotations"]) - 1


def test_minicoco_batch_crowd_slots_and_alignment(tmp_path):
    root = resources.minicoco()
    c = base_config()
    c.unlock()
    d = c.data
    d.source, d.set_a, d.cache_dir = "coco", "person,car", str(tmp_path)
    d.train_json, d.train_images = f"{root}/annotations_train.json", f"{root}/images"
    d.val_json, d.val_images = f"{root}/annotations_val.json", f"{root}/images"
    d.min_size, d.max_size, d.pad_height, d.pad_width, d.max_instances = 320, 512, 512, 512, 40
    d.hflip_prob = 0.0
    c.train.batch_size = 2
    info = pipeline.load_datasets(c)
    assert info.class_names == ("__background__", "person", "car", "airplane")
    assert info.set_a_ids == (1, 2) and info.contiguous_to_cat_id == {1: 1, 2: 2, 3: 3}
    crowd_img = next(r for r in info.train.records if any(i.crowd for i in r.instances))
    idx = info.train.records.index(crowd_img)
    # Find the step that holds this image and check its crowd slot and mask alignment.
    for step in range(15):
        ids = pipeline.global_step_indices(c.train.seed, step, 2, len(info.train))
        if idx in ids:
            break
    (b,) = _batches(c, 1, info=info, start_step=step)
    row = int(np.nonzero(b.image_ids == crowd_img.image_id)[0][0])
    assert b.gt_crowd[row].sum() == sum(i.crowd for i in crowd_img.instances)
    assert not (b.gt_has_mask[row] & b.gt_crowd[row]).any()
    assert not b.gt_has_mask[row][b.gt_classes[row] == 3].any()  # airplane is set B
    ex = info.train.load(idx)
    h, w = b.image_sizes[row]
    order = [k for k, i in enumerate(crowd_img.instances) if not i.crowd] + \
            [k for k, i in enumerate(crowd_img.instances) if i.crowd]
    ious = []
    for g in np.nonzero(b.gt_has_mask[row])[0]:
        if ex.masks[order[g]].sum() < 400:
            continue  # tiny instances: raster noise dominates the IoU
        full = _resized_mask(ex.masks[order[g]], h, w)
        ious.append(_iou(mask_lib.paste_crop(b.gt_masks[row, g], b.gt_boxes[row, g], h, w) > 0.5, full))
    assert ious and min(ious) > 0.9, ious
