"""Fast R-CNN box branch: 2-FC head, predictor, and inference post-processing (static shapes)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from maskx_jax import boxes as box_ops
from maskx_jax.layers import Linear
from maskx_jax.matching import match, sample
from maskx_jax.nms import nms_padded
from maskx_jax.rpn import smooth_l1

Array = jax.Array

ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# How a box predictor trained from scratch is initialised: torch's nn.Linear default (torchvision), or
# Detectron's (seg_every_thing lib/modeling/fast_rcnn_heads.py): cls_score N(0, 0.01), bbox_pred
# N(0, 0.001), zero biases. Mask^X's tau reads exactly these weights, so their scale at the start matters.
BOX_PREDICTOR_INITS = ("torch", "detectron")


def _torch_linear_init(fan_in: int):
    """torch ``nn.Linear``'s default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return nnx.initializers.uniform(2 * bound), bound


def _linear(in_f: int, out_f: int, rngs: nnx.Rngs) -> Linear:
    init, bound = _torch_linear_init(in_f)
    shifted = lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) - bound
    return Linear(in_f, out_f, kernel_init=shifted, bias_init=shifted, rngs=rngs)


class TwoMLPHead(nnx.Module):
    """``fc6`` (C*R*R -> rep) + ReLU, ``fc7`` (rep -> rep) + ReLU.

    Input RoI features are NHWC-flattened ([R, 7, 7, C] -> [R, 7*7*C]); ``convert/`` permutes
    torchvision's channel-major fc6 rows accordingly.
    """

    def __init__(self, in_channels: int = 256, resolution: int = 7, representation: int = 1024, *, rngs: nnx.Rngs):
        self.in_channels: int = in_channels
        self.resolution: int = resolution
        self.fc6 = _linear(in_channels * resolution * resolution, representation, rngs)
        self.fc7 = _linear(representation, representation, rngs)

    def __call__(self, x: Array) -> Array:
        """x: [..., R, R, C] -> [..., representation]."""
        x = x.reshape(*x.shape[:-3], -1)
        return jax.nn.relu(self.fc7(jax.nn.relu(self.fc6(x))))


class FastRCNNPredictor(nnx.Module):
    """``cls_score`` [rep -> K+1] and class-specific ``bbox_pred`` [rep -> 4(K+1)], class-major
    (columns 4k..4k+3 are class k), so ``bbox_pred.kernel.T.reshape(K+1, 4*rep)`` is the per-class
    box embedding Mask^X's weight transfer reads.

    init: one of :data:`BOX_PREDICTOR_INITS` (``'torch'``: U(+-1/sqrt(rep)) weights and biases;
    ``'detectron'``: N(0, 0.01) / N(0, 0.001) weights, zero biases).
    """

    def __init__(self, representation: int = 1024, num_classes: int = 91, *, init: str = "torch", rngs: nnx.Rngs):
        if init not in BOX_PREDICTOR_INITS:
            raise ValueError(f"unknown box predictor init {init!r}; expected one of {BOX_PREDICTOR_INITS}")
        self.num_classes: int = num_classes
        if init == "torch":
            self.cls_score = _linear(representation, num_classes, rngs)
            self.bbox_pred = _linear(representation, 4 * num_classes, rngs)
        else:
            zeros = nnx.initializers.zeros_init()
            self.cls_score = Linear(representation, num_classes, kernel_init=nnx.initializers.normal(0.01),
                                    bias_init=zeros, rngs=rngs)
            self.bbox_pred = Linear(representation, 4 * num_classes, kernel_init=nnx.initializers.normal(0.001),
                                    bias_init=zeros, rngs=rngs)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """x: [..., rep] -> (class logits [..., K+1], box deltas [..., 4(K+1)])."""
        return self.cls_score(x), self.bbox_pred(x)


