"""maskx_jax.boxes against torchvision (BoxCoder, ops.box_iou, clip_boxes_to_image, remove_small_boxes)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from maskx_jax import boxes as B


def random_boxes(rng, n, lo=0.0, hi=800.0, min_wh=1.0, max_wh=300.0):
    """[n, 4] float32 XYXY boxes with positive width/height."""
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(0)
    # Size ratios stay below exp(scale_clamp) = 62.5 so decode's clamp does not engage.
    proposals = random_boxes(rng, 500, min_wh=10.0)
    targets = random_boxes(rng, 500, min_wh=10.0)
    deltas = B.encode(targets, proposals, weights)
    back = B.decode(deltas, proposals, weights)
    np.testing.assert_allclose(np.asarray(back), targets, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(weights):
    rng = np.random.default_rng(1)
    proposals = random_boxes(rng, 2000)
    targets = random_boxes(rng, 2000)
    ref = BoxCoder(weights).encode_single(torch.from_numpy(targets), torch.from_numpy(proposals)).numpy()
    got = np.asarray(jax.jit(lambda t, p: B.encode(t, p, weights))(targets, proposals))
    # ~1 ulp: XLA's log and its fused arithmetic may round differently from torch's.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_matches_torchvision_with_clamping(weights):
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 2000)
    deltas = (rng.normal(0.0, 2.0, (2000, 4)) * np.asarray(weights)).astype(np.float32)
    # Huge dw/dh (and one hugely negative) to exercise the scale_clamp branch.
    deltas[:100, 2:] = 50.0 * np.asarray(weights[2:], np.float32)
    deltas[100:200, 2] = 1e4
    deltas[200:300, 3] = -30.0
    ref = BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()
    got = np.asarray(jax.jit(lambda d, b: B.decode(d, b, weights))(deltas, boxes))
    assert np.all(np.isfinite(got))
    # Each corner is ctr -+ half-size and may cancel to a small number, so the error is measured
    # relative to the box's largest coordinate magnitude (the size of the operands), not the corner.
    scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1.0)
    assert np.max(np.abs(got - ref) / scale) < 1e-5


def test_decode_broadcasts_per_class_deltas():
    rng = np.random.default_rng(3)
    r, k = 50, 7
    weights = (10.0, 10.0, 5.0, 5.0)
    boxes = random_boxes(rng, r)
    deltas = rng.normal(0.0, 1.0, (r, k, 4)).astype(np.float32)
    got = np.asarray(B.decode(deltas, boxes[:, None, :], weights))
    assert got.shape == (r, k, 4)
    # torchvision's BoxCoder.decode takes [R, K*4] codes with a list of [R, 4] boxes -> [R, K, 4].
    ref = BoxCoder(weights).decode(torch.from_numpy(deltas.reshape(r, k * 4)), [torch.from_numpy(boxes)]).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_default_scale_clamp():
    assert B.DEFAULT_SCALE_CLAMP == math.log(1000.0 / 16)


def test_iou_hand_cases():
    a = np.array(
        [
            [0, 0, 10, 10],  # reference
            [20, 20, 30, 30],  # disjoint
            [0, 0, 10, 10],  # identical
            [2, 2, 6, 6],  # contained: 16 / 100
            [5, 0, 15, 10],  # partial: inter 50, union 150 -> 1/3
            [0, 10, 10, 20],  # touching edge: inter 0
        ],
        np.float32,
    )
    iou = np.asarray(B.box_iou(a[:1], a))[0]
    np.testing.assert_allclose(iou, [1.0, 0.0, 1.0, 0.16, 1.0 / 3.0, 0.0], rtol=1e-6)
    # Partial overlap in both axes: [0,0,4,4] vs [2,1,6,5]: inter 2*3=6, union 16+16-6=26.
    p = np.asarray(B.box_iou(np.array([[0, 0, 4, 4]], np.float32), np.array([[2, 1, 6, 5]], np.float32)))
    np.testing.assert_allclose(p, [[6.0 / 26.0]], rtol=1e-6)


def test_iou_zero_area_is_zero_not_nan():
    z = np.array([[3, 3, 3, 3], [5, 5, 5, 9]], np.float32)  # point and degenerate line
    full = np.array([[0, 0, 10, 10]], np.float32)
    iou = np.asarray(B.box_iou(z, np.concatenate([z, full])))
    assert not np.any(np.isnan(iou))
    np.testing.assert_array_equal(iou, np.zeros((2, 3), np.float32))
    # torchvision gives NaN for 0/0 and 0 when only one box is empty.
    ref = torchvision.ops.box_iou(torch.from_numpy(z), torch.from_numpy(np.concatenate([z, full]))).numpy()
    assert np.isnan(ref[0, 0]) and ref[0, 2] == 0
    # Gradients stay finite through the masked branch.
    g = jax.grad(lambda b: B.box_iou(b, b).sum())(jnp.asarray(z))
    assert np.all(np.isfinite(np.asarray(g)))


def test_iou_matches_torchvision_random():
    rng = np.random.default_rng(4)
    a = random_boxes(rng, 300, hi=200.0, max_wh=100.0)
    b = random_boxes(rng, 200, hi=200.0, max_wh=100.0)
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.asarray(jax.jit(B.box_iou)(a, b))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(B.box_area(a)), torchvision.ops.box_area(torch.from_numpy(a)).numpy(), rtol=0)


def test_clip_boxes_matches_torchvision():
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 500, lo=-200.0, hi=900.0)
    h, w = 480, 640
    ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (h, w)).numpy()
    np.testing.assert_array_equal(np.asarray(B.clip_boxes(boxes, h, w)), ref)
    # Traced per-image sizes under vmap, with extra leading dims.
    batch = np.stack([boxes.reshape(50, 10, 4), boxes[::-1].reshape(50, 10, 4)])
    hs = jnp.array([480, 300], jnp.int32)
    ws = jnp.array([640, 200], jnp.int32)
    got = np.asarray(jax.jit(jax.vmap(B.clip_boxes))(batch, hs, ws))
    for i, (hh, ww) in enumerate([(480, 640), (300, 200)]):
        r = torchvision.ops.clip_boxes_to_image(torch.from_numpy(batch[i]), (hh, ww)).numpy()
        np.testing.assert_array_equal(got[i], r)


def test_small_box_mask_matches_torchvision():
    rng = np.random.default_rng(6)
    boxes = random_boxes(rng, 1000, min_wh=0.0, max_wh=3.0)
    boxes[:10, 2] = boxes[:10, 0] + 1e-3  # exactly at the threshold
    for min_size in (1e-3, 0.5, 1.0):
        keep = torchvision.ops.remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
        mask = np.asarray(B.small_box_mask(boxes, min_size))
        np.testing.assert_array_equal(np.nonzero(mask)[0], keep)
