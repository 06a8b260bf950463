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


def match(
    boxes: Array,
    gt_boxes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    *,
    fg_thresh: float,
    bg_thresh: float,
    allow_low_quality: bool,
) -> tuple[Array, Array]:
    """torchvision ``Matcher`` semantics plus crowd handling, for one image.

    Args:
      boxes: [M, 4] candidates (anchors or proposals). gt_boxes: [G, 4]. gt_valid, gt_crowd: [G] bool.
      fg_thresh: IoU >= fg_thresh -> foreground. bg_thresh: IoU < bg_thresh -> background; in
        between -> ignored (pass fg_thresh == bg_thresh for RoIs).
      allow_low_quality: also make foreground, for every gt, the candidates whose IoU with it equals
        that gt's best IoU (torchvision's ``allow_low_quality_matches``, used by the RPN).
    Returns:
      matched [M] int32 index into G (meaningful where labels == 1), labels [M] int32 in {1, 0, -1}.
    """
    inter, union = box_inter_union(boxes, gt_boxes)  # [M, G]
    iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
    usable = gt_valid & ~gt_crowd
    iou = jnp.where(usable[None, :], iou, -1.0)
    best = jnp.max(iou, axis=1)
    matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
    labels = jnp.where(best >= fg_thresh, 1, jnp.where(best < bg_thresh, 0, -1)).astype(jnp.int32)
    if allow_low_quality:
        gt_best = jnp.max(iou, axis=0)  # [G]
        # Ties included, as torchvision does; a gt with no overlap at all (best 0) adds nothing.
        is_best = (iou == gt_best[None, :]) & usable[None, :] & (gt_best[None, :] > 0)
        labels = jnp.where(jnp.any(is_best, axis=1), 1, labels)
    # Background candidates mostly covered by a crowd region: ignore.
    area = box_area(boxes)[:, None]
    ioa = jnp.where(area > 0, inter / jnp.where(area > 0, area, 1.0), 0.0)
    in_crowd = jnp.any((ioa > CROWD_IOA_THRESH) & gt_crowd[None, :] & gt_valid[None, :], axis=1)
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
