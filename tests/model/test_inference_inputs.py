"""Inference on awkward inputs: any size and aspect, grayscale / RGBA / 16-bit / float, no detections.

A toy Mask^X R-CNN (ResNet-18-FPN, random weights) goes through the documented inference path,
``transform.preprocess`` + ``detector.make_predict_fn`` + ``transform.resize_boxes`` +
``paste.paste_masks``, and the evaluation path (``coco_results.detections_to_coco`` /
``coco_evaluate``). One fixed ``pad_to`` means one compiled executable for every input here.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from maskx_jax.eval import coco_eval, coco_results
from maskx_jax.detector import DetectorConfig, MaskRCNN, make_predict_fn
from maskx_jax.paste import paste_masks
from maskx_jax.transform import preprocess, resize_boxes

MIN, MAX, PAD = 64, 128, (128, 128)
DETS = 10


def _image(shape, dtype=np.uint8, seed=0):
    r = np.random.default_rng(seed)
    if dtype == np.uint8:
        return r.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return r.integers(0, 65536, shape, dtype=np.uint16)
    return r.random(shape).astype(dtype)


# name -> image: odd sizes, portrait / landscape, tiny, extreme aspect ratios, every pixel format
IMAGES = {
    "odd_37x91": _image((37, 91, 3)),
    "portrait_120x50": _image((120, 50, 3), seed=1),
    "landscape_50x120": _image((50, 120, 3), seed=2),
    "tiny_5x7": _image((5, 7, 3), seed=3),
    "one_pixel": _image((1, 1, 3), seed=4),
    "aspect_4x600": _image((4, 600, 3), seed=5),  # the short side rounds to 0 with torchvision's rule
    "aspect_600x3": _image((600, 3, 3), seed=6),
    "large_1500x1100": _image((1500, 1100, 3), seed=7),
    "gray_2d": _image((40, 60), seed=8),
    "gray_hw1": _image((60, 40, 1), seed=9),
    "rgba": _image((48, 64, 4), seed=10),
    "gray16": _image((48, 64), np.uint16, seed=11),
    "rgb16": _image((33, 65, 3), np.uint16, seed=12),
    "float01": _image((50, 50, 3), np.float32, seed=13),
    "black": np.zeros((64, 64, 3), np.uint8),
}


@pytest.fixture(scope="module")
def model():
    cfg = DetectorConfig(depth=18, num_classes=5, fpn_channels=32, representation=64, mask_head_channels=32,
                         transfer_hidden=32, mask_mode="transfer", rpn_pre_nms_top_n_test=64,
                         rpn_post_nms_top_n_test=32, detections_per_img=DETS,
                         anchor_sizes=((16,), (32,), (64,), (128,), (256,)))
    # Initialised in one compiled program (eager init runs hundreds of tiny ops).
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MaskRCNN(cfg, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(MaskRCNN(cfg, rngs=nnx.Rngs(0)))[1])()
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def predict(model):
    return make_predict_fn(model)


@pytest.fixture(scope="module")
def batch():
    return preprocess(list(IMAGES.values()), min_size=MIN, max_size=MAX, pad_to=PAD)


def _check(det, batch):
    boxes, scores = np.asarray(det.boxes), np.asarray(det.scores)
    labels, valid, masks = np.asarray(det.labels), np.asarray(det.valid), np.asarray(det.masks)
    n = len(IMAGES)
    assert boxes.shape == (n, DETS, 4) and masks.shape == (n, DETS, 28, 28) and valid.dtype == bool
    for a in (boxes, scores, masks):
        assert np.isfinite(a).all()
    assert ((masks >= 0) & (masks <= 1)).all()
    orig = resize_boxes(boxes, batch.image_sizes, batch.original_sizes)
    for i, name in enumerate(IMAGES):
        h, w = (int(x) for x in batch.original_sizes[i])
        v = valid[i]
        if v.any():
            rh, rw = batch.image_sizes[i]
            b = boxes[i][v]
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= rw + 1e-3).all(), name
            assert (b[:, 1] >= 0).all() and (b[:, 3] <= rh + 1e-3).all(), name
            assert ((scores[i][v] > 0.05) & (scores[i][v] <= 1)).all()
            assert ((labels[i][v] >= 1) & (labels[i][v] < 5)).all()
            assert (orig[i][v][:, 2] <= w * (1 + 1e-5)).all() and (orig[i][v][:, 3] <= h * (1 + 1e-5)).all(), name
        pasted = np.asarray(paste_masks(masks[i][v], orig[i][v], h, w)) > 0.5  # zero detections: [0, h, w]
        assert pasted.shape == (int(v.sum()), h, w), name


def test_preprocess_any_input(batch):
    assert batch.images.shape == (len(IMAGES), *PAD, 3) and np.isfinite(batch.images).all()
    assert [tuple(s) for s in batch.original_sizes] == [im.shape[:2] for im in IMAGES.values()]
    assert (batch.image_sizes >= 1).all() and (batch.image_sizes[:, 0] <= PAD[0]).all()
    assert (batch.image_sizes[:, 1] <= PAD[1]).all()
    names = list(IMAGES)
    assert tuple(batch.image_sizes[names.index("aspect_4x600")]) == (1, 128)  # clamped to one row, not 0
    # 16-bit input equals its 8-bit reduction (as the data pipeline decodes 16-bit PNGs)
    g16 = IMAGES["gray16"]
    as8 = np.clip(np.round(g16 / 257.0), 0, 255).astype(np.uint8)
    ref = preprocess([as8], min_size=MIN, max_size=MAX, pad_to=PAD)
    np.testing.assert_array_equal(batch.images[names.index("gray16")], ref.images[0])
    # grayscale = the same value in all three channels, before normalisation
    rgb = np.repeat(IMAGES["gray_2d"][:, :, None], 3, axis=2)
    np.testing.assert_array_equal(batch.images[names.index("gray_2d")],
                                  preprocess([rgb], min_size=MIN, max_size=MAX, pad_to=PAD).images[0])
    rgb = preprocess([IMAGES["rgba"][:, :, :3]], min_size=MIN, max_size=MAX, pad_to=PAD)
    np.testing.assert_array_equal(batch.images[names.index("rgba")], rgb.images[0])
    for bad in (np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.int64)):
        with pytest.raises((ValueError, TypeError)):
            preprocess([bad], min_size=MIN, max_size=MAX, pad_to=PAD)


def test_predict_any_input(predict, batch):
    det = jax.device_get(predict(batch.images, batch.image_sizes))
    _check(det, batch)
    assert np.asarray(det.valid).any(axis=1).sum() >= len(IMAGES) // 2  # random weights: most images detect
    assert len(predict.traced_shapes) == 1  # one executable for all sizes


def test_no_detections_handled(model, predict, batch, tmp_path):
    """Background wins everywhere (the classifier's background bias raised): nothing is detected,
    every output stays finite, pasting and COCO evaluation handle the empty result."""
    _, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # a copy: the module-scoped model stays as it is
    bias = state["roi_heads"]["box_predictor"]["cls_score"]["bias"]
    bias[...] = bias[...].at[0].set(100.0)
    assert float(model.roi_heads.box_predictor.cls_score.bias[0]) != 100.0
    det = jax.device_get(predict.jitted(state, batch.images, batch.image_sizes))  # same executable
    assert len(predict.traced_shapes) == 1
    assert not np.asarray(det.valid).any()
    _check(det, batch)
    # The evaluation's binary pasting and the picture writer with nothing to draw.
    from maskx_jax import visualize

    empty = np.zeros((0, 4), np.float32)
    assert coco_results.paste_binary_masks(np.zeros((0, 28, 28), np.float32), empty, 37, 91).shape == (37, 91, 0)
    picture = visualize.draw_detections(IMAGES["odd_37x91"], empty, np.zeros((0,), np.int32), np.zeros((0,)),
                                        np.zeros((0, 37, 91), bool), class_names=["bg", "a", "b", "c", "d"])
    assert picture.ndim == 3 and picture.dtype == np.uint8

    # Evaluation of an all-empty result: COCO results are empty, AP is 0 (or -1 where nothing to score).
    from maskx_jax.data.synthetic import generate_synthetic

    paths = generate_synthetic(str(tmp_path / "syn"), 2, len(IMAGES), 64, 0)
    gt = coco_eval.load_coco(paths.val_json)
    ids = np.asarray(sorted(gt.getImgIds())[: len(IMAGES)])
    sizes = np.asarray([[gt.imgs[int(i)]["height"], gt.imgs[int(i)]["width"]] for i in ids])
    cats = {k + 1: c for k, c in enumerate(sorted(gt.getCatIds())[:4])}
    results = coco_results.detections_to_coco(det, ids, batch.image_sizes, sizes, cats, with_masks=True)
    assert results == []
    metrics = coco_eval.coco_evaluate(gt, results, [cats[1], cats[2]], verbose=False)
    for group in ("all", "set_a", "set_b"):
        for iou in ("bbox", "segm"):
            assert all(v in (0.0, -1.0) for v in metrics[group][iou].values()), (group, iou, metrics[group][iou])
