"""Parity of maskx_jax.paste with torchvision's paste_masks_in_image."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

from maskx_jax import paste

TOL = 1e-5


def _random_boxes(rng, n, height, width, min_side=0.1, max_side=1500.0):
    """Centres inside the image (so torchvision accepts them), sides log-uniform: tiny
    sub-pixel boxes, fractional corners, boxes partly outside and boxes far larger than the image."""
    centre = rng.random((n, 2)) * np.array([width, height])
    side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (n, 2)))
    return np.concatenate([centre - side / 2, centre + side / 2], axis=1).astype(np.float32)


def _torch_paste(masks, boxes, height, width, padding=1):
    with torch.no_grad():
        out = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (height, width), padding)
    return out[:, 0].numpy()


@pytest.mark.parametrize(
    "n,m,height,width,padding",
    [(40, 28, 120, 160, 1), (20, 28, 97, 61, 1), (12, 14, 50, 70, 2)],
)
def test_paste_matches_torchvision(n, m, height, width, padding):
    rng = np.random.default_rng(n + height)
    masks = rng.random((n, m, m), dtype=np.float32)
    boxes = _random_boxes(rng, n, height, width)
    # Hand-picked corner cases on top of the random ones.
    boxes[:6] = [
        [3.2, 4.7, 3.6, 5.1],  # < 1 px
        [-30.5, -12.25, 20.75, 30.5],  # off the top-left
        [width - 10.3, height - 7.9, width + 40.2, height + 35.6],  # off the bottom-right
        [-500.0, -400.0, width + 500.0, height + 400.0],  # huge
        [0.0, 0.0, float(width), float(height)],  # whole image
        [10.0, 10.0, 10.0, 10.0],  # degenerate
    ]
    ref = _torch_paste(masks, boxes, height, width, padding)
    got = np.asarray(paste.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), height, width, padding=padding))
    assert got.shape == (n, height, width) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= TOL
    np.testing.assert_array_equal(got > 0.5, ref > 0.5)


def test_expanded_integer_boxes_match_torchvision():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 20000, 800, 1333, max_side=2000.0)
    ref = expand_boxes(torch.from_numpy(boxes), 30 / 28).to(torch.int64).numpy()
    got = np.asarray(jax.jit(paste.expand_boxes_to_int, static_argnums=1)(jnp.asarray(boxes), 30 / 28))
    np.testing.assert_array_equal(got, ref)


def test_source_coordinate_is_torchs_float64_rounding():
    # torch evaluates scale * (dst + 0.5) - 0.5 in double and rounds once to float32.
    out_sizes = np.arange(1, 2500, dtype=np.int32)
    scale = np.repeat(np.float32(30) / out_sizes.astype(np.float32), 32)
    dst = np.concatenate([np.linspace(0, o - 1, 32).astype(np.int32) for o in out_sizes])
    want = (scale.astype(np.float64) * (dst + 0.5) - 0.5).astype(np.float32)
    got = np.asarray(jax.jit(paste._torch_source_coord)(jnp.asarray(scale), jnp.asarray(dst)))
    np.testing.assert_array_equal(got, want)


def test_batched_equals_per_image_and_compiles_once():
    rng = np.random.default_rng(3)
    b, n, height, width = 2, 7, 45, 66
    masks = rng.random((b, n, 28, 28), dtype=np.float32)
    boxes = np.stack([_random_boxes(rng, n, height, width, max_side=100.0) for _ in range(b)])
    batched = np.asarray(paste.paste_masks_batched(jnp.asarray(masks), jnp.asarray(boxes), height, width))
    assert batched.shape == (b, n, height, width)
    for i in range(b):
        ref = _torch_paste(masks[i], boxes[i], height, width)
        assert np.abs(batched[i] - ref).max() <= TOL

    # Same shapes, new values: no retrace.
    before = paste.paste_masks._cache_size()
    for seed in range(3):
        r = np.random.default_rng(100 + seed)
        out = paste.paste_masks(
            jnp.asarray(r.random((n, 28, 28), dtype=np.float32)),
            jnp.asarray(_random_boxes(r, n, 31, 29, max_side=50.0)),
            31,
            29,
        )
        out.block_until_ready()
    assert paste.paste_masks._cache_size() == before + 1
