"""RoIAlign and FPN multi-scale RoIAlign with torchvision's exact numerics.

Conventions:
  * features are NHWC float arrays;
  * boxes are XYXY in absolute input-image pixels (float32);
  * pooled outputs are [..., ph, pw, C].

Both poolers reproduce torchvision's compiled CPU kernel (``torchvision.ops.roi_align``)
with a fixed ``sampling_ratio`` (the adaptive mode, ``sampling_ratio <= 0``, picks a
data-dependent number of samples per bin and cannot have static shapes).

Implementation: bilinear sampling is separable, so per RoI we compute, once per axis,
the two neighbouring pixel indices and weights of every sample (``_axis_samples``). The
sample grid of a RoI is then the outer product of its y- and x-samples: one gather of
[R, ph, 2*grid, pw, 2*grid] pixels from a flattened feature array, weighted by the outer
product of the y- and x-weights and summed per bin. The multi-scale pooler flattens all
pyramid levels into one array and only changes each RoI's base offset, row stride, size
and scale, so it is the same single gather regardless of the number of levels. On CPU the
gather (and its transpose, a scatter-add) runs a few RoIs at a time so the taps stay in cache
(``weighted_gather``, ``roi_chunk_size``).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array
IntPair = Union[int, Tuple[int, int], Sequence[int]]


def _pair(output_size: IntPair) -> Tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    ph, pw = output_size
    return int(ph), int(pw)


def _check_sampling_ratio(sampling_ratio: int) -> int:
    if int(sampling_ratio) != sampling_ratio or sampling_ratio < 1:
        raise ValueError(
            f"sampling_ratio must be an int >= 1, got {sampling_ratio!r}: torchvision's adaptive "
            "sampling (sampling_ratio <= 0) has a data-dependent sample count, hence no static shape."
        )
    return int(sampling_ratio)


def _ieee_div(x: Array, d: float) -> Array:
    """x / d, rounded once as IEEE float32 division (torch's op), never as x * (1/d).

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal,
    which is off by up to 1 ulp; on sample coordinates of ~100 px that moves the bilinear
    weights by ~1e-5. Routing a full-shaped divisor through an optimisation barrier keeps
    the division as written.

    Args:
      x: float32 array of any shape.
      d: python number (static divisor).

    Returns:
      x / d with the shape and dtype of x.
    """
    divisor = jax.lax.optimization_barrier(jnp.full(x.shape, d, x.dtype))
    return x / divisor


def _rounded_product(q: Array) -> Array:
    """Return the float32 product ``q`` rounded on its own, before it is added to anything.

    Under jit, XLA/LLVM contract ``a * b + c`` into one fused multiply-add (no intermediate
    rounding); torchvision's CPU kernel rounds the product first. The 1-ulp difference on a
    sample coordinate moves bilinear weights by up to ~1e-5. A select on the product hides the
    multiply from the contraction; the NaN/inf branch is never taken for finite inputs.

    Args:
      q: float32 array (a product), any shape.

    Returns:
      q unchanged for finite values, 0 where q is not finite.
    """
    return jnp.where(jnp.isfinite(q), q, 0.0)


def _axis_samples(
    start: Array, extent: Array, pooled: int, grid: int, size: Array
) -> Tuple[Array, Array]:
    """Bilinear taps along one axis (y or x) for every sample of every RoI.

    Args:
      start: [R] float32, RoI start on this axis in feature-map pixels (already scaled/offset).
      extent: [R] float32, RoI length on this axis in feature-map pixels (already clamped to
        >= 1 when not aligned).
      pooled: static number of output bins on this axis.
      grid: static number of samples per bin on this axis.
      size: [R] or scalar float32, feature-map length on this axis (H or W) of the level the
        RoI is pooled from; integral values.

    Returns:
      idx: [R, pooled, 2*grid] int32, pixel index of the low / high tap of each sample,
        interleaved (low of sample 0, high of sample 0, low of sample 1, ...). Always in
        [0, size-1], even for samples that fall outside the map.
      weight: [R, pooled, 2*grid] float32, matching 1-D bilinear weights (hy/ly or hx/lx);
        both taps of a sample outside [-1, size] get weight 0.
    """
    size = jnp.asarray(size, jnp.float32)
    if size.ndim:
        size = size[:, None, None]
    bin_size = _ieee_div(extent, pooled)[:, None, None]  # [R, 1, 1]
    p = jnp.arange(pooled, dtype=jnp.float32)[None, :, None]
    i = jnp.arange(grid, dtype=jnp.float32)[None, None, :]
    # Same float32 operation order as the kernel:
    # (start + p * bin) + ((i + 0.5) * bin) / grid. Changing the order could move a sample
    # across an integer pixel boundary and change which taps it reads.
    coord = (
        start[:, None, None] + _rounded_product(p * bin_size) + _ieee_div((i + 0.5) * bin_size, grid)
    )  # [R, pooled, grid]

    # The kernel drops samples more than one pixel outside the map.
    valid = (coord >= -1.0) & (coord <= size)
    c = jnp.maximum(coord, 0.0)
    low = jnp.floor(c)
    # At (or past) the last pixel both taps collapse onto it with all weight on the low tap.
    # Doing this in float before the int cast also keeps huge invalid coordinates in range.
    at_edge = low >= size - 1.0
    low = jnp.where(at_edge, size - 1.0, low)
    high = jnp.where(at_edge, size - 1.0, low + 1.0)
    frac = jnp.where(at_edge, 0.0, c - low)  # ly / lx
    w_low = jnp.where(valid, 1.0 - frac, 0.0)  # hy / hx
    w_high = jnp.where(valid, frac, 0.0)

    r = coord.shape[0]
    idx = jnp.stack([low, high], axis=-1).astype(jnp.int32).reshape(r, pooled, 2 * grid)
    weight = jnp.stack([w_low, w_high], axis=-1).reshape(r, pooled, 2 * grid)
    return idx, weight


def roi_chunk_size(platform: str | None = None) -> int:
    """RoIs pooled per step of :func:`weighted_gather` on ``platform`` (default: JAX's default backend).

    On CPU the [R, ph, 2g, pw, 2g, C] tap array of a whole batch (~800 MiB for 1024 RoIs at 7x7,
    C = 256) does not fit in cache, and gathering it in one piece is memory-bound; 8 RoIs at a
    time (~6 MiB) stay in cache and run ~3x faster forward and ~2x backward
    (``benchmarks/roi_align.py``). Accelerators prefer the one big gather: 0 = no chunking.
    """
    return 8 if (platform or jax.default_backend()) == "cpu" else 0


def _chunked(x: Array, chunk: int) -> Array:
    """[R, ...] -> [ceil(R / chunk), chunk, ...], zero-padded at the end."""
    pad = (-x.shape[0]) % chunk
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _gather_sum(flat: Array, idx: Array, w: Array) -> Array:
    vals = jnp.take(flat, idx, axis=0, mode="clip")  # [R, ph, 2g, pw, 2g, C]
    return jnp.sum(vals * w[..., None].astype(flat.dtype), axis=(2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def weighted_gather(flat: Array, idx: Array, w: Array, chunk: int) -> Array:
    """``out[r, i, j] = sum_{a, b} w[r, i, a, j, b] * flat[idx[r, i, a, j, b]]``: RoIAlign's taps.

    Args:
      flat: [P, C] float, the pixels.
      idx: [R, ph, T, pw, T] int32 rows of ``flat``, in range (indices are clipped, not checked).
      w: [R, ph, T, pw, T] float32 weights; no gradient flows to them (RoIAlign has none w.r.t. boxes).
      chunk: static; > 0 pools that many RoIs per step of a ``lax.map`` (and scatters the gradient
        per chunk in a ``lax.scan``), 0 gathers all at once (see :func:`roi_chunk_size`).

    Returns:
      [R, ph, pw, C] in the dtype of ``flat``.
    """
    if chunk <= 0 or idx.shape[0] <= chunk:
        return _gather_sum(flat, idx, w)
    r = idx.shape[0]
    out = jax.lax.map(lambda a: _gather_sum(flat, *a), (_chunked(idx, chunk), _chunked(w, chunk)))
    return out.reshape((-1,) + out.shape[2:])[:r]


def _weighted_gather_fwd(flat, idx, w, chunk):
    return weighted_gather(flat, idx, w, chunk), (jnp.zeros((0,) + flat.shape, flat.dtype), idx, w)


def _weighted_gather_bwd(chunk, res, g):
    # The transpose of the gather: scatter-add w * g into the pixels (a chunk at a time on CPU, so
    # the [chunk, ph, T, pw, T, C] update block stays in cache and the sum is updated in place).
    like, idx, w = res
    p, c = like.shape[1:]

    def updates(i, wt, gt):
        u = wt[..., None].astype(gt.dtype) * gt[:, :, None, :, None, :]  # [k, ph, T, pw, T, C]
        return i.reshape(-1), u.reshape(-1, c)

    zero = jnp.zeros((p, c), g.dtype)
    if chunk <= 0 or idx.shape[0] <= chunk:
        i, u = updates(idx, w, g)
        d_flat = zero.at[i].add(u, mode="promise_in_bounds")
    else:
        def body(acc, a):
            i, u = updates(*a)
            return acc.at[i].add(u, mode="promise_in_bounds"), None

        # Padded RoIs have index 0 and weight 0: they add zeros to pixel 0.
        d_flat, _ = jax.lax.scan(body, zero, (_chunked(idx, chunk), _chunked(w, chunk), _chunked(g, chunk)))
    return d_flat.astype(like.dtype), None, None


weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)


def _pool_flat(
    flat: Array,
    boxes: Array,
    scale: Union[float, Array],
    height: Union[float, Array],
    width: Union[float, Array],
    base: Array,
    output_size: Tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    row_width: Union[float, Array, None] = None,
) -> Array:
    """RoIAlign of R boxes whose pixels live in one flat [P, C] array.

    Pixel (y, x) of RoI r is row ``base[r] + y * row_width[r] + x`` of ``flat``.

    Args:
      flat: [P, C] float, flattened (image, level, y, x) pixels.
      boxes: [R, 4] float32 XYXY in input-image pixels.
      scale: python float or [R] float32, feature-map pixels per image pixel of each RoI's map.
      height, width: python int/float or [R] float32, size of each RoI's feature map.
      base: [R] int32, flat row of pixel (0, 0) of each RoI's feature map.
      output_size: (ph, pw) static.
      sampling_ratio: static samples per bin side (>= 1).
      aligned: static; half-pixel offset as in torchvision.
      row_width: width of each RoI's map as stored in ``flat``, when samples are clamped to a smaller
        ``width`` (an image's extent on a canvas); default ``width``.

    Returns:
      [R, ph, pw, C], dtype of ``flat``.
    """
    ph, pw = output_size
    grid = sampling_ratio
    # torchvision's RoIAlign has no gradient w.r.t. boxes; also keeps floor() out of autodiff.
    boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
    scale = jnp.asarray(scale, jnp.float32)
    offset = 0.5 if aligned else 0.0
    scaled = _rounded_product(boxes * (scale[:, None] if scale.ndim else scale)) - offset  # [R, 4]
    x1, y1, x2, y2 = (scaled[:, k] for k in range(4))
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        # Legacy (non-aligned) RoIAlign forces malformed/tiny RoIs to be at least 1x1.
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)

    y_idx, y_w = _axis_samples(y1, roi_h, ph, grid, height)  # [R, ph, 2g]
    x_idx, x_w = _axis_samples(x1, roi_w, pw, grid, width)  # [R, pw, 2g]

    width_i = jnp.asarray(width if row_width is None else row_width, jnp.int32)
    stride = width_i[:, None, None] if width_i.ndim else width_i
    rows = base[:, None, None].astype(jnp.int32) + y_idx * stride  # [R, ph, 2g]
    idx = rows[:, :, :, None, None] + x_idx[:, None, None, :, :]  # [R, ph, 2g, pw, 2g]
    # w = (1-D y weight) * (1-D x weight): the kernel's hy*hx, hy*lx, ly*hx, ly*lx.
    w = y_w[:, :, :, None, None] * x_w[:, None, None, :, :]
    # Plain division here: exact for the usual power-of-two counts, at most 1 ulp otherwise, and
    # an output-sized barrier operand (see _ieee_div) would cost a full extra array.
    out = weighted_gather(flat, idx, w, roi_chunk_size()) / float(grid * grid)
    return out.astype(flat.dtype)


def roi_align(
    features: Array,
    boxes: Array,
    batch_idx: Array,
    output_size: IntPair,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Array:
    """``torchvision.ops.roi_align`` on NHWC features (fixed sampling ratio only).

    Args:
      features: [B, H, W, C] float.
      boxes: [R, 4] float32, XYXY in input-image pixels (multiplied by ``spatial_scale``).
      batch_idx: [R] int32, image of each box in [0, B).
      output_size: static (ph, pw) or int.
      spatial_scale: python float, feature-map pixels per input-image pixel.
      sampling_ratio: python int >= 1, samples per bin side.
      aligned: python bool, half-pixel correction (``aligned=True`` in torchvision).

    Returns:
      [R, ph, pw, C] with the dtype of ``features``. No gradient flows to ``boxes``.

    Raises:
      ValueError: if ``sampling_ratio`` < 1 (adaptive sampling has no static shape).
    """
    grid = _check_sampling_ratio(sampling_ratio)
    b, h, w, c = features.shape
    flat = features.reshape(b * h * w, c)
    base = jnp.asarray(batch_idx, jnp.int32) * (h * w)
    return _pool_flat(
        flat, boxes, float(spatial_scale), float(h), float(w), base, _pair(output_size), grid, bool(aligned)
    )


def assign_levels(
    boxes: Array,
    k_min: int = 2,
    k_max: int = 5,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Array:
    """FPN level of each box, as torchvision's ``LevelMapper`` (absolute level, not minus k_min).

    level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), k_min, k_max)
    computed in float32 in the same order as torchvision.

    Args:
      boxes: [..., 4] float32 XYXY.

    Returns:
      [...] int32 in [k_min, k_max]. Degenerate boxes (zero area) map to k_min like torchvision;
      boxes with negative area (NaN in torchvision) also map to k_min here so padded rows stay
      in range.
    """
    boxes = boxes.astype(jnp.float32)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s = jnp.sqrt(area)
    lvl = jnp.floor(canonical_level + jnp.log2(_ieee_div(s, canonical_scale)) + jnp.float32(eps))
    lvl = jnp.where(jnp.isnan(lvl), float(k_min), lvl)
    return jnp.clip(lvl, k_min, k_max).astype(jnp.int32)


def _level_from_scale(scale: float) -> int:
    k = -math.log2(scale)
    if abs(k - round(k)) > 1e-6:
        raise ValueError(f"pyramid scales must be powers of 2, got {scale!r}")
    return int(round(k))


def multiscale_roi_align(
    features: Sequence[Array],
    boxes: Array,
    output_size: IntPair,
    sampling_ratio: int,
    aligned: bool,
    scales: Sequence[float],
    canonical_scale: int = 224,
    canonical_level: int = 4,
    extents: Array | None = None,
) -> Array:
    """torchvision ``MultiScaleRoIAlign``: each box pooled from its FPN level, one gather.

    Args:
      features: sequence of L arrays [B, H_l, W_l, C] (e.g. P2..P5), finest first.
      boxes: [B, N, 4] float32 XYXY in input-image pixels; padded rows may hold any finite
        values (their output is meaningless but finite; the caller masks them).
      output_size: static (ph, pw) or int.
      sampling_ratio: python int >= 1.
      aligned: python bool (torchvision's MultiScaleRoIAlign uses False).
      scales: L python floats, powers of 2 (e.g. 1/4, 1/8, 1/16, 1/32); level k_min is
        -log2(scales[0]) and k_max is -log2(scales[-1]).
      canonical_scale, canonical_level: LevelMapper parameters.
      extents: optional [B, 2] int32, each image's size rounded up to 32 (``model.exact_canvas``): samples
        are clamped to ``extent * scale`` of their level, the border of the tensor torchvision pools from,
        instead of the canvas's border.

    Returns:
      [B, N, ph, pw, C] with the dtype of the features.
    """
    grid = _check_sampling_ratio(sampling_ratio)
    if len(features) != len(scales) or not features:
        raise ValueError("need one scale per feature level")
    ph, pw = _pair(output_size)
    bsz, n = boxes.shape[:2]
    c = features[0].shape[-1]
    k_min = _level_from_scale(scales[0])
    k_max = _level_from_scale(scales[-1])

    # All levels of an image side by side: [B, sum_l H_l*W_l, C], then one flat [P, C] array.
    # Static per-level tables (built at trace time) give each box its map geometry.
    sizes = [f.shape[1] * f.shape[2] for f in features]
    offsets = [sum(sizes[:level]) for level in range(len(sizes))]
    total = sum(sizes)
    flat = jnp.concatenate([f.reshape(bsz, s, c) for f, s in zip(features, sizes)], axis=1)
    flat = flat.reshape(bsz * total, c)

    heights = jnp.array([f.shape[1] for f in features], jnp.float32)
    widths = jnp.array([f.shape[2] for f in features], jnp.float32)
    scale_t = jnp.array(scales, jnp.float32)
    offset_t = jnp.array(offsets, jnp.int32)

    rois = boxes.reshape(bsz * n, 4)
    lvl = assign_levels(rois, k_min, k_max, canonical_scale, canonical_level) - k_min  # [R]
    # Guard against a level list that does not span k_min..k_max contiguously.
    lvl = jnp.clip(lvl, 0, len(features) - 1)
    image = jnp.repeat(jnp.arange(bsz, dtype=jnp.int32), n)  # [R], boxes are image-major
    base = image * total + offset_t[lvl]

    height, width = heights[lvl], widths[lvl]
    if extents is not None:
        ext = jnp.asarray(extents, jnp.float32)[image]  # [R, 2]; extent * 2^-k is exact
        height, width = ext[:, 0] * scale_t[lvl], ext[:, 1] * scale_t[lvl]
    out = _pool_flat(flat, rois, scale_t[lvl], height, width, base, (ph, pw), grid, bool(aligned),
                     row_width=widths[lvl])
    return out.reshape(bsz, n, ph, pw, c)
