"""Parity of maskx_jax.transform with torchvision's GeneralizedRCNNTransform (eval mode)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import transform as tv_transform

from maskx_jax import transform

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
TOL = 1e-5


def _tv(min_size: int, max_size: int, size_divisible: int = 32):
    return tv_transform.GeneralizedRCNNTransform(min_size, max_size, MEAN, STD, size_divisible=size_divisible).eval()


def _tv_run(images_uint8, min_size, max_size):
    tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255 for im in images_uint8]
    with torch.no_grad():
        image_list, _ = _tv(min_size, max_size)(tensors)
    return image_list.tensors.permute(0, 2, 3, 1).numpy(), np.array(image_list.image_sizes)


def _random_uint8(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize(
    "hw,min_size,max_size",
    [
        ((480, 640), 320, 512),
        ((333, 500), 320, 512),
        ((600, 250), 320, 512),  # tall: max_size decides
        ((1000, 700), 320, 512),  # downscale
        ((161, 240), 800, 1333),  # int(161 * (800 / 161)) == 799: torchvision's float floor
        ((480, 640), 800, 1333),  # the real default
    ],
)
def test_single_image_matches_torchvision(hw, min_size, max_size):
    rng = np.random.default_rng(hash(hw) % 2**32)
    img = _random_uint8(rng, *hw)
    ref, ref_sizes = _tv_run([img], min_size, max_size)
    out = transform.preprocess([img], min_size=min_size, max_size=max_size)
    assert out.images.dtype == np.float32
    assert out.images.shape == ref.shape
    np.testing.assert_array_equal(out.image_sizes, ref_sizes)
    np.testing.assert_array_equal(out.original_sizes, [hw])
    assert np.abs(out.images - ref).max() <= TOL
    if hw == (161, 240):
        assert out.image_sizes[0, 0] == 799


def test_batch_padding_matches_torchvision():
    rng = np.random.default_rng(1)
    imgs = [_random_uint8(rng, 480, 640), _random_uint8(rng, 600, 250), _random_uint8(rng, 333, 500)]
    ref, ref_sizes = _tv_run(imgs, 320, 512)
    out = transform.preprocess(imgs, min_size=320, max_size=512)
    assert out.images.shape == ref.shape
    np.testing.assert_array_equal(out.image_sizes, ref_sizes)
    np.testing.assert_array_equal(out.original_sizes, [[480, 640], [600, 250], [333, 500]])
    assert np.abs(out.images - ref).max() <= TOL
    assert out.image_sizes.dtype == np.int32 and out.original_sizes.dtype == np.int32


def test_resize_image_scale_and_interpolation():
    rng = np.random.default_rng(2)
    img = rng.random((37, 53, 3), dtype=np.float32)
    out, scale = transform.resize_image(img, min_size=64, max_size=100)
    assert scale == min(64 / 37, 100 / 53)
    ref = F.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None],
        scale_factor=scale,
        mode="bilinear",
        recompute_scale_factor=True,
        align_corners=False,
    )[0].permute(1, 2, 0).numpy()
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= TOL


def test_normalize_matches_torchvision():
    rng = np.random.default_rng(3)
    img = rng.random((20, 30, 3), dtype=np.float32)
    ref = _tv(800, 1333).normalize(torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(transform.normalize(img), ref)


def test_float_input_equals_uint8_over_255():
    rng = np.random.default_rng(4)
    img = _random_uint8(rng, 90, 120)
    a = transform.preprocess([img], 64, 100)
    b = transform.preprocess([img.astype(np.float32) / np.float32(255)], 64, 100)
    np.testing.assert_array_equal(a.images, b.images)


def test_grayscale_and_rgba_inputs():
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    want = transform.preprocess([rgb], 64, 100)
    for variant in (gray, gray[:, :, None]):
        got = transform.preprocess([variant], 64, 100)
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.image_sizes, want.image_sizes)
    color = _random_uint8(rng, 70, 90)
    rgba = np.concatenate([color, rng.integers(0, 256, (70, 90, 1), dtype=np.uint8)], axis=2)
    np.testing.assert_array_equal(
        transform.preprocess([rgba], 64, 100).images, transform.preprocess([color], 64, 100).images
    )
    with pytest.raises(ValueError):
        transform.preprocess([np.zeros((10, 10, 2), np.uint8)])
    with pytest.raises(TypeError):
        transform.preprocess([np.zeros((10, 10, 3), np.int32)])


def test_pad_to_fixed_size():
    rng = np.random.default_rng(6)
    imgs = [_random_uint8(rng, 480, 640), _random_uint8(rng, 333, 500)]
    ref, ref_sizes = _tv_run(imgs, 320, 512)
    out = transform.preprocess(imgs, 320, 512, pad_to=(512, 512))
    assert out.images.shape == (2, 512, 512, 3)
    np.testing.assert_array_equal(out.image_sizes, ref_sizes)
    hp, wp = ref.shape[1:3]
    assert np.abs(out.images[:, :hp, :wp] - ref).max() <= TOL
    assert not out.images[:, hp:].any() and not out.images[:, :, wp:].any()
    with pytest.raises(ValueError, match="too small"):
        transform.preprocess(imgs, 320, 512, pad_to=(320, 448))  # 333x500 -> 320x480
    with pytest.raises(ValueError, match="size_divisible"):
        transform.preprocess(imgs, 320, 512, pad_to=(500, 500))


def test_resize_boxes_matches_torchvision():
    rng = np.random.default_rng(7)
    boxes = (rng.random((2, 25, 4)) * 700).astype(np.float32)
    image_sizes = np.array([[800, 1066], [799, 1201]], np.int32)
    original_sizes = np.array([[480, 640], [333, 500]], np.int32)
    ref = np.stack(
        [
            tv_transform.resize_boxes(torch.from_numpy(boxes[i]), list(image_sizes[i]), list(original_sizes[i])).numpy()
            for i in range(2)
        ]
    )
    # Batched NumPy, per-image NumPy, and jitted JAX must all give torchvision's float32 numbers.
    got_np = transform.resize_boxes(boxes, image_sizes, original_sizes)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
    np.testing.assert_array_equal(got_np, ref)
    np.testing.assert_array_equal(transform.resize_boxes(boxes[1], image_sizes[1], original_sizes[1]), ref[1])
    got_jax = jax.jit(transform.resize_boxes)(jnp.asarray(boxes), jnp.asarray(image_sizes), jnp.asarray(original_sizes))
    assert isinstance(got_jax, jax.Array)
    np.testing.assert_array_equal(np.asarray(got_jax), ref)


@pytest.mark.parametrize("hw, out_hw", [((480, 640), (800, 1066)), ((1000, 700), (512, 358)), ((37, 53), (64, 91)),
                                        ((5, 1), (9, 2))])
def test_bilinear_resize_is_the_plain_two_pass_formula_bitwise(hw, out_hw):
    """The in-place implementation rounds exactly as ``a * w0 + b * w1`` per pass (width, then height)."""
    rng = np.random.default_rng(sum(hw))
    img = transform.normalize(rng.random((*hw, 3), dtype=np.float32))
    y0, y1, hy0, hy1 = transform._bilinear_axis(hw[0], out_hw[0])
    x0, x1, wx0, wx1 = transform._bilinear_axis(hw[1], out_hw[1])
    rows = img[:, x0] * wx0[None, :, None] + img[:, x1] * wx1[None, :, None]
    ref = rows[y0] * hy0[:, None, None] + rows[y1] * hy1[:, None, None]
    got = transform.bilinear_resize(img, *out_hw)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
