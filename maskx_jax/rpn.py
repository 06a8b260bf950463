"""Region Proposal Network: the head module and static-shape proposal selection.

Selection follows torchvision's ``RegionProposalNetwork.filter_proposals``: per-level top-k on
objectness logits, decode, sigmoid, clip to the image, drop tiny boxes, NMS *per level*, keep the
best ``post_nms_top_n`` per image. Everything has static shapes; dropped boxes are marked invalid.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskx_jax import anchors as anchors_lib
from maskx_jax import boxes as box_ops
from maskx_jax.layers import Conv2d
from maskx_jax.matching import match, sample
from maskx_jax.nms import batched_nms_padded
from maskx_jax.types import Proposals

Array = jax.Array

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


class RPNHead(nnx.Module):
    """3x3 conv + ReLU shared over levels, then 1x1 ``cls_logits`` (A) and ``bbox_pred`` (4A).

    Initialised N(0, 0.01) with zero bias, as torchvision does.
    """

    def __init__(self, in_channels: int = 256, num_anchors: int = 3, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.01)
        self.num_anchors: int = num_anchors
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1, kernel_init=init, rngs=rngs)
        self.cls_logits = Conv2d(in_channels, num_anchors, 1, kernel_init=init, rngs=rngs)
        self.bbox_pred = Conv2d(in_channels, 4 * num_anchors, 1, kernel_init=init, rngs=rngs)

    def __call__(self, features: Sequence[Array]) -> tuple[Array, Array]:
        """features: per level [N, H_l, W_l, C].

        Returns objectness logits [N, T] and box deltas [N, T, 4], T = sum_l H_l * W_l * A, in
        torchvision's order (level, then row-major location, then anchor). NHWC makes this a plain
        reshape: channel a*4+c of ``bbox_pred`` is anchor a's coordinate c, as in torchvision.
        """
        logits, deltas = [], []
        for x in features:
            t = jax.nn.relu(self.conv(x))
            n = t.shape[0]
            logits.append(self.cls_logits(t).reshape(n, -1))
            deltas.append(self.bbox_pred(t).reshape(n, -1, 4))
        return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)

    def at_anchors(self, features: Sequence[Array], index: Array) -> tuple[Array, Array]:
        """The head's outputs at given anchors only: what ``__call__`` gives at ``[n, index[n]]``.

        Args:
          features: per level [N, H_l, W_l, C], as for ``__call__``.
          index: [N, S] int32 anchor indices in ``__call__``'s order (level, row-major location, anchor).
        Returns:
          logits [N, S] and deltas [N, S, 4] (same values up to float summation order).

        Why: the RPN losses read the head at 256 sampled anchors per image. Differentiating the dense
        head instead runs both gradient convolutions of its 3x3 conv over every pixel of every level
        (the cotangent is zero everywhere but at those anchors): ~100 of the ~590 GFLOP of a 512x512
        R-50-FPN step with 2 images. Here each sampled anchor's 3x3 neighbourhood (zero outside the map, as the
        conv's padding) is gathered from its level and the conv and the two 1x1 convs are evaluated
        there as matrix products, so the backward pass is a scatter of S x 9 pixels and a few
        [S, 9C] x [9C, C] products.
        """
        a = self.num_anchors
        n, s = index.shape
        c = features[0].shape[-1]
        sizes = [tuple(int(d) for d in f.shape[1:3]) for f in features]
        starts = np.cumsum([0] + [h * w * a for h, w in sizes])
        level = jnp.searchsorted(jnp.asarray(starts[1:-1], jnp.int32), index, side="right")  # [N, S]
        local = index - jnp.asarray(starts[:-1], jnp.int32)[level]
        pixel, anchor = local // a, local % a
        width = jnp.asarray([w for _, w in sizes], jnp.int32)[level]
        dy, dx = (d.reshape(-1) for d in np.meshgrid(np.arange(3) - 1, np.arange(3) - 1, indexing="ij"))
        yy = (pixel // width)[..., None] + dy  # [N, S, 9] tap rows / columns, (dy, dx) row-major
        xx = (pixel % width)[..., None] + dx
        patches = None
        for index, (f, (h, w)) in enumerate(zip(features, sizes)):
            inside = (level[..., None] == index) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            flat = jnp.where(inside, yy * w + xx, 0).reshape(n, s * 9, 1)
            taps = jnp.take_along_axis(f.reshape(n, h * w, c), flat, axis=1)
            taps = jnp.where(inside.reshape(n, s * 9, 1), taps, jnp.zeros((), f.dtype))
            patches = taps if patches is None else patches + taps
        patches = patches.reshape(n, s, 9 * c)
        dtype = patches.dtype

        def dense(conv: Conv2d, x: Array) -> Array:  # conv evaluated at the gathered positions
            y = jnp.dot(x, conv.kernel[...].astype(dtype).reshape(-1, conv.out_features))
            return y + conv.bias[...].astype(dtype)

        t = jax.nn.relu(dense(self.conv, patches))  # [N, S, C]
        logits = jnp.take_along_axis(dense(self.cls_logits, t), anchor[..., None], axis=2)[..., 0]
        deltas = dense(self.bbox_pred, t).reshape(n, s, a, 4)
        deltas = jnp.take_along_axis(deltas, anchor[..., None, None], axis=2)[:, :, 0]
        return logits, deltas


class RPN(nnx.Module):
    """Holds the head (parameter path ``rpn.head.*``) and the static anchor / selection settings."""

    def __init__(
        self,
        in_channels: int = 256,
        *,
        anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        rngs: nnx.Rngs,
    ):
        self.anchor_sizes: tuple[tuple[int, ...], ...] = anchor_sizes
        self.aspect_ratios: tuple[float, ...] = aspect_ratios
        self.head = RPNHead(in_channels, len(anchor_sizes[0]) * len(aspect_ratios), rngs=rngs)

    def anchors(self, image_hw: tuple[int, int], features: Sequence[Array]) -> tuple[np.ndarray, list[int]]:
        """Anchors [T, 4] for the padded input size and per-level counts (NumPy, static)."""
        feature_sizes = [tuple(int(d) for d in f.shape[1:3]) for f in features]
        return anchors_lib.anchor_grid(tuple(image_hw), feature_sizes, self.anchor_sizes,
                                       (tuple(self.aspect_ratios),) * len(self.anchor_sizes))

    def __call__(self, features: Sequence[Array], image_hw: tuple[int, int]
                 ) -> tuple[Array, Array, np.ndarray, list[int]]:
        """Head outputs plus the matching anchors: (logits [N,T], deltas [N,T,4], anchors [T,4], counts)."""
        logits, deltas = self.head(features)
        anchors, counts = self.anchors(image_hw, features)
        return logits, deltas, anchors, counts


def select_proposals(
    logits: Array,
    deltas: Array,
    anchors: np.ndarray,
    level_counts: Sequence[int],
    image_sizes: Array,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float = 0.7,
    min_size: float = 1e-3,
    score_thresh: float = 0.0,
    anchor_valid: Array | None = None,
) -> Proposals:
    """torchvision's proposal filtering with static shapes.

    Args:
      logits: [N, T] objectness logits; deltas: [N, T, 4]; anchors: [T, 4] (level-major), or [N, T, 4] per
        image with ``anchor_valid`` [N, T] marking each image's own anchors (``model.exact_canvas``): the
        others rank below every real anchor and never become proposals.
      level_counts: anchors per level (static). image_sizes: [N, 2] int (h, w) before padding.
      pre_nms_top_n: per level (torchvision: 1000 test / 2000 train). post_nms_top_n: per image.
    Returns:
      Proposals with boxes [N, post_nms_top_n, 4], sigmoid scores, and ``valid``; sorted by score.
    """
    # Gradients never flow through proposals (torchvision detaches them too).
    logits = jax.lax.stop_gradient(logits)
    deltas = jax.lax.stop_gradient(deltas)
    if anchor_valid is not None:
        logits = jnp.where(anchor_valid, logits, -jnp.inf)
    idx_parts, lvl_parts = [], []
    start = 0
    for level, count in enumerate(level_counts):
        k = min(pre_nms_top_n, count)
        _, idx = jax.lax.top_k(logits[:, start:start + count], k)
        idx_parts.append(idx + start)
        lvl_parts.append(np.full((k,), level, np.int32))
        start += count
    idx = jnp.concatenate(idx_parts, axis=1)  # [N, C]
    levels = jnp.asarray(np.concatenate(lvl_parts))  # [C]
    anchors = jnp.asarray(anchors)
    shared = anchors.ndim == 2  # one anchor set for the batch (the canvas's), not one per image

    def per_image(logit, delta, index, hw, anchor, real):
        cand_logits = logit[index]
        boxes = box_ops.decode(delta[index], anchor[index], RPN_BOX_WEIGHTS, math.log(1000.0 / 16))
        boxes = box_ops.clip_boxes(boxes, hw[0], hw[1])
        scores = jax.nn.sigmoid(cand_logits)
        valid = box_ops.small_box_mask(boxes, min_size) & (scores >= score_thresh)
        if real is not None:
            valid = valid & real[index]
        keep, keep_valid = batched_nms_padded(boxes, scores, levels, valid, nms_thresh, post_nms_top_n)
        return Proposals(boxes=boxes[keep], scores=jnp.where(keep_valid, scores[keep], 0.0), valid=keep_valid)

    in_axes = (0, 0, 0, 0, None if shared else 0, None if anchor_valid is None else 0)
    return jax.vmap(per_image, in_axes=in_axes)(logits, deltas, idx, image_sizes, anchors, anchor_valid)


def smooth_l1(x: Array, beta: float) -> Array:
    """torch ``smooth_l1_loss`` elementwise (reduction none): 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


