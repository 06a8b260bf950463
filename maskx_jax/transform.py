"""Host-side (NumPy) image preprocessing with torchvision's ``GeneralizedRCNNTransform`` numbers.

A jit-compiled ``predict`` wants one static input shape, so the data-dependent parts of
torchvision's eval-mode transform (per-image resize, batch padding) run here on the host,
in NumPy, and reproduce torchvision bit for bit up to float32 summation order:

  1. integer images are divided by 255 (as ``torchvision.transforms.functional.to_tensor``);
  2. ``normalize``: ``(x - mean) / std`` per channel, before resizing (torchvision's order);
  3. ``resize_image``: torch's bilinear ``F.interpolate`` (``align_corners=False``, no
     antialias) with torchvision's scale rule;
  4. zero padding at the bottom/right to a common size (torchvision ``batch_images``), or to
     a fixed ``pad_to`` size.

``resize_boxes`` is the inverse mapping used by torchvision's ``postprocess`` and works on
NumPy and ``jax.numpy`` arrays alike.

Conventions: images are HWC RGB, boxes are XYXY in absolute pixels, sizes are (height, width).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PreprocessedBatch:
    """Output of :func:`preprocess`.

    Attributes:
      images: float32 [B, Hp, Wp, 3], normalised and resized images, zero-padded at the
        bottom/right (padding value 0 *after* normalisation, as torchvision).
      image_sizes: int32 [B, 2], (height, width) of each resized image before padding;
        what torchvision calls ``ImageList.image_sizes``.
      original_sizes: int32 [B, 2], (height, width) of each input image.
    """

    images: np.ndarray
    image_sizes: np.ndarray
    original_sizes: np.ndarray


def to_rgb_float(image: np.ndarray) -> np.ndarray:
    """Converts one input image to float32 RGB in [0, 1].

    Args:
      image: [H, W] or [H, W, 1] (grayscale, replicated to 3 channels), [H, W, 3] (RGB) or
        [H, W, 4] (RGBA; the alpha channel is dropped, not composited). uint8 images in
        0..255 are divided by 255 in float32 (as torchvision's ``to_tensor``); uint16 images
        (16-bit PNGs) are first scaled to 8 bits as the data pipeline does
        (``round(v / 257)``, see ``data.image_io``); float images must already be in [0, 1]
        and are cast to float32.

    Returns:
      float32 [H, W, 3].
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    if image.dtype == np.uint16:
        image = np.clip(np.round(image.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    channels = image.shape[2]
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 4:
        image = image[:, :, :3]
    elif channels != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels} (shape {image.shape})")
    if image.dtype == np.uint8:
        # Division (not multiplication by 1/255) so the values equal torch's img.float() / 255.
        return image.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(f"expected a uint8 or floating image, got dtype {image.dtype}")


def normalize(
    image: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Per-channel ``(image - mean) / std`` in float32, as ``GeneralizedRCNNTransform.normalize``.

    Args:
      image: float [H, W, 3] RGB in [0, 1] (any leading dims allowed; channels last).
      mean, std: 3 per-channel floats (RGB), converted to float32 as torchvision does.

    Returns:
      float32 array of the same shape.
    """
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    # A true division, not a multiply by 1/std, to round exactly like torch (in place: one array, not two).
    out = np.subtract(np.asarray(image, dtype=np.float32), mean32)
    out /= std32
    return out


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """torchvision's eval-mode resize factor (a Python float, i.e. float64)."""
    return min(min_size / min(height, width), max_size / max(height, width))


def _bilinear_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's 1-D linear interpolation (align_corners=False).

    torch (aten UpSample.h) uses ``scale = float(in) / float(out)`` in float32, then
    ``src = scale * (dst + 0.5) - 0.5`` where ``dst + 0.5`` is a C++ double, so the whole
    expression is evaluated in float64 and rounded once to float32. Since a float32 times a
    half-integer is exact in float64, computing it in float64 here and casting reproduces
    that single rounding exactly (a pure float32 evaluation is off by up to an ulp of
    ``src``, i.e. ~1e-4 on 1000-pixel axes, which shows in the output).

    Returns:
      (i0 int64 [out], i1 int64 [out], w0 float32 [out], w1 float32 [out]) with
      ``out[d] = w0[d] * in[i0[d]] + w1[d] * in[i1[d]]``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    w0 = np.float32(1.0) - w1
    return i0, i1, w0, w1


def bilinear_resize(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """torch ``F.interpolate(mode='bilinear', align_corners=False, antialias=False)`` to a size.

    Args:
      image: float32 [H, W, C] (channels last).
      out_height, out_width: output size in pixels.

    Returns:
      float32 [out_height, out_width, C]. Interpolates along the width first and the height
      second, the nesting torch's generic CPU kernel uses.
    """
    image = np.asarray(image, dtype=np.float32)
    in_h, in_w = image.shape[:2]
    y0, y1, hy0, hy1 = _bilinear_axis(in_h, out_height)
    x0, x1, wx0, wx1 = _bilinear_axis(in_w, out_width)
    # Each pass is ``low * w_low + high * w_high`` in float32, rounded after every operation exactly as
    # ``a * w0 + b * w1`` would be; np.take and in-place products only avoid temporaries (3x faster for a
    # 480x640 -> 800x1066 photo, the training pipeline's costliest step; bitwise the same, tested).
    rows = np.take(image, x0, axis=1)  # [H, out_w, C]
    rows *= wx0[None, :, None]
    high = np.take(image, x1, axis=1)
    high *= wx1[None, :, None]
    rows += high
    out = np.take(rows, y0, axis=0)  # [out_h, out_w, C]
    out *= hy0[:, None, None]
    high = np.take(rows, y1, axis=0)
    high *= hy1[:, None, None]
    out += high
    return out


def resize_image(
    image: np.ndarray, min_size: int = 800, max_size: int = 1333
) -> tuple[np.ndarray, float]:
    """Resizes like torchvision's eval-mode ``GeneralizedRCNNTransform.resize``.

    ``scale = min(min_size / min(H, W), max_size / max(H, W))`` (Python floats); the output
    size is ``int(H * scale), int(W * scale)`` (``recompute_scale_factor=True``: so e.g. an
    image whose short side gives 799.9999 gets 799 rows, exactly as torchvision), and the
    bilinear interpolation then uses ``in / out`` as its scale, not ``1 / scale``.

    Args:
      image: float32 [H, W, C] (HWC; any channel count).
      min_size, max_size: torchvision's ``min_size`` (eval uses the last one) and ``max_size``.

    Returns:
      (resized float32 [h, w, C], scale: float), with scale the factor requested above.
    """
    height, width = image.shape[:2]
    scale = resize_scale(height, width, float(min_size), float(max_size))
    # At least one pixel: a very elongated image (e.g. 4 x 600) would otherwise lose its short side
    # (torchvision raises there); the training pipeline (data.prepare.fit_size) clamps the same way.
    out_h = max(int(math.floor(float(height) * scale)), 1)
    out_w = max(int(math.floor(float(width) * scale)), 1)
    return bilinear_resize(image, out_h, out_w), scale


def _round_up(size: int, divisor: int) -> int:
    """torchvision batch_images: ``int(ceil(float(size) / divisor) * divisor)``."""
    return int(math.ceil(float(size) / float(divisor)) * divisor)


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
    pad_to: tuple[int, int] | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> PreprocessedBatch:
    """torchvision ``GeneralizedRCNNTransform`` (eval) on the host: normalise, resize, pad.

    Args:
      images: a sequence of B images (or a [B, H, W, C] array), each [H, W] or [H, W, 1]
        (grayscale, replicated to RGB), [H, W, 3] (RGB) or [H, W, 4] (RGBA, alpha dropped);
        uint8 in 0..255 (divided by 255), uint16 (scaled to 8 bits first) or float in [0, 1].
        Sizes may differ; any size of at least 1 x 1 works.
      min_size, max_size: resize rule, see :func:`resize_image`.
      size_divisible: the padded height/width are the batch maxima rounded up to a multiple
        of this (torchvision default 32).
      pad_to: optional fixed (Hp, Wp) to pad every batch to, so that a jitted model sees one
        static shape. Must be multiples of ``size_divisible`` and hold every resized image.
        With ``model.exact_canvas`` (the default) the model gives each image torchvision's
        numbers for that image alone on any canvas; without it, only when ``pad_to`` equals
        the size torchvision would pad to (a larger canvas changes the features next to the
        border of torchvision's padding).
      image_mean, image_std: per-channel RGB normalisation constants.

    Returns:
      :class:`PreprocessedBatch` (images float32 [B, Hp, Wp, 3], image_sizes int32 [B, 2],
      original_sizes int32 [B, 2]).

    Raises:
      ValueError: empty batch, bad image shape, ``pad_to`` not a multiple of
        ``size_divisible``, or a resized image larger than ``pad_to``.
    """
    images = list(images)
    if not images:
        raise ValueError("preprocess needs at least one image")
    resized = []
    original_sizes = []
    for image in images:
        rgb = to_rgb_float(image)
        original_sizes.append(rgb.shape[:2])
        # Normalise before resizing: torchvision's order (it matters at the float32 ulp level).
        out, _ = resize_image(normalize(rgb, image_mean, image_std), min_size, max_size)
        resized.append(out)
    sizes = np.array([r.shape[:2] for r in resized], dtype=np.int32)
    if pad_to is None:
        pad_h = _round_up(int(sizes[:, 0].max()), size_divisible)
        pad_w = _round_up(int(sizes[:, 1].max()), size_divisible)
    else:
        pad_h, pad_w = (int(pad_to[0]), int(pad_to[1]))
        if pad_h % size_divisible or pad_w % size_divisible:
            raise ValueError(
                f"pad_to={tuple(pad_to)} must be multiples of size_divisible={size_divisible}"
            )
        too_big = [
            (i, tuple(s)) for i, s in enumerate(sizes.tolist()) if s[0] > pad_h or s[1] > pad_w
        ]
        if too_big:
            raise ValueError(
                f"pad_to={(pad_h, pad_w)} is too small: resized image(s) (index, (h, w)) {too_big} "
                f"do not fit (min_size={min_size}, max_size={max_size})"
            )
    batch = np.zeros((len(resized), pad_h, pad_w, 3), dtype=np.float32)
    for i, r in enumerate(resized):
        batch[i, : r.shape[0], : r.shape[1]] = r
    return PreprocessedBatch(
        images=batch,
        image_sizes=sizes,
        original_sizes=np.array(original_sizes, dtype=np.int32),
    )


def resize_boxes(boxes, image_sizes, original_sizes):
    """Maps boxes from resized-image pixels back to original-image pixels (torchvision postprocess).

    ``ratio = float32(original) / float32(resized)`` per axis, then ``x * ratio_w`` and
    ``y * ratio_h`` in float32, exactly as torchvision's ``resize_boxes``.

    Args:
      boxes: float [..., N, 4] XYXY absolute pixels in the resized image.
      image_sizes: int or float [..., 2], (height, width) of the resized image(s); leading
        dims match ``boxes.shape[:-2]`` (e.g. [2] for [N, 4] boxes, [B, 2] for [B, N, 4]).
      original_sizes: [..., 2], (height, width) of the original image(s).

    Returns:
      float32 [..., N, 4], a NumPy array for NumPy inputs, otherwise a ``jax.Array``
      (jit-compatible).
    """
    if all(isinstance(a, (np.ndarray, list, tuple, int, float)) for a in (boxes, image_sizes, original_sizes)):
        xp = np
    else:
        import jax.numpy as xp  # only when given JAX arrays: keeps this module NumPy-only by default
    boxes = xp.asarray(boxes, dtype=xp.float32)
    resized = xp.asarray(image_sizes).astype(xp.float32)
    original = xp.asarray(original_sizes).astype(xp.float32)
    ratio = original / resized  # [..., 2] = (ratio_h, ratio_w), float32 as torchvision
    ratio_h = ratio[..., 0:1, None]  # [..., 1, 1] broadcasts over the N boxes
    ratio_w = ratio[..., 1:2, None]
    scale = xp.concatenate([ratio_w, ratio_h, ratio_w, ratio_h], axis=-1)  # [..., 1, 4]
    return boxes * scale
