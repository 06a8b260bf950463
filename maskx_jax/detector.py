"""Mask R-CNN (torchvision-compatible) in Flax NNX: the module tree and ``predict``.

The parameter tree mirrors torchvision's ``MaskRCNN`` (``backbone``, ``rpn.head``, ``roi_heads.*``)
so converted checkpoints need no reordering. Training losses live elsewhere; this file holds the
inference path, a single jit-compilable function of static shape.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from maskx_jax.box_head import FastRCNNPredictor, TwoMLPHead, detect_boxes
from maskx_jax.fpn import ResNetFPN
from maskx_jax.mask_head import MaskRCNNHeads, MaskRCNNPredictor, mask_logits_for_labels
from maskx_jax.roi_align import multiscale_roi_align
from maskx_jax.rpn import RPN, select_proposals
from maskx_jax.types import Detections

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Typed architecture + inference settings. Defaults are torchvision ``maskrcnn_resnet50_fpn`` (v1).

    num_classes counts the background (COCO: 91 = background + 90 category slots, as torchvision).
    """

    depth: int = 50
    num_classes: int = 91
    fpn_channels: int = 256
    freeze_at: int = 2
    norm: str = "frozen_bn"
    norm_eps: float = 1e-5
    # RPN
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    # RoI heads
    box_roi_size: int = 7
    mask_roi_size: int = 14
    sampling_ratio: int = 2
    aligned: bool = False
    representation: int = 1024
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100

    @property
    def pooler_scales(self) -> tuple[float, ...]:
        """RoIAlign scales of P2..P5 (torchvision infers exactly these from the feature shapes)."""
        return (1 / 4, 1 / 8, 1 / 16, 1 / 32)


class RoIHeads(nnx.Module):
    """Box and mask branches with torchvision's attribute names."""

    def __init__(self, cfg: DetectorConfig, *, rngs: nnx.Rngs):
        c = cfg.fpn_channels
        self.box_head = TwoMLPHead(c, cfg.box_roi_size, cfg.representation, rngs=rngs)
        self.box_predictor = FastRCNNPredictor(cfg.representation, cfg.num_classes, rngs=rngs)
        self.mask_head = MaskRCNNHeads(c, 256, rngs=rngs)
        self.mask_predictor = MaskRCNNPredictor(256, 256, cfg.num_classes, rngs=rngs)


class MaskRCNN(nnx.Module):
    """Mask R-CNN. ``predict`` maps a padded image batch to fixed-size :class:`Detections`."""

    def __init__(self, cfg: DetectorConfig, *, rngs: nnx.Rngs):
        self.cfg: DetectorConfig = cfg
        self.backbone = ResNetFPN(cfg.depth, out_channels=cfg.fpn_channels, freeze_at=cfg.freeze_at, norm=cfg.norm,
                                  norm_eps=cfg.norm_eps, rngs=rngs)
        self.rpn = RPN(cfg.fpn_channels, anchor_sizes=cfg.anchor_sizes, aspect_ratios=cfg.aspect_ratios, rngs=rngs)
        self.roi_heads = RoIHeads(cfg, rngs=rngs)

    def mask_class_weights(self) -> tuple[Array, Array | None]:
        """Per-class 1x1 mask weights [K+1, 256] and bias [K+1]; Mask^X overrides this with tau."""
        return self.roi_heads.mask_predictor.class_weights()

    def predict(self, images: Array, image_sizes: Array) -> Detections:
        """Inference on a padded batch.

        Args:
          images: [N, H, W, 3] float32, normalised, H and W multiples of 32 (see ``transform.preprocess``).
          image_sizes: [N, 2] int32 (h, w) of each image before padding.
        Returns:
          :class:`Detections` with D = ``detections_per_img`` rows per image in the input frame.
        """
        cfg = self.cfg
        feats = self.backbone(images)
        logits, deltas, anchors, counts = self.rpn(feats, images.shape[1:3])
        props = select_proposals(logits, deltas, anchors, counts, image_sizes,
                                 pre_nms_top_n=cfg.rpn_pre_nms_top_n_test,
                                 post_nms_top_n=cfg.rpn_post_nms_top_n_test, nms_thresh=cfg.rpn_nms_thresh)
        pooled = feats[:4]  # RoIAlign reads P2..P5, never P6
        box_feats = multiscale_roi_align(pooled, props.boxes, (cfg.box_roi_size,) * 2, cfg.sampling_ratio,
                                         cfg.aligned, cfg.pooler_scales)
        class_logits, box_deltas = self.roi_heads.box_predictor(self.roi_heads.box_head(box_feats))
        post = lambda cl, bd, pb, pv, hw: detect_boxes(  # noqa: E731
            cl, bd, pb, pv, hw, score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.detections_per_img)
        boxes, scores, labels, valid = jax.vmap(post)(class_logits, box_deltas, props.boxes, props.valid,
                                                      image_sizes)
        masks = self.mask_probs(pooled, boxes, labels)
        return Detections(boxes=boxes, scores=scores, labels=labels, valid=valid, masks=masks)

    def mask_probs(self, pooled: list[Array], boxes: Array, labels: Array) -> Array:
        """Mask probabilities of each box's own class: boxes [N, D, 4], labels [N, D] -> [N, D, 28, 28]."""
        cfg = self.cfg
        n, d = labels.shape
        feats = multiscale_roi_align(pooled, boxes, (cfg.mask_roi_size,) * 2, cfg.sampling_ratio, cfg.aligned,
                                     cfg.pooler_scales)
        feats = feats.reshape(n * d, *feats.shape[2:])
        feats = self.roi_heads.mask_predictor.features(self.roi_heads.mask_head(feats))
        weight, bias = self.mask_class_weights()
        logits = mask_logits_for_labels(feats, weight, bias, labels.reshape(-1))
        return jax.nn.sigmoid(logits).reshape(n, d, *logits.shape[1:])


def build_detector(cfg: DetectorConfig, seed: int = 0) -> MaskRCNN:
    """Construct a randomly initialised detector."""
    return MaskRCNN(cfg, rngs=nnx.Rngs(seed))


def make_predict_fn(model: MaskRCNN) -> Callable[[Array, Array], Detections]:
    """One jit-compiled ``predict``: traced once per (batch, height, width) input shape.

    The module is split into a static graph and a state pytree, so the compiled function takes the
    weights as an argument (no constants baked into the executable, no retrace on weight updates).
    """
    graphdef, state = nnx.split(model)
    traced_shapes: list[tuple[int, ...]] = []

    @jax.jit
    def _predict(state, images, image_sizes):
        traced_shapes.append(tuple(images.shape))  # runs at trace time only: counts compilations
        return nnx.merge(graphdef, state).predict(images, image_sizes)

    def predict(images: Array, image_sizes: Array) -> Detections:
        return _predict(state, jnp.asarray(images, jnp.float32), jnp.asarray(image_sizes, jnp.int32))

    predict.jitted = _predict  # for ahead-of-time lowering / cost analysis
    predict.traced_shapes = traced_shapes  # one entry per trace; a repeat means a recompile
    return predict
