"""``model.exact_canvas``: an image on a large canvas gives what it gives on torchvision's own tensor, its size
rounded up to 32 (maskx_jax/canvas.py). Tiny models here; the torchvision end-to-end comparison is in
test_detector_parity.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax import anchors as anchors_lib
from maskx_jax.canvas import Canvas, padded_extent
from maskx_jax.detector import MaskRCNN, make_predict_fn
from maskx_jax.fpn import ResNetFPN
from maskx_jax.layers import FrozenBatchNorm, GroupNorm
from maskx_jax.roi_align import multiscale_roi_align
from tests.model_utils import tiny_config

# (h, w) of resized images: odd and even multiples of 32 after rounding (P6's spacing differs for odd ones)
SIZES = [(70, 100), (96, 64), (33, 150), (160, 97)]
CANVAS = (192, 224)


def _randomize_norms_(model: nnx.Module, seed: int) -> None:
    """Non-trivial statistics everywhere, so padding is far from zero after the first normalisation."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, FrozenBatchNorm):
            c = m.num_features
            m.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            m.bias[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
            m.running_mean[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
            m.running_var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
        elif isinstance(m, GroupNorm):
            c = m.weight.shape[0]
            m.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            m.bias[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)


def _image(rng, h, w):
    return rng.normal(size=(h, w, 3)).astype(np.float32)


def _on_canvas(img, hw):
    out = np.zeros((1, *hw, 3), np.float32)
    out[0, :img.shape[0], :img.shape[1]] = img
    return out


@pytest.mark.parametrize("norm", ["frozen_bn", "group_norm"])
def test_features_on_a_canvas_equal_features_on_the_own_tensor(norm):
    backbone = ResNetFPN(18, out_channels=16, freeze_at=0, norm=norm, rngs=nnx.Rngs(0))
    _randomize_norms_(backbone, 1)
    rng = np.random.default_rng(0)
    imgs = [_image(rng, h, w) for h, w in SIZES]
    sizes = np.array(SIZES, np.int32)
    batch = np.concatenate([_on_canvas(im, CANVAS) for im in imgs])
    fwd = jax.jit(lambda x, s, exact: backbone(x, Canvas(s) if exact else None), static_argnums=2)
    feats = fwd(batch, sizes, True)
    plain = fwd(batch, sizes, False)
    leaked = 0.0
    for i, (h, w) in enumerate(SIZES):
        eh, ew = (int(v) for v in padded_extent(sizes[i]))
        own = fwd(_on_canvas(imgs[i], (eh, ew)), sizes[i:i + 1], False)  # torchvision's tensor: no canvas
        for level, stride in enumerate(backbone.strides):
            gh, gw = -(-eh // stride), -(-ew // stride)
            ref = np.asarray(own[level][0])
            assert ref.shape[:2] == (gh, gw)
            got = np.asarray(feats[level][i])
            np.testing.assert_allclose(got[:gh, :gw], ref, rtol=0, atol=2e-5 * np.abs(ref).max())
            assert not got[gh:].any() and not got[:, gw:].any(), "features outside the extent must be zero"
            leaked = max(leaked, float(np.abs(np.asarray(plain[level][i])[:gh, :gw] - ref).max()))
    assert leaked > 1e-2, "without the canvas the padding should change the features (else this test is vacuous)"


def test_per_image_anchors_are_torchvisions_for_the_own_tensor():
    strides = (4, 8, 16, 32, 64)
    canvas_grid = [(-(-CANVAS[0] // s), -(-CANVAS[1] // s)) for s in strides]
    sizes = np.array(SIZES, np.int32)
    anchors, valid = anchors_lib.anchor_grid_per_image(padded_extent(sizes), canvas_grid, strides)
    anchors, valid = np.asarray(anchors), np.asarray(valid)
    for i in range(len(SIZES)):
        eh, ew = (int(v) for v in padded_extent(sizes[i]))
        grid = [(-(-eh // s), -(-ew // s)) for s in strides]
        ref, _ = anchors_lib.anchor_grid((eh, ew), grid)  # the NumPy twin of torchvision's AnchorGenerator
        np.testing.assert_array_equal(anchors[i][valid[i]], ref)
    # P6 of a 96-pixel-high extent: 2 rows spaced 96 // 2 = 48 apart, not 64
    assert padded_extent(sizes[0])[0] == 96 and valid.sum(1).min() > 0


def test_roi_align_clamps_to_the_extent():
    rng = np.random.default_rng(2)
    sizes = np.array(SIZES, np.int32)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    feats = [rng.normal(size=(len(SIZES), -(-CANVAS[0] // int(1 / s)), -(-CANVAS[1] // int(1 / s)), 8))
             .astype(np.float32) for s in scales]
    # boxes reaching the image's bottom-right corner, where samples fall in the extent's last pixel row
    boxes = np.stack([np.array([[0, 0, w, h], [w * 0.5, h * 0.3, w, h], [2, 3, w * 0.9, h]], np.float32)
                      for h, w in SIZES])
    got = np.asarray(multiscale_roi_align([jnp.asarray(f) for f in feats], boxes, 7, 2, False, scales,
                                          extents=padded_extent(sizes)))
    for i in range(len(SIZES)):
        eh, ew = (int(v) for v in padded_extent(sizes[i]))
        own = [jnp.asarray(f[i:i + 1, :eh // int(1 / s), :ew // int(1 / s)]) for f, s in zip(feats, scales)]
        ref = np.asarray(multiscale_roi_align(own, boxes[i:i + 1], 7, 2, False, scales))
        np.testing.assert_allclose(got[i], ref[0], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_detector():
    model = MaskRCNN(tiny_config(norm="frozen_bn", box_score_thresh=0.0), rngs=nnx.Rngs(3))
    _randomize_norms_(model, 4)
    return model


# Two sizes whose extents are odd multiples of 32 (96 and 160 rows: P6 anchors 48 and 53 apart), each compiled
# alone too: the five-size comparison against torchvision itself is in test_detector_parity.py.
DETECTION_SIZES = [(70, 100), (160, 97)]


def test_detections_on_a_canvas_equal_detections_on_the_own_tensor(tiny_detector):
    """The whole predict: a batch of two sizes on one canvas == each image alone on its rounded-up tensor."""
    rng = np.random.default_rng(5)
    imgs = [_image(rng, h, w) for h, w in DETECTION_SIZES]
    sizes = np.array(DETECTION_SIZES, np.int32)
    predict = make_predict_fn(tiny_detector)
    det = jax.device_get(predict(np.concatenate([_on_canvas(im, CANVAS) for im in imgs]), sizes))
    for i in range(len(DETECTION_SIZES)):
        eh, ew = (int(v) for v in padded_extent(sizes[i]))
        ref = jax.device_get(predict(_on_canvas(imgs[i], (eh, ew)), sizes[i:i + 1]))
        v = ref.valid[0]
        assert v.sum() >= 5, f"image {i}: too few detections for the comparison to mean much"
        np.testing.assert_array_equal(det.valid[i], v)
        np.testing.assert_array_equal(det.labels[i][v], ref.labels[0][v])
        np.testing.assert_allclose(det.scores[i][v], ref.scores[0][v], rtol=0, atol=1e-5)
        np.testing.assert_allclose(det.boxes[i][v], ref.boxes[0][v], rtol=0, atol=1e-3)
        np.testing.assert_allclose(det.masks[i][v], ref.masks[0][v], rtol=0, atol=1e-4)