class AnchorSamples(NamedTuple):
    """The anchors each image's RPN losses use (static size S = ``batch_size_per_image``).

    index [N, S] int32 into the anchors; is_pos, valid [N, S] bool (sampled positives come first;
    slots with ``valid`` False are unused); target [N, S, 4] the encoded matched gt box of each slot.
    """

    index: Array
    is_pos: Array
    valid: Array
    target: Array


def sample_anchors(
    anchors: np.ndarray,
    gt_boxes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    key: Array,
    *,
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
) -> AnchorSamples:
    """torchvision's RPN anchor labelling and sampling, static shapes.

    Anchors are matched (IoU >= 0.7 fg, < 0.3 bg, each gt's best anchors fg too) and 256 per image
    are sampled at up to half positive. Depends only on the anchors and the ground truth, not on
    the head's outputs.

    Args:
      anchors: [T, 4]; gt_boxes: [N, G, 4]; gt_valid, gt_crowd: [N, G]; key: one PRNG key for the batch.
    """
    anchors = jnp.asarray(anchors)
    keys = jax.random.split(key, gt_boxes.shape[0])

    def per_image(boxes, valid, crowd, k):
        matched, labels = match(anchors, boxes, valid, crowd, fg_thresh=fg_iou_thresh, bg_thresh=bg_iou_thresh,
                                allow_low_quality=True)
        idx, is_pos, ok = sample(labels, jnp.ones(labels.shape, bool), batch_size_per_image, positive_fraction, k)
        target = box_ops.encode(boxes[matched[idx]], anchors[idx], RPN_BOX_WEIGHTS)
        return AnchorSamples(index=idx, is_pos=is_pos, valid=ok, target=target)

    return jax.vmap(per_image)(gt_boxes, gt_valid, gt_crowd, keys)


def sampled_rpn_losses(logits: Array, deltas: Array, samples: AnchorSamples) -> tuple[Array, Array]:
    """torchvision's RPN losses from the head's outputs at the sampled anchors.

    Objectness is sigmoid BCE averaged over the sampled anchors and box regression is smooth-L1
    (beta 1/9) summed over positives divided by the sampled count (over the whole batch, as
    torchvision concatenates images).

    Args:
      logits: [N, S]; deltas: [N, S, 4], at ``samples.index`` (see :meth:`RPNHead.at_anchors`).
    Returns:
      (loss_objectness, loss_rpn_box_reg) scalars.
    """
    bce = optax.sigmoid_binary_cross_entropy(logits, samples.is_pos.astype(logits.dtype))
    reg = smooth_l1(deltas - samples.target, 1.0 / 9).sum(-1)
    denom = jnp.maximum(samples.valid.sum(), 1).astype(logits.dtype)
    bce = jnp.sum(jnp.where(samples.valid, bce, 0.0))
    return bce / denom, jnp.sum(jnp.where(samples.is_pos, reg, 0.0)) / denom
