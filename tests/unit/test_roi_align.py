"""Parity of maskx_jax.roi_align with torchvision's compiled RoIAlign / MultiScaleRoIAlign.

Tolerances (float32):
  * forward outputs: max abs error <= 1e-5 (observed ~2e-7);
  * feature gradients (VJP with a shared random cotangent): max abs error <= 1e-5. A gradient
    pixel is a scatter-add of hundreds of sample contributions whose summation order differs from
    torch's loop, so its float32 error grows with its magnitude (~1e-6 relative). The cotangents
    are drawn with std 0.1 (COT_STD) so gradients are O(1), the scale of a real loss gradient,
    where the absolute bound is meaningful;
  * sampling coordinates, tap indices and bilinear weights: bit-exact, jit and eager.
"""
from collections import OrderedDict
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.poolers import LevelMapper

from maskx_jax.roi_align import assign_levels, multiscale_roi_align, roi_align

ATOL = 1e-5  # max abs error allowed for forward outputs and feature gradients
COT_STD = 0.1  # cotangent scale: keeps gradients O(1) (see module docstring)


def _nhwc_to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _nchw_to_nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _roi_boxes(rng, image_h, image_w):
    """Boxes in image pixels covering the hard cases, plus the image of each box."""
    boxes = [
        [4.3, 6.1, 40.7, 30.2],  # ordinary
        [-10.0, -7.5, 20.0, 18.0],  # partly outside (top-left)
        [image_w - 15.0, image_h - 9.0, image_w + 25.0, image_h + 11.0],  # partly outside (bottom-right)
        [12.2, 9.9, 12.6, 10.3],  # tiny (< 1 px even in image space)
        [30.0, 20.0, 30.5, 20.2],  # tiny
        [-50.0, -40.0, image_w + 60.0, image_h + 30.0],  # huge, larger than the image
        [0.0, 0.0, image_w, image_h],  # exactly the image
        [image_w + 5.0, 3.0, image_w + 30.0, 20.0],  # fully outside (right)
        [20.0, 15.0, 18.0, 12.0],  # malformed (x2 < x1)
    ]
    xy = rng.uniform(-8, [image_w, image_h], size=(7, 2))
    wh = rng.uniform(0.5, [image_w, image_h], size=(7, 2))
    boxes += np.concatenate([xy, xy + wh], axis=1).tolist()
    boxes = np.asarray(boxes, np.float32)
    batch_idx = (np.arange(len(boxes)) % 3).astype(np.int32)  # 3 images, all used
    return boxes, batch_idx


@pytest.fixture(scope="module")
def single_level_data():
    rng = np.random.default_rng(0)
    # B=3, H=24, W=30, C=4: coordinates up to ~30 px, where a 1-ulp coordinate change shows.
    feats = rng.standard_normal((3, 24, 30, 4)).astype(np.float32)
    boxes, batch_idx = _roi_boxes(rng, image_h=96.0, image_w=120.0)  # image is 4x the map
    return feats, boxes, batch_idx


def _torch_roi_align(feats, boxes, batch_idx, cot, output_size, scale, sampling_ratio, aligned):
    x = _nhwc_to_nchw(feats).requires_grad_(True)
    rois = torch.cat([torch.from_numpy(batch_idx).float()[:, None], torch.from_numpy(boxes)], dim=1)
    out = torchvision.ops.roi_align(x, rois, output_size, scale, sampling_ratio, aligned)
    out.backward(_nhwc_to_nchw(cot))
    return _nchw_to_nhwc(out), _nchw_to_nhwc(x.grad)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
