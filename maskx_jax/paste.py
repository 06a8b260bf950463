"""Pasting M x M mask probabilities into the image frame, with torchvision's numbers.

torchvision's ``paste_masks_in_image(masks, boxes, (H, W), padding=1)`` loops over the
masks in Python. Per mask it

  1. zero-pads the M x M mask by ``padding`` on every side (so the mask's border fades out),
  2. scales the box about its centre by ``(M + 2 * padding) / M`` (float32) and casts the
     corners to int64, which truncates toward zero,
  3. resizes the padded mask with bilinear ``F.interpolate(align_corners=False)`` to
     ``(h, w) = (max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1))`` and
  4. writes it at rows ``y1..y2`` / columns ``x1..x2`` of a zero [H, W] canvas, clipped to
     the image.

Here steps 3-4 are one separable linear map per mask, ``Ry @ mask @ Rx^T``, where
``Ry`` [H, M+2] and ``Rx`` [W, M+2] hold torch's bilinear weights for the image rows /
columns inside the integer box and zeros elsewhere. The per-mask output size (h, w) only
enters the interpolation scale ``(M + 2) / h``, a traced number, so everything is static
shaped: no Python loop over masks, one compilation per (N, M, H, W).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _split12(x: Array) -> tuple[Array, Array]:
    """Splits float32 ``x`` into ``hi + lo`` with at most 12 significant bits each, exactly.

    Bit masking (not Veltkamp's ``c - (c - x)``) so no compiler simplification can undo it.
    """
    bits = lax.bitcast_convert_type(x, jnp.int32)
    hi = lax.bitcast_convert_type(bits & jnp.int32(-4096), jnp.float32)  # clear 12 low mantissa bits
    return hi, x - hi


def _torch_source_coord(scale: Array, dst: Array) -> Array:
    """torch's ``area_pixel_compute_source_index`` for align_corners=False, bit-exact in float32.

    torch evaluates ``scale * (dst + 0.5) - 0.5`` with ``dst + 0.5`` a C++ double, i.e. in
    float64, and rounds once to float32. Without float64 in JAX this is reproduced with an
    error-free product (Dekker): ``p + e == scale * t`` exactly, then ``p - 0.5`` is exact
    (for 0.5 <= p < 2**23, the range that matters: smaller values clamp to 0 anyway), so the
    one rounding of ``(p - 0.5) + e`` is the correctly rounded float64 result.

    Args:
      scale: float32 [...], ``float32(in) / float32(out)``.
      dst: int32 [...], output pixel index (|dst| < 2**23).

    Returns:
      float32 [...], source coordinate before torch's clamp at 0.
    """
    t = dst.astype(jnp.float32) + jnp.float32(0.5)  # exact
    p = scale * t
    # The barrier keeps ``scale * t - 0.5`` from being contracted into one FMA below, which
    # would make ``p`` inconsistent with the error term ``e``.
    p = lax.optimization_barrier(p)
    s_hi, s_lo = _split12(scale)
    t_hi, t_lo = _split12(t)
    # Dekker's TwoProduct error: every partial product has <= 24 bits, every step is exact.
    e = ((s_hi * t_hi - p) + s_hi * t_lo + s_lo * t_hi) + s_lo * t_lo
    return (p - jnp.float32(0.5)) + e


def _interp_matrix(start: Array, stop: Array, in_size: int, out_len: int) -> Array:
    """Bilinear weights mapping a padded mask axis onto one image axis.

    Args:
      start, stop: int32 [N], first and last image index (inclusive) covered by each
        expanded integer box along this axis (torch's ``x1``, ``x2``).
      in_size: static int, length of the padded mask axis (M + 2 * padding).
      out_len: static int, image length along this axis (H or W).

    Returns:
      float32 [N, out_len, in_size]; row ``c`` holds torch's two bilinear weights for image
      pixel ``c`` if ``start <= c <= stop`` and is zero otherwise (also outside the image,
      which is the clipping of torch's paste).
    """
    size = jnp.maximum(stop - start + 1, 1)  # torch: max(int(x2 - x1 + 1), 1)
    scale = jnp.float32(in_size) / size.astype(jnp.float32)  # float32, as torch's opmath scale
    pix = jnp.arange(out_len, dtype=jnp.int32)
    dst = pix[None, :] - start[:, None]  # [N, out_len] index into the resized mask
    src = jnp.maximum(_torch_source_coord(scale[:, None], dst), jnp.float32(0.0))
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    i1 = jnp.minimum(i0 + 1, in_size - 1)
    lam1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    lam0 = jnp.float32(1.0) - lam1
    inside = (pix[None, :] >= start[:, None]) & (pix[None, :] <= stop[:, None])
    lam0 = jnp.where(inside, lam0, 0.0)
    lam1 = jnp.where(inside, lam1, 0.0)
    return (
        lam0[..., None] * jax.nn.one_hot(i0, in_size, dtype=jnp.float32)
        + lam1[..., None] * jax.nn.one_hot(i1, in_size, dtype=jnp.float32)
    )


def expand_boxes_to_int(boxes: Array, scale: float) -> Array:
    """torchvision ``expand_boxes(boxes, scale).to(torch.int64)`` in float32 / int32.

    Args:
      boxes: float32 [N, 4] XYXY absolute pixels.
      scale: Python float; cast to float32 as torch does when multiplying a float32 tensor.

    Returns:
      int32 [N, 4], the expanded corners truncated toward zero (C cast semantics).
    """
    boxes = boxes.astype(jnp.float32)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    half = jnp.float32(0.5)
    w_half = (x2 - x1) * half * jnp.float32(scale)
    h_half = (y2 - y1) * half * jnp.float32(scale)
    # torch rounds the scaled half sizes before the subtraction; the barrier keeps XLA from
    # fusing multiply and add into an FMA, which could move a corner across an integer.
    w_half, h_half = lax.optimization_barrier((w_half, h_half))
    x_c = (x2 + x1) * half
    y_c = (y2 + y1) * half
    expanded = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return expanded.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("height", "width", "padding"))
def paste_masks(masks: Array, boxes: Array, height: int, width: int, padding: int = 1) -> Array:
    """torchvision ``paste_masks_in_image(masks[:, None], boxes, (height, width), padding)``.

    Returns soft masks (probabilities); a caller binarises them with ``> 0.5`` as
    torchvision's users do. jit-compiled with static ``height``, ``width``, ``padding``.

    Args:
      masks: float [N, Mh, M] per-box mask probabilities (M x M for Mask R-CNN, M = 28),
        in the box frame.
      boxes: float [N, 4] XYXY absolute pixels in the (height, width) image, typically
        already rescaled to the original image by ``transform.resize_boxes``.
      height, width: static output image size.
      padding: static zero border added around each mask (torchvision uses 1); the box is
        enlarged about its centre by ``(M + 2 * padding) / M`` with M the last mask axis.

    Returns:
      float32 [N, height, width]; each mask's pixels outside its integer box are 0.

    Note:
      torchvision raises (slice shape mismatch) on boxes lying entirely outside the image
      (impossible after its own box clipping); here such masks are simply all zero.
    """
    masks = masks.astype(jnp.float32)
    m_h, m_w = masks.shape[-2], masks.shape[-1]
    scale = float(m_w + 2 * padding) / m_w  # Python float, as torchvision's expand_masks
    padded = jnp.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    ibox = expand_boxes_to_int(boxes, scale)
    rx = _interp_matrix(ibox[:, 0], ibox[:, 2], m_w + 2 * padding, width)  # [N, W, Mw+2p]
    ry = _interp_matrix(ibox[:, 1], ibox[:, 3], m_h + 2 * padding, height)  # [N, H, Mh+2p]
    # Width first, then height: the nesting of torch's bilinear kernel. HIGHEST precision
    # so accelerators do not drop to bf16/tf32 passes (each output is a sum of <= 4 terms).
    hi = lax.Precision.HIGHEST
    cols = jnp.einsum("njk,nwk->njw", padded, rx, precision=hi)  # [N, Mh+2p, W]
    return jnp.einsum("nhj,njw->nhw", ry, cols, precision=hi)


@functools.partial(jax.jit, static_argnames=("height", "width", "padding"))
def paste_masks_batched(masks: Array, boxes: Array, height: int, width: int, padding: int = 1) -> Array:
    """:func:`paste_masks` over a batch of images sharing one (padded) output size.

    Args:
      masks: float [B, N, M, M] mask probabilities.
      boxes: float [B, N, 4] XYXY absolute pixels.
      height, width: static output size (e.g. the largest original image; pixels past a
        smaller image's own size are filled only where its boxes reach).
      padding: static, see :func:`paste_masks`.

    Returns:
      float32 [B, N, height, width] soft masks; threshold at 0.5 for binary masks.
    """
    fn = functools.partial(paste_masks, height=height, width=width, padding=padding)
    return jax.vmap(fn)(masks, boxes)
