"""Matching anchors / proposals to ground truth, and balanced sampling, with static shapes.

Label convention of :func:`match`: 1 foreground, 0 background, -1 ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskx_jax.boxes import box_area, box_inter_union

Array = jax.Array

# A candidate that would be background but lies mostly inside a crowd region (intersection over
# the candidate's own area above this) is ignored rather than taught as background (Detectron).
CROWD_IOA_THRESH = 0.7


# Ground-truth boxes are matched GT_CHUNK at a time, in a loop that stops after the last valid one:
# the [M, G] IoU matrix of the padded gt slots (G = 100 by default against ~7 objects in a COCO
# image, M ~ 65k-270k anchors) was ~110 ms per 2 images at 512x512 and ~430 ms at 800x1333 on CPU,
# one 214 MB array per pass at the larger size; chunks of 8 cost what the real objects need.
GT_CHUNK = 8


def match(
    boxes: Array,
    gt_boxes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    *,
    fg_thresh: float,
    bg_thresh: float,
    allow_low_quality: bool,
    gt_chunk: int = GT_CHUNK,
) -> tuple[Array, Array]:
    """torchvision ``Matcher`` semantics plus crowd handling, for one image.

    The gts are visited ``gt_chunk`` at a time up to the last valid one (a ``lax.while_loop`` whose
    trip count is ceil((last valid index + 1) / gt_chunk)); the result is the same as matching all G
    at once, ties included (the first of equal-IoU gts wins, as ``argmax`` does).

    Args:
      boxes: [M, 4] candidates (anchors or proposals). gt_boxes: [G, 4]. gt_valid, gt_crowd: [G] bool.
      fg_thresh: IoU >= fg_thresh -> foreground. bg_thresh: IoU < bg_thresh -> background; in
        between -> ignored (pass fg_thresh == bg_thresh for RoIs).
      allow_low_quality: also make foreground, for every gt, the candidates whose IoU with it equals
        that gt's best IoU (torchvision's ``allow_low_quality_matches``, used by the RPN).
      gt_chunk: gts per loop iteration.
    Returns:
      matched [M] int32 index into G (meaningful where labels == 1; 0 where no gt is usable),
      labels [M] int32 in {1, 0, -1}.
    """
    # Matching is a discrete choice: nothing differentiates through it (and a while_loop cannot be
    # reverse-differentiated), so the candidates' gradient, if they carry one, stops here.
    boxes, gt_boxes = jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(gt_boxes)
    m, g = boxes.shape[0], gt_boxes.shape[0]
    if g == 0:
        return jnp.zeros((m,), jnp.int32), jnp.zeros((m,), jnp.int32)
    c = max(1, min(gt_chunk, g))
    pad = -g % c
    gt_boxes = jnp.pad(gt_boxes, ((0, pad), (0, 0)))
    gt_valid = jnp.pad(gt_valid, (0, pad))
    gt_crowd = jnp.pad(gt_crowd, (0, pad))
    last = jnp.max(jnp.where(gt_valid, jnp.arange(g + pad, dtype=jnp.int32) + 1, 0))
    num_chunks = (last + c - 1) // c
    area = box_area(boxes)[:, None]

    def body(carry):
        i, best, matched, low_quality, in_crowd = carry
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c)
        gb, gv, gc = take(gt_boxes), take(gt_valid), take(gt_crowd)
        inter, union = box_inter_union(boxes, gb)  # [M, c]
        iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
        usable = gv & ~gc
        iou = jnp.where(usable[None, :], iou, -1.0)
        chunk_best = jnp.max(iou, axis=1)
        # Strictly greater: an earlier chunk keeps a tie, so the first equal gt wins overall.
        better = chunk_best > best
        best = jnp.where(better, chunk_best, best)
        matched = jnp.where(better, jnp.argmax(iou, axis=1).astype(jnp.int32) + i * c, matched)
        if allow_low_quality:
            gt_best = jnp.max(iou, axis=0)  # [c]: each gt's best over all candidates
            # Ties included, as torchvision does; a gt with no overlap at all (best 0) adds nothing.
            is_best = (iou == gt_best[None, :]) & usable[None, :] & (gt_best[None, :] > 0)
            low_quality = low_quality | jnp.any(is_best, axis=1)
        # inter / area > thresh as a product: XLA may turn a division by the broadcast area into a
        # product with its reciprocal or not, depending on the shapes, which moves ties at the bound.
        mostly_inside = (area > 0) & (inter > CROWD_IOA_THRESH * area)
        in_crowd = in_crowd | jnp.any(mostly_inside & gc[None, :] & gv[None, :], axis=1)
        return i + 1, best, matched, low_quality, in_crowd

    # best starts at -1, the IoU given to unusable gts: with none usable, every candidate is
    # background and matched stays 0 (argmax over an all -1 row).
    init = (jnp.int32(0), jnp.full((m,), -1.0, boxes.dtype), jnp.zeros((m,), jnp.int32),
            jnp.zeros((m,), bool), jnp.zeros((m,), bool))
    _, best, matched, low_quality, in_crowd = jax.lax.while_loop(lambda s: s[0] < num_chunks, body, init)
    labels = jnp.where(best >= fg_thresh, 1, jnp.where(best < bg_thresh, 0, -1)).astype(jnp.int32)
    labels = jnp.where(low_quality, 1, labels)
    # Background candidates mostly covered by a crowd region: ignore.
    labels = jnp.where((labels == 0) & in_crowd, -1, labels)
    return matched, labels


def sample(labels: Array, valid: Array, num: int, positive_fraction: float, key: Array) -> tuple[Array, Array, Array]:
    """Balanced random sampling (torchvision ``BalancedPositiveNegativeSampler``), static size.

    Takes min(#pos, int(num * positive_fraction)) positives and fills up to ``num`` with negatives.

    Args:
      labels: [M] in {1, 0, -1}; valid: [M] bool (padded candidates are never sampled).
    Returns:
      indices [num] int32, is_pos [num] bool, is_valid [num] bool. Selected positives come first
      (slots [0, n_pos)), then negatives; unused slots have is_valid False.
    """
    m = labels.shape[0]
    num = min(num, m)
    pos_cap = min(int(num * positive_fraction), m)
    k_pos, k_neg = jax.random.split(key)
    pos = (labels == 1) & valid
    neg = (labels == 0) & valid
    # Random priorities; top_k of a random key among positives is a uniform random subset.
    pos_key = jnp.where(pos, jax.random.uniform(k_pos, (m,)), -1.0)
    _, pos_top = jax.lax.top_k(pos_key, pos_cap) if pos_cap > 0 else (None, jnp.zeros((0,), jnp.int32))
    chosen_pos = jnp.zeros((m,), bool).at[pos_top].set(pos_key[pos_top] >= 0) if pos_cap > 0 else jnp.zeros((m,), bool)
    # One ranking for the final list: chosen positives (priority 2..3), negatives (0..1), others -1.
    priority = jnp.where(chosen_pos, 2.0 + pos_key, jnp.where(neg, jax.random.uniform(k_neg, (m,)), -1.0))
    prio, idx = jax.lax.top_k(priority, num)
    is_valid = prio >= 0
    return idx.astype(jnp.int32), is_valid & (prio >= 2.0), is_valid