@pytest.mark.parametrize("output_size", [7, 14])
def test_roi_align_matches_torchvision(single_level_data, aligned, sampling_ratio, output_size):
    feats, boxes, batch_idx = single_level_data
    scale = 0.25
    rng = np.random.default_rng(1)
    cot = (COT_STD * rng.standard_normal((len(boxes), output_size, output_size, feats.shape[-1]))).astype(np.float32)

    fn = jax.jit(
        functools.partial(
            roi_align,
            output_size=(output_size, output_size),
            spatial_scale=scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
    )
    out, vjp = jax.vjp(lambda f: fn(f, jnp.asarray(boxes), jnp.asarray(batch_idx)), jnp.asarray(feats))
    (grad,) = vjp(jnp.asarray(cot))

    ref_out, ref_grad = _torch_roi_align(
        feats, boxes, batch_idx, cot, output_size, scale, sampling_ratio, aligned
    )
    assert out.shape == ref_out.shape
    assert _max_err(out, ref_out) <= ATOL
    assert _max_err(grad, ref_grad) <= ATOL
    # The test boxes must actually exercise sampling outside the map (zero contributions).
    assert np.abs(ref_out).sum() > 0


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_non_square_odd_grid_and_scale(aligned):
    # Non-power-of-two scale (1/3) and grid (3): the kernel's rounding of box*scale - offset and
    # of the divisions must survive jit.
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((2, 20, 26, 3)).astype(np.float32)
    boxes, batch_idx = _roi_boxes(rng, image_h=60.0, image_w=78.0)
    batch_idx = batch_idx % 2
    cot = (COT_STD * rng.standard_normal((len(boxes), 5, 3, 3))).astype(np.float32)
    fn = jax.jit(roi_align, static_argnums=(3, 4, 5, 6))
    out, vjp = jax.vjp(
        lambda f: fn(f, jnp.asarray(boxes), jnp.asarray(batch_idx), (5, 3), 1 / 3, 3, aligned),
        jnp.asarray(feats),
    )
    (grad,) = vjp(jnp.asarray(cot))
    ref_out, ref_grad = _torch_roi_align(feats, boxes, batch_idx, cot, (5, 3), 1 / 3, 3, aligned)
    assert _max_err(out, ref_out) <= ATOL
    assert _max_err(grad, ref_grad) <= ATOL


def _kernel_taps_numpy(start, extent, pooled, grid, size):
    """torchvision's CPU kernel sample/tap computation, transcribed in numpy float32 scalars' order."""
    f = np.float32
    bin_size = extent / f(pooled)
    p = np.arange(pooled, dtype=f)[None, :, None]
    i = np.arange(grid, dtype=f)[None, None, :]
    b = bin_size[:, None, None]
    y = (start[:, None, None] + p * b) + ((i + f(0.5)) * b) / f(grid)
    valid = (y >= -1) & (y <= size)
    y = np.maximum(y, f(0))
    low = np.floor(y)
    edge = low >= size - 1
    low = np.where(edge, f(size - 1), low)
    high = np.where(edge, f(size - 1), low + 1)
    ly = np.where(edge, f(0), y - low).astype(f)
    hy = (f(1) - ly).astype(f)
    r = len(start)
    idx = np.stack([low, high], -1).astype(np.int32).reshape(r, pooled, 2 * grid)
    w = np.stack([np.where(valid, hy, f(0)), np.where(valid, ly, f(0))], -1).reshape(r, pooled, 2 * grid)
    return idx, w


@pytest.mark.parametrize("pooled,grid", [(7, 2), (14, 3), (5, 4)])
def test_sample_taps_are_bit_exact_under_jit(pooled, grid):
    # XLA would otherwise turn x / 7 into x * (1/7) and a * b + c into an FMA, each off by
    # 1 ulp from the kernel; on ~200 px coordinates that is a ~1e-5 change of the output.
    from maskx_jax.roi_align import _axis_samples

    rng = np.random.default_rng(6)
    size = 200.0
    start = rng.uniform(-20, 210, 4000).astype(np.float32)
    extent = rng.uniform(0.01, 150, 4000).astype(np.float32)
    ref_idx, ref_w = _kernel_taps_numpy(start, extent, pooled, grid, np.float32(size))
    fn = jax.jit(_axis_samples, static_argnums=(2, 3))
    for sz in (size, jnp.full((4000,), size, jnp.float32)):  # static size and per-box sizes
        idx, w = fn(jnp.asarray(start), jnp.asarray(extent), pooled, grid, sz)
        np.testing.assert_array_equal(np.asarray(idx), ref_idx)
        np.testing.assert_array_equal(np.asarray(w), ref_w)


@pytest.mark.parametrize("bad", [0, -1])
def test_roi_align_rejects_adaptive_sampling(bad):
    feats = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError):
        roi_align(feats, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32), 2, 1.0, bad, False)


