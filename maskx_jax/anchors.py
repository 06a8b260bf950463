"""RPN anchors, reproducing ``torchvision.models.detection.anchor_utils.AnchorGenerator`` exactly.

Anchors depend only on static shapes (padded input size, feature-map sizes) and configuration,
so they are computed with NumPy at trace time and enter jitted code as constants. Results are
cached on the (hashable) static arguments.

Every anchor is XYXY in absolute pixels of the padded input, float32. Order (as torchvision):
FPN level, then feature-map location in row-major (y, x) order, then cell anchor (aspect ratio
major, size minor).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

DEFAULT_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5


@functools.lru_cache(maxsize=None)
def _cell_anchors_cached(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> np.ndarray:
    # Every step in float32 as torchvision (float32 tensors): h = sqrt(ar), w = 1 / h.
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
    # np.round and torch.round both round half to even.
    out = np.round(base).astype(np.float32)
    out.setflags(write=False)  # shared by the cache
    return out


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors of one level (``AnchorGenerator.generate_anchors``).

    Args:
      sizes: anchor sizes (sqrt of area) in pixels, e.g. (32,).
      aspect_ratios: height / width ratios, e.g. (0.5, 1.0, 2.0).

    Returns:
      [A, 4] float32 (read-only) XYXY offsets around a location, A = len(aspect_ratios) *
      len(sizes), ordered aspect-ratio major, size minor; values rounded to integers.
    """
    return _cell_anchors_cached(tuple(sizes), tuple(float(a) for a in aspect_ratios))


@functools.lru_cache(maxsize=None)
def _anchor_grid_cached(
    image_size: tuple[int, int],
    feature_sizes: tuple[tuple[int, int], ...],
    sizes: tuple[tuple[float, ...], ...],
    aspect_ratios: tuple[tuple[float, ...], ...],
) -> tuple[np.ndarray, tuple[int, ...]]:
    if not (len(feature_sizes) == len(sizes) == len(aspect_ratios)):
        raise ValueError(
            f"need one sizes/aspect_ratios entry per feature map: {len(feature_sizes)} feature maps, "
            f"{len(sizes)} sizes, {len(aspect_ratios)} aspect ratios"
        )
    per_level = []
    for (gh, gw), s, ar in zip(feature_sizes, sizes, aspect_ratios):
        # Integer strides from the padded input size, exactly as torchvision (floor division).
        stride_h = image_size[0] // gh
        stride_w = image_size[1] // gw
        shifts_x = np.arange(gw, dtype=np.int64) * stride_w
        shifts_y = np.arange(gh, dtype=np.int64) * stride_h
        shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x = shift_x.reshape(-1)
        shift_y = shift_y.reshape(-1)
        # torch promotes int64 + float32 to float32 (integer -> float32 cast, then float32 add).
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1).astype(np.float32)
        base = cell_anchors(s, ar)
        per_level.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    anchors = np.concatenate(per_level, axis=0).astype(np.float32)
    anchors.setflags(write=False)  # shared by the cache
    return anchors, tuple(int(a.shape[0]) for a in per_level)


def anchor_grid(
    image_size: Sequence[int],
    feature_sizes: Sequence[Sequence[int]],
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
) -> tuple[np.ndarray, list[int]]:
    """All anchors of one (padded) image, as torchvision's ``AnchorGenerator.forward``.

    Args:
      image_size: (H, W) of the padded input batch (static ints); strides are
        H // h_l and W // w_l.
      feature_sizes: [(h_l, w_l), ...] spatial size of each FPN level (static ints).
      sizes: per-level anchor sizes, e.g. ((32,), (64,), (128,), (256,), (512,)).
      aspect_ratios: per-level height/width ratios, e.g. ((0.5, 1.0, 2.0),) * 5.

    Returns:
      anchors: [sum_l h_l * w_l * A_l, 4] float32 (read-only, cached) XYXY absolute pixels of the
        padded input; order level, then location row-major, then cell anchor.
      counts: list of h_l * w_l * A_l per level.
    """
    anchors, counts = _anchor_grid_cached(
        (int(image_size[0]), int(image_size[1])),
        tuple((int(h), int(w)) for h, w in feature_sizes),
        tuple(tuple(s) for s in sizes),
        tuple(tuple(float(a) for a in ar) for ar in aspect_ratios),
    )
    return anchors, list(counts)


def anchor_grid_per_image(
    extent,
    feature_sizes: Sequence[Sequence[int]],
    strides: Sequence[int],
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
):
    """Each image's own torchvision anchors laid out on a shared canvas (traced; ``model.exact_canvas``).

    torchvision builds the anchors of an image from the tensor it runs on, the image rounded up to 32
    (``extent``): level ``l`` has a grid of ``g = ceil(extent / strides[l])`` locations spaced
    ``extent // g`` apart, which is ``strides[l]`` except at P6 when ``extent / 32`` is odd (e.g. 48 for a
    96-pixel extent). Here every image gets the canvas's grid of ``feature_sizes`` locations in the order of
    :func:`anchor_grid`, with its own spacing, and ``valid`` marks the locations inside its grid.

    Args:
      extent: [N, 2] int32 (h, w), each image's size rounded up to 32 (:func:`maskx_jax.canvas.padded_extent`).
      feature_sizes: canvas grid (h_l, w_l) per level (static).
      strides: nominal stride per level (static), e.g. (4, 8, 16, 32, 64).
      sizes, aspect_ratios: as :func:`anchor_grid`.

    Returns:
      anchors [N, T, 4] float32 (rows of locations outside an image's grid are finite but meaningless) and
      valid [N, T] bool; T = sum_l h_l * w_l * A_l, the layout of :func:`anchor_grid` on the canvas.
    """
    import jax.numpy as jnp

    extent = jnp.asarray(extent, jnp.int32)
    anchors, valid = [], []
    for (gh, gw), stride, s, ar in zip(feature_sizes, strides, sizes, aspect_ratios):
        grid = (extent + stride - 1) // stride  # [N, 2]
        spacing = extent // grid  # torchvision: image_size // grid_size
        ys = jnp.arange(gh, dtype=jnp.int32)
        xs = jnp.arange(gw, dtype=jnp.int32)
        shift_y = jnp.broadcast_to((ys[None, :] * spacing[:, :1])[:, :, None], (extent.shape[0], gh, gw))
        shift_x = jnp.broadcast_to((xs[None, :] * spacing[:, 1:])[:, None, :], (extent.shape[0], gh, gw))
        inside = (ys[None, :, None] < grid[:, 0, None, None]) & (xs[None, None, :] < grid[:, 1, None, None])
        # int -> float32, then one float32 add, as torch's int64 + float32 promotion.
        shifts = jnp.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).astype(jnp.float32).reshape(-1, gh * gw, 1, 4)
        base = jnp.asarray(cell_anchors(s, ar))
        anchors.append((shifts + base[None, None]).reshape(extent.shape[0], -1, 4))
        valid.append(jnp.repeat(inside.reshape(-1, gh * gw), base.shape[0], axis=1))
    return jnp.concatenate(anchors, axis=1), jnp.concatenate(valid, axis=1)
