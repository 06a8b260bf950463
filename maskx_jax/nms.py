"""Greedy non-maximum suppression with static shapes and torchvision's exact semantics.

torchvision's CPU kernel (``torchvision.ops.nms``) sorts boxes by descending score (stable, so
equal scores keep input order), walks them in that order, keeps a box unless an already-kept box
overlaps it with IoU > threshold, and computes that IoU in float32 as
``inter / (area_i + area_j - inter)`` with ``inter = max(0, xx2 - xx1) * max(0, yy2 - yy1)``.

Here the same walk is a ``lax.while_loop`` whose every iteration picks the next surviving box
(the first True of an ``alive`` mask in sorted order), records it, and clears from ``alive``
every box it suppresses; IoU is computed for that one box against all N (O(N) memory per step,
never an N x N matrix). The loop runs once per *kept* box and stops as soon as ``max_output``
boxes are kept or no box is left, so its cost is O(N * kept), like torchvision's.

Inputs are padded: ``valid`` [N] bool marks real entries; invalid entries are never kept and never
suppress anything. Outputs are padded to ``max_output`` with a boolean ``valid`` (pad index 0).
All functions are jit- and vmap-compatible (``iou_threshold`` and ``max_output`` are static).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def _threshold_below(iou_threshold) -> Array:
    """Float32 ``t`` such that, for any float32 ``ovr``, ``ovr > t`` iff ``ovr > iou_threshold``.

    torchvision compares the float32 IoU against the threshold as a C++ double. Rounding the
    threshold to float32 would change the answer when the IoU equals float32(threshold) and that
    value lies above the double (e.g. 0.3 rounds up to 0.30000001). The largest float32 not above
    the double gives the exact same decisions with a float32 comparison.

    Args:
      iou_threshold: Python/NumPy float (static), or a traced scalar (then simply cast to float32,
        the best that can be done without float64).
    """
    if isinstance(iou_threshold, (float, int, np.floating, np.integer)):
        thr = float(iou_threshold)
        t = np.float32(thr)
        if float(t) > thr:
            t = np.nextafter(t, np.float32(-np.inf), dtype=np.float32)
        return jnp.asarray(t, jnp.float32)
    return jnp.asarray(iou_threshold, jnp.float32)


def _greedy_nms(
    boxes: Array,
    scores: Array,
    valid: Array,
    categories: Optional[Array],
    iou_threshold,
    max_output: int,
) -> tuple[Array, Array]:
    """Core greedy NMS. Shapes as in ``nms_padded``; returns (indices [max_output], valid [max_output])."""
    n = boxes.shape[0]
    if n == 0 or max_output <= 0:
        return jnp.zeros((max(max_output, 0),), jnp.int32), jnp.zeros((max(max_output, 0),), bool)

    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    valid = jnp.asarray(valid, bool)
    iota = jnp.arange(n, dtype=jnp.int32)
    # Valid entries first, then by descending score; stable, so ties keep input order exactly as
    # torchvision's stable descending sort does. Negation is exact, so -score ascending is
    # score descending.
    invalid_key = jnp.where(valid, 0, 1).astype(jnp.int32)
    _, _, order = lax.sort((invalid_key, -scores, iota), num_keys=2, is_stable=True)

    sb = boxes[order]
    x1, y1, x2, y2 = sb[:, 0], sb[:, 1], sb[:, 2], sb[:, 3]
    # Areas are computed once, outside the loop, so each is rounded to float32 on its own as in
    # torchvision (and cannot be fused with the union's addition).
    areas = (x2 - x1) * (y2 - y1)
    cats = None if categories is None else jnp.asarray(categories, jnp.int32)[order]
    alive0 = valid[order]
    thr = _threshold_below(iou_threshold)

    def cond(state):
        count, has_next, _, _, _ = state
        return has_next & (count < max_output)

    def body(state):
        count, _, c, alive, out_pos = state
        # IoU of box c against every box, in torchvision's operation order.
        xx1 = jnp.maximum(x1[c], x1)
        yy1 = jnp.maximum(y1[c], y1)
        xx2 = jnp.minimum(x2[c], x2)
        yy2 = jnp.minimum(y2[c], y2)
        w = jnp.maximum(xx2 - xx1, 0.0)
        h = jnp.maximum(yy2 - yy1, 0.0)
        inter = w * h
        # Plain division on purpose: 0/0 = NaN compares False and suppresses nothing, as in torch.
        ovr = inter / (areas[c] + areas - inter)
        suppress = ovr > thr
        if cats is not None:
            suppress = suppress & (cats == cats[c])
        alive = alive & ~suppress
        alive = alive.at[c].set(False)
        out_pos = out_pos.at[count].set(c)
        # Next survivor in score order: argmax of a bool returns the first True.
        nxt = jnp.argmax(alive).astype(jnp.int32)
        return count + 1, alive[nxt], nxt, alive, out_pos

    first = jnp.argmax(alive0).astype(jnp.int32)
    state = (jnp.int32(0), alive0[first], first, alive0, jnp.zeros((max_output,), jnp.int32))
    count, _, _, _, out_pos = lax.while_loop(cond, body, state)

    out_valid = jnp.arange(max_output, dtype=jnp.int32) < count
    indices = jnp.where(out_valid, order[out_pos], 0).astype(jnp.int32)
    return indices, out_valid


def nms_padded(
    boxes: Array,
    scores: Array,
    valid: Array,
    iou_threshold: float,
    max_output: int,
) -> tuple[Array, Array]:
    """``torchvision.ops.nms`` on padded inputs, truncated/padded to ``max_output``.

    Args:
      boxes: [N, 4] float32 XYXY absolute pixels (no NaNs).
      scores: [N] float32; higher is better.
      valid: [N] bool; False entries are ignored entirely (never kept, never suppress).
      iou_threshold: static float; a box is suppressed when its IoU with an already-kept,
        higher-ranked box is strictly greater than this.
      max_output: static int, the output length; the greedy walk stops after this many keeps.

    Returns:
      indices: [max_output] int32 indices into the inputs of the kept boxes, in descending score
        order (ties: lower index first), i.e. ``torchvision.ops.nms(...)[:max_output]``; padding
        entries are 0.
      valid: [max_output] bool, True for real entries (a prefix).
    """
    return _greedy_nms(boxes, scores, valid, None, iou_threshold, max_output)


def batched_nms_padded(
    boxes: Array,
    scores: Array,
    categories: Array,
    valid: Array,
    iou_threshold: float,
    max_output: int,
) -> tuple[Array, Array]:
    """``torchvision.ops.batched_nms`` on padded inputs: only same-category boxes suppress each other.

    Categories are compared explicitly (no coordinate-offset trick), so results do not depend on
    box magnitudes.

    Args:
      boxes: [N, 4] float32 XYXY absolute pixels.
      scores: [N] float32.
      categories: [N] int32 category (class or FPN level) of each box.
      valid: [N] bool; False entries are ignored.
      iou_threshold: static float (strict ``>`` suppresses).
      max_output: static int output length.

    Returns:
      indices: [max_output] int32 kept indices in descending score order over all categories
        (ties: lower index first); padding entries are 0.
      valid: [max_output] bool prefix mask of real entries.
    """
    return _greedy_nms(boxes, scores, valid, categories, iou_threshold, max_output)


def nms_keep_mask(
    boxes: Array,
    scores: Array,
    valid: Array,
    iou_threshold: float,
    categories: Optional[Array] = None,
    max_output: Optional[int] = None,
) -> Array:
    """Kept flags in the original order (per-category if ``categories`` is given).

    Args:
      boxes: [N, 4] float32 XYXY.
      scores: [N] float32.
      valid: [N] bool; False entries are never kept.
      iou_threshold: static float.
      categories: optional [N] int32; when given, NMS is done per category (batched NMS).
      max_output: optional static int; only the ``max_output`` highest-scoring kept boxes are
        flagged. Defaults to N (no truncation).

    Returns:
      [N] bool, True for boxes that NMS keeps.
    """
    n = boxes.shape[0]
    k = n if max_output is None else max_output
    idx, ok = _greedy_nms(boxes, scores, valid, categories, iou_threshold, k)
    # Padding rows go to index n, which mode='drop' discards, so they cannot clear a real flag.
    return jnp.zeros((n,), bool).at[jnp.where(ok, idx, n)].set(True, mode="drop")