def test_assign_levels_matches_level_mapper():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 800, size=(2000, 2))
    # Sizes spread over many octaves so all levels and the clamps are hit.
    wh = np.exp(rng.uniform(np.log(1.0), np.log(1500.0), size=(2000, 2)))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    # Exact powers of two of the canonical scale, plus a degenerate box.
    extra = np.array(
        [[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [10, 10, 66, 66], [5, 5, 5, 9]],
        np.float32,
    )
    boxes = np.concatenate([boxes, extra])
    ref = LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy() + 2
    got = np.asarray(assign_levels(jnp.asarray(boxes)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    assert set(np.unique(ref)) == {2, 3, 4, 5}
    # Batched leading dims are kept.
    assert assign_levels(jnp.asarray(boxes[:6]).reshape(2, 3, 4)).shape == (2, 3)


# Multi-scale: 256x320 padded input, P2..P5 maps, 2 images.
IMAGE_HW = (256, 320)
LEVEL_HW = [(64, 80), (32, 40), (16, 20), (8, 10)]
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
C_MS = 8


def _make_multiscale_data():
    rng = np.random.default_rng(4)
    feats = [rng.standard_normal((2, h, w, C_MS)).astype(np.float32) for h, w in LEVEL_HW]
    per_image = []
    for img in range(2):
        boxes = [
            [10.0, 12.0, 30.0, 40.0],  # sqrt(area) ~ 24 -> P2
            [3.2, 5.1, 3.9, 5.6],  # tiny -> P2
            [50.0, 40.0, 190.0, 180.0],  # 140 -> P3
            [-20.0, -10.0, 130.0, 150.0],  # ~155, partly outside -> P3
            [0.0, 0.0, 300.0, 250.0],  # ~274 -> P4
            [40.0, 30.0, 330.0, 270.0],  # ~264, partly outside -> P4
            [-100.0, -100.0, 420.0, 360.0],  # ~491, larger than the image -> P5
            [-60.0, -80.0, 450.0, 400.0],  # ~494 -> P5
        ]
        xy = rng.uniform(0, [IMAGE_HW[1] - 20, IMAGE_HW[0] - 20], size=(4, 2))
        wh = rng.uniform(4, 200, size=(4, 2))
        boxes += np.concatenate([xy, xy + wh], axis=1).tolist()
        per_image.append(np.asarray(boxes, np.float32) + img * 1.5)
    boxes = np.stack(per_image)  # [B=2, N=12, 4]
    return feats, boxes


@pytest.fixture(scope="module")
def multiscale_data():
    return _make_multiscale_data()


def _torch_multiscale(feats, boxes, cot, output_size, sampling_ratio, aligned):
    xs = [_nhwc_to_nchw(f).requires_grad_(True) for f in feats]
    box_list = [torch.from_numpy(b) for b in boxes]
    if not aligned:
        pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio)
        inputs = OrderedDict((str(i), x) for i, x in enumerate(xs))
        out = pooler(inputs, box_list, [IMAGE_HW] * len(box_list))
    else:
        # MultiScaleRoIAlign has no `aligned` flag: compose LevelMapper + roi_align as it does.
        levels = LevelMapper(2, 5)(box_list)
        rois = torch.cat(
            [torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(box_list)]
        )
        out = torch.zeros((len(rois), C_MS, output_size, output_size))
        for lvl, (x, s) in enumerate(zip(xs, SCALES)):
            sel = torch.where(levels == lvl)[0]
            out[sel] = torchvision.ops.roi_align(x, rois[sel], output_size, s, sampling_ratio, True)
    b, n = boxes.shape[:2]
    out.backward(_nhwc_to_nchw(cot.reshape(b * n, *cot.shape[2:])))
    out_nhwc = _nchw_to_nhwc(out).reshape(b, n, output_size, output_size, C_MS)
    return out_nhwc, [_nchw_to_nhwc(x.grad) for x in xs]


@pytest.mark.parametrize("aligned,sampling_ratio,output_size", [(False, 2, 7), (False, 2, 14), (True, 2, 7)])
def test_multiscale_matches_torchvision(multiscale_data, aligned, sampling_ratio, output_size):
    feats, boxes = multiscale_data
    levels = np.asarray(assign_levels(jnp.asarray(boxes)))
    assert set(np.unique(levels)) == {2, 3, 4, 5}, "every pyramid level must be exercised"

    rng = np.random.default_rng(5)
    cot = (COT_STD * rng.standard_normal(boxes.shape[:2] + (output_size, output_size, C_MS))).astype(np.float32)
    fn = jax.jit(
        lambda fs, bx: multiscale_roi_align(
            fs, bx, (output_size, output_size), sampling_ratio, aligned, SCALES
        )
    )
    out, vjp = jax.vjp(lambda fs: fn(fs, jnp.asarray(boxes)), [jnp.asarray(f) for f in feats])
    (grads,) = vjp(jnp.asarray(cot))

    ref_out, ref_grads = _torch_multiscale(feats, boxes, cot, output_size, sampling_ratio, aligned)
    assert out.shape == ref_out.shape == boxes.shape[:2] + (output_size, output_size, C_MS)
    assert _max_err(out, ref_out) <= ATOL
    for g, rg in zip(grads, ref_grads):
        assert np.abs(rg).sum() > 0  # every level receives gradient
        assert _max_err(g, rg) <= ATOL


def test_multiscale_padded_rows_are_finite_and_harmless(multiscale_data):
    feats, boxes = multiscale_data
    fs = [jnp.asarray(f) for f in feats]
    ref = multiscale_roi_align(fs, jnp.asarray(boxes), 7, 2, False, SCALES)
    # Padding: zeros, negative-area and far-away garbage rows appended to each image.
    pad = np.array(
        [[0, 0, 0, 0], [50, 60, 10, 5], [1e6, -1e6, 2e6, 3e6], [-5, -5, -1, -1]], np.float32
    )
    padded = np.concatenate([boxes, np.broadcast_to(pad, (2,) + pad.shape)], axis=1)
    out = multiscale_roi_align(fs, jnp.asarray(padded), 7, 2, False, SCALES)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out[:, : boxes.shape[1]]), np.asarray(ref))


def test_multiscale_compiles_once(multiscale_data):
    feats, boxes = multiscale_data
    traces = []

    @jax.jit
    def pool(fs, bx):
        traces.append(1)  # Python side effect: runs only while tracing
        return multiscale_roi_align(fs, bx, 7, 2, False, SCALES)

    fs = [jnp.asarray(f) for f in feats]
    a = pool(fs, jnp.asarray(boxes))
    fs2 = [f * 2.0 + 1.0 for f in fs]
    b = pool(fs2, jnp.asarray(boxes[:, ::-1] * 0.9))
    jax.block_until_ready((a, b))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
