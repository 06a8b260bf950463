"""maskx_jax.eval (COCO results, COCOeval, the model loop) on the real minicoco val split: perfect detections
score ~1, degraded ones less."""
from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest

from maskx_jax import paste
from maskx_jax.eval import coco_eval, coco_results
from maskx_jax.eval.run import evaluate_model
from maskx_jax.types import Detections
import resources

GT_JSON = os.path.join(resources.MINICOCO, "annotations_val.json")
# pycocotools' own decode trips NumPy 2's __array__(copy=...) deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PERSON, CAR, AIRPLANE = 1, 2, 3
SET_A = [PERSON]
MIN_SIZE = 320  # the "resized input frame" of the fake detector
D = 48  # detection slots per image (more than any val image has instances)
M = 28


@pytest.fixture(scope="module")
def coco():
    """The minicoco validation set: tests that use it skip on a machine without it, and fail under CI."""
    resources.minicoco()
    return coco_eval.load_coco(GT_JSON)


def _crop_resample(mask: np.ndarray, box_xyxy: np.ndarray, size: int) -> np.ndarray:
    """Binary [H, W] mask -> [size, size] float crop of its box (2x2 bilinear samples per
    bin, pixel centres at +0.5): the target a mask head learns, cf. torchvision's
    project_masks_on_boxes."""
    h, w = mask.shape
    x1, y1, x2, y2 = box_xyxy
    offs = (np.arange(size * 2) + 0.5) / (size * 2)
    xs = x1 + offs * (x2 - x1) - 0.5
    ys = y1 + offs * (y2 - y1) - 0.5

    def axis(coords, n):
        c = np.clip(coords, 0, n - 1)
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, c - i0

    x0, x1i, fx = axis(xs, w)
    y0, y1i, fy = axis(ys, h)
    m = mask.astype(np.float32)
    rows = m[:, x0] * (1 - fx) + m[:, x1i] * fx
    samples = rows[y0] * (1 - fy)[:, None] + rows[y1i] * fy[:, None]
    return samples.reshape(size, 2, size, 2).mean(axis=(1, 3))


def _perfect_batch(coco, mask_size=M, drop_cats=(), shift=0.0):
    """Detections equal to the gt (non-crowd) instances of every val image, in a resized frame."""
    img_ids = sorted(coco.getImgIds())
    b = len(img_ids)
    boxes = np.zeros((b, D, 4), np.float32)
    scores = np.zeros((b, D), np.float32)
    labels = np.ones((b, D), np.int32)
    valid = np.zeros((b, D), bool)
    masks = np.zeros((b, D, mask_size, mask_size), np.float32)
    image_sizes = np.zeros((b, 2), np.int32)
    original_sizes = np.zeros((b, 2), np.int32)
    for i, img_id in enumerate(img_ids):
        info = coco.imgs[img_id]
        h, w = info["height"], info["width"]
        scale = MIN_SIZE / min(h, w)
        rh, rw = int(math.floor(h * scale)), int(math.floor(w * scale))
        original_sizes[i] = (h, w)
        image_sizes[i] = (rh, rw)
        anns = [a for a in coco.imgToAnns[img_id] if not a["iscrowd"] and a["category_id"] not in drop_cats]
        assert len(anns) <= D
        for j, ann in enumerate(anns):
            x, y, bw, bh = ann["bbox"]
            box = np.array([x, y, x + bw, y + bh], np.float32)
            masks[i, j] = _crop_resample(coco.annToMask(ann), box, mask_size)
            box += np.float32(shift * bw) * np.array([1, 0, 1, 0], np.float32)  # the mask moves with it
            boxes[i, j] = box * np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
            labels[i, j] = ann["category_id"]  # contiguous == COCO ids here (1, 2, 3)
            # A score per annotation (not per slot), so dropping some detections leaves the
            # ranking of the others, hence their AP, unchanged.
            scores[i, j] = 0.5 + 0.5 * ((ann["id"] * 2654435761) % 1000) / 1000
            valid[i, j] = True
    det = Detections(boxes=boxes, scores=scores, labels=labels, valid=valid, masks=masks)
    return det, np.array(img_ids, np.int32), image_sizes, original_sizes


CONTIGUOUS = {1: PERSON, 2: CAR, 3: AIRPLANE}


def _results(coco, **kwargs):
    det, ids, sizes, orig = _perfect_batch(coco, **kwargs)
    return coco_results.detections_to_coco(det, ids, sizes, orig, CONTIGUOUS)


@pytest.fixture(scope="module")
def perfect_results(coco):
    return _results(coco)