def detect_boxes(
    class_logits: Array,
    box_deltas: Array,
    proposals: Array,
    proposal_valid: Array,
    image_size: Array,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> tuple[Array, Array, Array, Array]:
    """torchvision ``RoIHeads.postprocess_detections`` for ONE image, with static shapes.

    Args:
      class_logits: [R, K+1]; box_deltas: [R, 4(K+1)]; proposals: [R, 4]; proposal_valid: [R] bool;
      image_size: [2] (h, w) before padding.
    Returns:
      boxes [D, 4], scores [D], labels [D] int32 (1..K), valid [D] bool, sorted by score.

    Exactness: torchvision runs one class-wise NMS over all (proposal, class) pairs and keeps the
    best D. Since NMS never lets a lower-scored box affect a higher one, the first D survivors of
    each class's own NMS contain every box that can appear in the final top D; we run NMS per class
    (vmapped over K) with D outputs each, then take the top D of the K*D survivors. Same set, no
    [R*K] x [R*K] work.
    """
    num_classes = class_logits.shape[-1]
    boxes = box_ops.decode(box_deltas.reshape(-1, num_classes, 4), proposals[:, None, :], ROI_BOX_WEIGHTS,
                           math.log(1000.0 / 16))
    boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])  # [R, K+1, 4]
    scores = jax.nn.softmax(class_logits, axis=-1)
    # Drop background; lay classes first for the vmap.
    boxes = jnp.swapaxes(boxes[:, 1:], 0, 1)  # [K, R, 4]
    scores = jnp.swapaxes(scores[:, 1:], 0, 1)  # [K, R]
    valid = proposal_valid[None, :] & (scores > score_thresh) & box_ops.small_box_mask(boxes, min_size)

    keep, keep_valid = jax.vmap(lambda b, s, v: nms_padded(b, s, v, nms_thresh, detections_per_img))(
        boxes, scores, valid)  # [K, D]
    cls_scores = jnp.take_along_axis(scores, keep, axis=1)
    cls_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
    labels = jnp.broadcast_to(jnp.arange(1, num_classes, dtype=jnp.int32)[:, None], keep.shape)
    flat_scores = jnp.where(keep_valid, cls_scores, -jnp.inf).reshape(-1)
    top_scores, top = jax.lax.top_k(flat_scores, detections_per_img)
    out_valid = jnp.isfinite(top_scores)
    return (cls_boxes.reshape(-1, 4)[top], jnp.where(out_valid, top_scores, 0.0), labels.reshape(-1)[top],
            out_valid)


@struct.dataclass
class RoISamples:
    """RoIs sampled for the box/mask losses, per image: S = ``batch_size_per_image`` slots.

    rois [N, S, 4]; is_pos, valid [N, S] bool (positives fill the first slots); matched [N, S] int32
    index of the matched gt (meaningful where is_pos); labels [N, S] int32 class target (0 = bg).
    """

    rois: Array
    is_pos: Array
    valid: Array
    matched: Array
    labels: Array


def sample_rois(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_classes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    key: Array,
    *,
    fg_iou_thresh: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
) -> RoISamples:
    """torchvision ``RoIHeads.select_training_samples``: append gt boxes to the proposals, match at
    IoU 0.5 (below is background), sample 512 RoIs per image at up to 25% positive.

    proposals [N, P, 4], proposal_valid [N, P]; gt_* [N, G, ...].
    """
    keys = jax.random.split(key, proposals.shape[0])

    def per_image(props, pvalid, boxes, classes, valid, crowd, k):
        cand = jnp.concatenate([jax.lax.stop_gradient(props), boxes], axis=0)
        cvalid = jnp.concatenate([pvalid, valid & ~crowd], axis=0)
        matched, labels = match(cand, boxes, valid, crowd, fg_thresh=fg_iou_thresh, bg_thresh=fg_iou_thresh,
                                allow_low_quality=False)
        idx, is_pos, ok = sample(labels, cvalid, batch_size_per_image, positive_fraction, k)
        m = matched[idx]
        return RoISamples(rois=cand[idx], is_pos=is_pos, valid=ok, matched=m,
                          labels=jnp.where(is_pos, classes[m], 0).astype(jnp.int32))

    return jax.vmap(per_image)(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd, keys)


def box_losses(class_logits: Array, box_deltas: Array, samples: RoISamples, gt_boxes: Array,
               beta: float = 1.0 / 9) -> tuple[Array, Array]:
    """torchvision ``fastrcnn_loss``: cross-entropy over sampled RoIs and smooth-L1 on the gt class's
    deltas of positive RoIs, both divided by the number of sampled RoIs in the batch.

    class_logits [N, S, K+1]; box_deltas [N, S, 4(K+1)]; gt_boxes [N, G, 4]. ``beta``: the smooth-L1
    transition point, 1/9 in torchvision, 1 in Detectron's Fast R-CNN head (both keep 1/9 in the RPN).
    """
    n, s, k1 = class_logits.shape
    denom = jnp.maximum(samples.valid.sum(), 1).astype(class_logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, samples.labels)
    loss_cls = jnp.sum(jnp.where(samples.valid, ce, 0.0)) / denom
    deltas = box_deltas.reshape(n, s, k1, 4)
    own = jnp.take_along_axis(deltas, samples.labels[..., None, None], axis=2)[:, :, 0]  # [N, S, 4]
    matched_boxes = jnp.take_along_axis(gt_boxes, samples.matched[..., None], axis=1)
    target = box_ops.encode(matched_boxes, jax.lax.stop_gradient(samples.rois), ROI_BOX_WEIGHTS)
    reg = smooth_l1(own - target, beta).sum(-1)
    loss_box = jnp.sum(jnp.where(samples.is_pos, reg, 0.0)) / denom
    return loss_cls, loss_box
