"""Mask R-CNN parity with torchvision's ``maskrcnn_resnet50_fpn``, stage by stage and end to end.

One randomly initialised torchvision model (no download is possible) is converted once per module
and shared by every test here. Random weights give degenerate detections: the box head's
representation is nearly the same for every RoI, so one class wins everywhere with probability ~1,
and torchvision's default ``bbox_pred`` init moves boxes by hundreds of pixels, so they collapse
onto the image border. To make the comparison mean something we calibrate on the test images
(``tests.torch_utils.calibrate_maskrcnn_``):
  (a) ``cls_score`` is rescaled so each class logit varies with std 1.5 *across RoIs* and its bias
      is set to minus the mean logit plus N(0, 0.3) noise: scores spread over ~[0.5, 0.95] with
      many classes represented, so the score threshold, per-class NMS and the top-100 cut all do
      real work;
  (b) ``bbox_pred`` is scaled so deltas have std 0.3 (boxes move by a fraction of their size);
  (c) the RPN is calibrated first: objectness logits get std 3 (well spread, so top-k and NMS
      order are stable to float rounding) and box deltas std 0.2 (otherwise random FPN features
      give deltas that squash proposals into sub-pixel slivers whose IoU is ill-conditioned).
BatchNorm statistics are randomised too. 11 classes (10 + background) keep the heads small.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from convert.from_torch import convert_maskrcnn
from maskx_jax import anchors as anchors_lib
from maskx_jax.box_head import detect_boxes
from maskx_jax.boxes import box_iou
from maskx_jax.detector import make_predict_fn
from maskx_jax.mask_head import mask_logits
from maskx_jax.paste import paste_masks
from maskx_jax.rpn import select_proposals
from maskx_jax.transform import preprocess, resize_boxes
from tests.torch_utils import calibrate_maskrcnn_, nchw, nhwc, randomize_batchnorm_, state_dict_numpy

NUM_CLASSES = 11
MIN_SIZE, MAX_SIZE = 320, 512  # small images keep the R-50 end-to-end case fast on 2 CPU cores
REL_TOL = 1e-4  # max abs err <= REL_TOL * max |reference| for dense outputs


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture(scope="module")
def models(images):
    torch.manual_seed(0)
    ref = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=MIN_SIZE, max_size=MAX_SIZE)
    randomize_batchnorm_(ref, seed=1)
    calibrate_maskrcnn_(ref, _torch_images(images))
    ours = convert_maskrcnn(state_dict_numpy(ref), depth=50)
    return ref, ours


def _torch_images(images):
    return [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]


def _smooth_images(seed, sizes):
    """Smooth random uint8 images (so detections are not just noise) of the given (h, w) sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        base = rng.uniform(0, 255, size=(h // 16 + 1, w // 16 + 1, 3))
        img = np.kron(base, np.ones((16, 16, 1)))[:h, :w]
        out.append(np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def images():
    return _smooth_images(0, [(300, 400), (480, 360), (256, 512)])


def _features(seed, n, h, w, c=256):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, h // s, w // s, c)).astype(np.float32) for s in (4, 8, 16, 32, 64)]


def test_rpn_head_outputs(models):
    ref, ours = models
    feats = _features(0, 2, 128, 192)
    with torch.no_grad():
        t_obj, t_del = ref.rpn.head([nchw(f) for f in feats])
    # torchvision order: level, then location, then anchor (permute_and_flatten)
    t_obj = np.concatenate([o.permute(0, 2, 3, 1).reshape(2, -1).numpy() for o in t_obj], 1)
    t_del = np.concatenate([d.permute(0, 2, 3, 1).reshape(2, -1, 4).numpy() for d in t_del], 1)
    logits, deltas = jax.jit(lambda m, f: m.rpn.head(f))(ours, feats)
    assert _rel_err(logits, t_obj) <= REL_TOL
    assert _rel_err(deltas, t_del) <= REL_TOL


def test_proposals_match_torchvision(models):
    """Same head outputs in -> same proposals out (per-level top-k, NMS per level, top-n)."""
    ref, _ = models
    n, h, w = 2, 320, 448
    image_sizes = [(320, 440), (300, 448)]
    rng = np.random.default_rng(1)
    feats = [torch.zeros(n, 256, h // s, w // s) for s in (4, 8, 16, 32, 64)]
    sizes = [f.shape[-2:] for f in feats]
    anchors, counts = anchors_lib.anchor_grid((h, w), [tuple(s) for s in sizes])
    total = anchors.shape[0]
    logits = rng.normal(0, 3, size=(n, total)).astype(np.float32)
    deltas = rng.normal(0, 0.5, size=(n, total, 4)).astype(np.float32)
    with torch.no_grad():
        t_props = ref.rpn.box_coder.decode(torch.from_numpy(deltas).reshape(-1, 4).unsqueeze(1),
                                           [torch.from_numpy(anchors.copy())] * n).view(n, -1, 4)
        t_boxes, t_scores = ref.rpn.filter_proposals(t_props, torch.from_numpy(logits).reshape(n, -1),
                                                     image_sizes, counts)
    props = jax.jit(lambda lg, dl, hw: select_proposals(lg, dl, anchors, counts, hw, pre_nms_top_n=1000,
                                                        post_nms_top_n=1000))(logits, deltas,
                                                                              np.array(image_sizes, np.int32))
    for i in range(n):
        valid = np.asarray(props.valid[i])
        got_boxes = np.asarray(props.boxes[i])[valid]
        assert valid.sum() == len(t_boxes[i])
        # Both are sorted by score. Sigmoid probabilities near 1 tie in float32, and torch's and
        # XLA's sigmoid differ by 1 ulp on ~0.4% of inputs, which can swap (near-)tied neighbours.
        # So rows are matched one to one: score within 2.5e-7 (a few ulp) and box IoU >= 0.999.
        got_scores = np.asarray(props.scores[i])[valid]
        ref_b, ref_s = t_boxes[i].numpy(), t_scores[i].numpy()
        np.testing.assert_allclose(got_scores, ref_s, rtol=0, atol=2.5e-7)
        iou = np.asarray(box_iou(jnp.asarray(ref_b), jnp.asarray(got_boxes)))
        close = np.abs(ref_s[:, None] - got_scores[None, :]) <= 2.5e-7
        used = np.zeros(len(got_boxes), bool)
        for j in range(len(ref_b)):
            cand = np.where(close[j] & ~used)[0]
            assert len(cand), (i, j)
            best = cand[np.argmax(iou[j, cand])]
            assert iou[j, best] >= 0.999, (i, j, iou[j, best])
            used[best] = True


def test_box_and_mask_heads(models):
    ref, ours = models
    rng = np.random.default_rng(2)
    box_in = rng.normal(size=(16, 7, 7, 256)).astype(np.float32)
    mask_in = rng.normal(size=(16, 14, 14, 256)).astype(np.float32)
    with torch.no_grad():
        t_rep = ref.roi_heads.box_head(nchw(box_in))
        t_cls, t_box = ref.roi_heads.box_predictor(t_rep)
        t_mask = ref.roi_heads.mask_predictor(ref.roi_heads.mask_head(nchw(mask_in)))

    def heads(m, b, x):
        rh = m.roi_heads
        cls, box = rh.box_predictor(rh.box_head(b))
        feats = rh.mask_predictor.features(rh.mask_head(x))
        return cls, box, mask_logits(feats, *rh.mask_predictor.class_weights())

    cls, box, masks = jax.jit(heads)(ours, box_in, mask_in)
    assert _rel_err(cls, t_cls.numpy()) <= REL_TOL
    assert _rel_err(box, t_box.numpy()) <= REL_TOL
    assert _rel_err(masks, nhwc(t_mask)) <= REL_TOL


def test_box_postprocess_matches_torchvision(models):
    """Same logits / deltas / proposals in -> same detections (score thresh, class NMS, top 100)."""
    ref, _ = models
    rng = np.random.default_rng(3)
    r, k1 = 500, NUM_CLASSES
    xy = rng.uniform(0, 300, size=(r, 2))
    wh = rng.uniform(4, 120, size=(r, 2))
    proposals = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    logits = rng.normal(0, 3, size=(r, k1)).astype(np.float32)
    deltas = rng.normal(0, 1.0, size=(r, 4 * k1)).astype(np.float32)
    hw = (360, 400)
    with torch.no_grad():
        tb, ts, tl = ref.roi_heads.postprocess_detections(torch.from_numpy(logits), torch.from_numpy(deltas),
                                                           [torch.from_numpy(proposals)], [hw])
    boxes, scores, labels, valid = jax.jit(detect_boxes)(logits, deltas, proposals, np.ones(r, bool),
                                                         np.array(hw, np.int32))
    valid = np.asarray(valid)
    assert valid.sum() == len(tb[0]) == 100
    np.testing.assert_allclose(np.asarray(scores)[valid], ts[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(labels)[valid], tl[0].numpy())
    np.testing.assert_allclose(np.asarray(boxes)[valid], tb[0].numpy(), rtol=1e-5, atol=1e-3)


def _detect_ours(model, imgs, pad_to=None):
    batch = preprocess(imgs, min_size=MIN_SIZE, max_size=MAX_SIZE, pad_to=pad_to)
    predict = make_predict_fn(model)
    det = jax.device_get(predict(batch.images, batch.image_sizes))
    boxes = resize_boxes(det.boxes, batch.image_sizes, batch.original_sizes)
    results = []
    for i, (h, w) in enumerate(batch.original_sizes):
        v = det.valid[i]
        masks = paste_masks(jnp.asarray(det.masks[i][v]), jnp.asarray(boxes[i][v]), int(h), int(w))
        results.append(dict(boxes=np.asarray(boxes[i][v]), scores=det.scores[i][v], labels=det.labels[i][v],
                            masks=np.asarray(masks)))
    return results


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else inter / union


# Five aspect ratios from 1:2 to 2:1; resized (min 320, max 512) to 256x512, 320x480, 320x391, 320x320 and
# 512x256: torchvision pads them to 256x512, 320x480, 320x416, 320x320, 512x256 (odd multiples of 32 among
# them, where P6's anchors are spaced 48 or 53 pixels apart instead of 64).
CANVAS_SIZES = [(200, 400), (320, 480), (288, 352), (350, 350), (400, 200)]
CANVAS = (512, 512)


@pytest.mark.slow
def test_one_canvas_gives_torchvisions_detections_for_every_image(models):
    """Five sizes in one batch on one 512x512 canvas == torchvision run on each image alone.

    torchvision pads each image to its size rounded up to 32; ``model.exact_canvas`` makes the canvas look like
    that tensor for every image. Same detections in the same order: labels equal, scores within 1e-4, box IoU
    >= 0.99, pasted-mask IoU (at 0.5) >= 0.98. FrozenBN statistics are random (``randomize_batchnorm_``), so
    the padding is far from zero after the first normalisation.
    """
    ref, ours = models
    images = _smooth_images(7, CANVAS_SIZES)
    with torch.no_grad():
        expected = [ref([im])[0] for im in _torch_images(images)]
    got = _detect_ours(ours, images, pad_to=CANVAS)
    for i, (e, g) in enumerate(zip(expected, got)):
        n_ref = len(e["boxes"])
        assert n_ref >= 20, f"image {i}: only {n_ref} reference detections; the test would mean little"
        assert len(set(e["labels"].tolist())) >= 3, f"image {i}: detections of fewer than 3 classes"
        assert len(g["boxes"]) == n_ref, f"image {i}: {len(g['boxes'])} detections vs torchvision's {n_ref}"
        np.testing.assert_array_equal(g["labels"], e["labels"].numpy(), err_msg=f"image {i}: labels or order")
        np.testing.assert_allclose(g["scores"], e["scores"].numpy(), rtol=0, atol=1e-4, err_msg=f"image {i}")
        iou = np.diag(np.asarray(box_iou(jnp.asarray(e["boxes"].numpy()), jnp.asarray(g["boxes"]))))
        assert iou.min() >= 0.99, f"image {i}: box IoU {iou.min():.4f}"
        m_iou = [_mask_iou(e["masks"][j, 0].numpy() > 0.5, g["masks"][j] > 0.5) for j in range(n_ref)]
        assert min(m_iou) >= 0.98, f"image {i}: mask IoU {min(m_iou):.4f}"


def test_predict_traces_once_per_shape(models):
    _, ours = models
    predict = make_predict_fn(ours)
    rng = np.random.default_rng(4)
    sizes = np.array([[128, 160]], np.int32)
    for _ in range(3):
        predict(rng.normal(size=(1, 128, 160, 3)).astype(np.float32), sizes)
    assert predict.traced_shapes == [(1, 128, 160, 3)]
    predict(rng.normal(size=(2, 128, 160, 3)).astype(np.float32), np.repeat(sizes, 2, 0))
    assert predict.traced_shapes == [(1, 128, 160, 3), (2, 128, 160, 3)]