@pytest.fixture(scope="module")
def perfect_metrics(coco, perfect_results, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "sub" / "metrics.json"
    metrics = coco_eval.coco_evaluate(coco, perfect_results, SET_A, output_json=path, verbose=False)
    return metrics, path


def test_perfect_detections_score_near_one(perfect_metrics):
    metrics, _ = perfect_metrics
    for group in coco_eval.GROUPS:
        bbox, segm = metrics[group]["bbox"], metrics[group]["segm"]
        assert bbox["AP"] > 0.99 and bbox["AP50"] > 0.99, (group, bbox)
        # Mask AP stays below 1 at the strict IoU thresholds: 28x28 masks lose detail, and
        # torchvision's paste maps a box onto x2 - x1 + 1 integer pixels, which makes
        # small masks ~1 px too big (a 11x11 person gets IoU ~0.78).
        assert segm["AP50"] > 0.97 and segm["AP"] > 0.75, (group, segm)
        assert all(segm[m] > 0.85 for m in ("AP75", "APm", "APl") if segm[m] >= 0), (group, segm)


def test_output_json_written(perfect_metrics):
    metrics, path = perfect_metrics
    with open(path) as f:
        assert json.load(f) == metrics
    assert set(metrics) == set(coco_eval.GROUPS)
    assert set(metrics["all"]) == {"bbox", "segm"}
    assert set(metrics["all"]["bbox"]) == set(coco_eval.METRICS)


def test_dropping_set_b_zeroes_set_b_only(coco, perfect_metrics):
    metrics, _ = perfect_metrics
    dropped = coco_eval.coco_evaluate(coco, _results(coco, drop_cats=(CAR, AIRPLANE)), SET_A, verbose=False)
    for iou_type in ("bbox", "segm"):
        assert dropped["set_b"][iou_type]["AP"] == 0.0
        assert dropped["set_a"][iou_type] == metrics["set_a"][iou_type]
        assert 0.0 < dropped["all"][iou_type]["AP"] < metrics["all"][iou_type]["AP"]


def test_shifted_boxes_lower_ap(coco, perfect_metrics):
    metrics, _ = perfect_metrics
    shifted = coco_eval.coco_evaluate(coco, _results(coco, shift=0.25), SET_A, verbose=False)
    for group in coco_eval.GROUPS:
        for iou_type in ("bbox", "segm"):
            assert shifted[group][iou_type]["AP"] < metrics[group][iou_type]["AP"] - 0.2
            assert shifted[group][iou_type]["AP75"] < metrics[group][iou_type]["AP75"]


def test_group_metrics_match_pycocotools_summarize(coco, perfect_results):
    """Our per-group averaging equals a pycocotools run restricted to the group's categories."""
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    # Jitter scores and boxes so the numbers are not all 1.
    noisy = []
    for r in perfect_results:
        r = dict(r, score=float(rng.random()), bbox=[v + float(rng.normal(0, 4)) for v in r["bbox"]])
        noisy.append(r)
    ours = coco_eval.coco_evaluate(coco, noisy, SET_A, verbose=False)
    for group, cats in (("all", None), ("set_a", [PERSON]), ("set_b", [CAR, AIRPLANE])):
        for iou_type in ("bbox", "segm"):
            with coco_eval._quiet():
                ref = COCOeval(coco, coco_eval._load_results(coco, noisy, iou_type), iou_type)
                if cats is not None:
                    ref.params.catIds = cats
                ref.evaluate()
                ref.accumulate()
                ref.summarize()
            got = [ours[group][iou_type][m] for m in coco_eval.METRICS]
            np.testing.assert_allclose(got, ref.stats[:6], rtol=0, atol=1e-12, err_msg=f"{group} {iou_type}")


def test_results_are_json_serialisable_rle(perfect_results, coco):
    from pycocotools import mask as mask_utils

    text = json.dumps(perfect_results)
    back = json.loads(text)
    r = back[0]
    assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert isinstance(r["segmentation"]["counts"], str)
    h, w = r["segmentation"]["size"]
    assert (h, w) == (coco.imgs[r["image_id"]]["height"], coco.imgs[r["image_id"]]["width"])
    decoded = mask_utils.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()})
    assert decoded.shape == (h, w) and decoded.sum() > 0
    n_gt = sum(1 for a in coco.dataset["annotations"] if not a["iscrowd"])
    assert len(perfect_results) == n_gt


def test_detections_to_coco_skips_invalid_rows_and_padding_images():
    rng = np.random.default_rng(1)
    b, d = 3, 5
    boxes = np.tile(np.array([10.0, 20.0, 50.0, 60.0], np.float32), (b, d, 1))
    det = Detections(
        boxes=boxes,
        scores=rng.random((b, d)).astype(np.float32),
        labels=np.full((b, d), 2, np.int32),
        valid=np.array([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool),
        masks=rng.random((b, d, M, M)).astype(np.float32),
    )
    ids = np.array([7, -1, 9])
    sizes = np.array([[100, 200], [100, 200], [100, 100]])
    orig = np.array([[200, 400], [200, 400], [50, 50]])
    out = coco_results.detections_to_coco(det, ids, sizes, orig, [0, 11, 22])
    assert [r["image_id"] for r in out] == [7, 7, 9, 9]
    assert all(r["category_id"] == 22 for r in out)
    np.testing.assert_allclose(out[0]["bbox"], [20.0, 40.0, 80.0, 80.0])  # x2 from 100x200 -> 200x400
    np.testing.assert_allclose(out[2]["bbox"], [5.0, 10.0, 20.0, 20.0])
    assert out[0]["segmentation"]["size"] == [200, 400] and out[2]["segmentation"]["size"] == [50, 50]
    assert out[0]["score"] == pytest.approx(float(det.scores[0, 0]))
    boxes_only = coco_results.detections_to_coco(det, ids, sizes, orig, [0, 11, 22], with_masks=False)
    assert "segmentation" not in boxes_only[0]
    with pytest.raises(ValueError, match="no COCO category"):
        coco_results.detections_to_coco(det, ids, sizes, orig, {1: 11})


@pytest.mark.parametrize("n,height,width", [(3, 50, 70), (20, 427, 640)])
def test_bucketed_paste_equals_exact_paste(n, height, width):
    rng = np.random.default_rng(n)
    masks = rng.random((n, M, M)).astype(np.float32)
    xy = rng.random((n, 2)) * [width, height]
    wh = rng.random((n, 2)) * [width, height] * 0.6 + 1
    boxes = np.concatenate([xy - wh / 2, xy + wh], axis=1).astype(np.float32)  # some leave the image
    got = coco_results.paste_binary_masks(masks, boxes, height, width)
    assert got.shape == (height, width, n) and got.dtype == np.uint8 and got.flags.f_contiguous
    ref = np.asarray(paste.paste_masks(masks, boxes, height, width)) > 0.5
    np.testing.assert_array_equal(got.transpose(2, 0, 1), ref)


def test_empty_results_and_empty_groups(coco):
    metrics = coco_eval.coco_evaluate(coco, [], [], verbose=False)
    assert metrics["set_a"] is None
    assert metrics["set_b"] is not None
    for iou_type in ("bbox", "segm"):
        values = metrics["all"][iou_type]
        assert values["AP"] == 0.0 and values["AP50"] == 0.0
        assert all(v in (0.0, -1.0) for v in values.values())
    metrics = coco_eval.coco_evaluate(coco, [], [PERSON, CAR, AIRPLANE, 999], verbose=False)
    assert metrics["set_b"] is None and metrics["set_a"]["bbox"]["AP"] == 0.0
    table = coco_eval.format_table(metrics)
    assert "| set_b | n/a |" in table and "| set_a | segm |" in table


def test_evaluate_model_loop(coco, perfect_metrics, tmp_path, capsys):
    det, ids, sizes, orig = _perfect_batch(coco)
    # Two batches of 6: the last two slots of the second one are padding images.
    batches = []
    for start in (0, 6):
        sl = slice(start, start + 6)
        n = len(ids[sl])
        pad = 6 - n

        def padded(x):
            return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x

        batch = types.SimpleNamespace(
            images=np.zeros((6, 8, 8, 3), np.float32),
            image_sizes=padded(sizes[sl]) + (np.arange(6) >= n)[:, None],  # padding rows: nonzero sizes
            image_ids=np.concatenate([ids[sl], -np.ones(pad, np.int32)]),
            original_sizes=padded(orig[sl]) + (np.arange(6) >= n)[:, None],
            det=Detections(*(padded(np.asarray(getattr(det, f))[sl])
                             for f in ("boxes", "scores", "labels", "valid", "masks"))),
        )
        batches.append((batch, [None] * n))
    by_images = {id(b.images): b.det for b, _ in batches}

    def predict_fn(images, image_sizes):
        return by_images[id(images)]

    metrics = evaluate_model(
        predict_fn, batches, GT_JSON, CONTIGUOUS, SET_A,
        output_json=tmp_path / "m.json", results_json=tmp_path / "r.json", progress=False,
    )
    assert metrics == perfect_metrics[0]
    assert "| all | bbox |" in capsys.readouterr().out
    assert len(json.load(open(tmp_path / "r.json"))) == sum(1 for a in coco.dataset["annotations"] if not a["iscrowd"])
