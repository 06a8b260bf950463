"""Mask R-CNN / Mask^X R-CNN in Flax NNX: the module tree, ``losses`` and ``predict``.

The parameter tree mirrors torchvision's ``MaskRCNN`` (``backbone``, ``rpn.head``, ``roi_heads.*``)
so converted checkpoints need no reordering; Mask^X adds ``roi_heads.weight_transfer`` (tau) and
``roi_heads.mask_predictor.mask_mlp`` (MLP fusion). Training (``losses``) and inference
(``predict``) are separate methods, each a pure function of the module state and static-shape
inputs, so each jit-compiles once per input shape.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maskx_jax import anchors as anchors_lib
from maskx_jax.active_chunks import active_chunk_sum, chunks_needed, skip_is_safe
from maskx_jax.box_head import (FastRCNNPredictor, RoISamples, TwoMLPHead, box_losses, detect_boxes,
                                 sample_rois)
from maskx_jax.canvas import Canvas
from maskx_jax.detector_config import DetectorConfig
from maskx_jax.fpn import ResNetFPN
from maskx_jax.layers import Conv2d
from maskx_jax.mask_head import (MaskRCNNHeads, MaskRCNNPredictor, mask_logits_for_labels, mask_loss_denominator,
                                 mask_loss_sum, mask_targets)
from maskx_jax.roi_align import multiscale_roi_align
from maskx_jax.rpn import RPN, sample_anchors, sampled_rpn_losses, select_proposals
from maskx_jax.types import Batch, Detections
from maskx_jax.weight_transfer import WeightTransfer

Array = jax.Array

# Loss groups ``MaskRCNN.losses`` can skip (stage-wise training: the losses of frozen parts).
LOSS_GROUPS = ("rpn", "box", "mask")


class RoIHeads(nnx.Module):
    """Box and mask branches with torchvision's attribute names (+ ``weight_transfer`` for Mask^X).

    ``mask_mode='none'`` builds a box-only detector (torchvision's Faster R-CNN): ``mask_head``,
    ``mask_predictor`` and ``weight_transfer`` are None.
    """

    def __init__(self, cfg: DetectorConfig, *, rngs: nnx.Rngs):
        c, mc = cfg.fpn_channels, cfg.mask_head_channels
        self.box_head = TwoMLPHead(c, cfg.box_roi_size, cfg.representation, rngs=rngs)
        self.box_predictor = FastRCNNPredictor(cfg.representation, cfg.num_classes, init=cfg.box_predictor_init,
                                               rngs=rngs)
        has_masks = cfg.mask_mode != "none"
        self.mask_head = MaskRCNNHeads(c, mc, rngs=rngs) if has_masks else None
        self.mask_predictor = (MaskRCNNPredictor(mc, mc, cfg.num_classes, mode=cfg.mask_mode,
                                                 mlp_fusion=cfg.mlp_fusion, resolution=2 * cfg.mask_roi_size,
                                                 rngs=rngs) if has_masks else None)
        self.weight_transfer = (
            WeightTransfer(cfg.representation, input_kind=cfg.transfer_input, num_layers=cfg.transfer_layers,
                           hidden=cfg.transfer_hidden, out_dim=mc, activation=cfg.transfer_activation,
                           stop_det_grad=cfg.stop_det_grad, num_classes=cfg.num_classes, rngs=rngs)
            if cfg.mask_mode == "transfer" else None)


class MaskRCNN(nnx.Module):
    """Mask R-CNN (``mask_mode='class_specific'``) and Mask^X R-CNN (``'transfer'``) and the
    class-agnostic baseline (``'class_agnostic'``)."""

    def __init__(self, cfg: DetectorConfig, *, rngs: nnx.Rngs):
        self.cfg: DetectorConfig = cfg
        self.backbone = ResNetFPN(cfg.depth, out_channels=cfg.fpn_channels, freeze_at=cfg.freeze_at, norm=cfg.norm,
                                  norm_eps=cfg.norm_eps, rngs=rngs)
        self.rpn = RPN(cfg.fpn_channels, anchor_sizes=cfg.anchor_sizes, aspect_ratios=cfg.aspect_ratios, rngs=rngs)
        self.roi_heads = RoIHeads(cfg, rngs=rngs)
        for _, module in nnx.iter_graph(self):  # one implementation choice for every convolution
            if isinstance(module, Conv2d):
                module.impl = cfg.conv_impl

    # ----------------------------------------------------------------------------- mask logits
    def mask_class_weights(self) -> tuple[Array, Array | None]:
        """Every class's 1x1 mask weights [K+1, C] (or [1, C] class-agnostic) and bias (None for tau)."""
        rh = self.roi_heads
        if rh.weight_transfer is not None:
            bp = rh.box_predictor
            return rh.weight_transfer(bp.cls_score.kernel[...], bp.bbox_pred.kernel[...]), None
        if rh.mask_predictor is None:
            raise ValueError("a box-only detector (mask_mode='none') has no mask weights")
        return rh.mask_predictor.class_weights()

    def mask_logits(self, features: Array, labels: Array, heads: RoIHeads | None = None) -> Array:
        """Logits of each RoI's own class. features [R, 28, 28, C], labels [R] in 0..K -> [R, 28, 28].

        In transfer mode tau runs only on the R gathered class embeddings, so the cost does not
        grow with the vocabulary K (the paper's ~3000-class use). ``heads``: the RoI heads to read the
        weights from (default ``self.roi_heads``; the chunked mask loss passes a merged copy).
        """
        rh = self.roi_heads if heads is None else heads
        if rh.weight_transfer is not None:
            bp = rh.box_predictor
            wt = rh.weight_transfer
            weight = wt.transform(wt.embed(bp.cls_score.kernel[...], bp.bbox_pred.kernel[...], labels))
            logits = mask_logits_for_labels(features, weight, None, None)
        else:
            weight, bias = rh.mask_predictor.class_weights()
            idx = labels if weight.shape[0] > 1 else jnp.zeros_like(labels)
            logits = mask_logits_for_labels(features, weight, bias, idx)
        fused = rh.mask_predictor.fusion(features)
        logits = logits if fused is None else logits + fused
        return logits.astype(jnp.float32)

    def _canvas(self, image_sizes: Array) -> Canvas | None:
        """Each image's torchvision extent on the canvas (``exact_canvas``), or None."""
        return Canvas(image_sizes) if self.cfg.exact_canvas else None

    def _features(self, images: Array, canvas: Canvas | None = None) -> list[Array]:
        """Backbone + FPN in the compute dtype: [N, H, W, 3] -> P2..P6."""
        return self.backbone(images.astype(self.cfg.compute_dtype), canvas)

    def _roi_align(self, pooled: list[Array], boxes: Array, size: int, canvas: Canvas | None) -> Array:
        """[N, R, 4] boxes pooled from P2..P5 -> [N, R, size, size, C] (clamped to each extent with a canvas)."""
        cfg = self.cfg
        return multiscale_roi_align(pooled, boxes, (size, size), cfg.sampling_ratio, cfg.aligned, cfg.pooler_scales,
                                    extents=None if canvas is None else canvas.extent)

    def _rpn(self, feats: list[Array], image_hw: tuple[int, int], detached: bool = False):
        """RPN head outputs in float32 (scores and deltas feed top-k, NMS and box decoding).

        ``detached``: no gradient reaches the features or the head's weights from these outputs.
        """
        rpn = self.rpn
        if detached:
            feats = [jax.lax.stop_gradient(f) for f in feats]
            graphdef, state = nnx.split(rpn)
            rpn = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        logits, deltas, anchors, counts = rpn(feats, image_hw)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32), anchors, counts

    def _box_outputs(self, box_feats: Array) -> tuple[Array, Array]:
        """Box head + predictor, outputs in float32."""
        class_logits, box_deltas = self.roi_heads.box_predictor(self.roi_heads.box_head(box_feats))
        return class_logits.astype(jnp.float32), box_deltas.astype(jnp.float32)

    def _mask_features(self, pooled: Sequence[Array], boxes: Array, canvas: Canvas | None = None,
                       heads: RoIHeads | None = None) -> Array:
        """boxes [N, R, 4] -> conv5 mask features [N*R, 28, 28, C] (``heads`` as in :meth:`mask_logits`)."""
        rh = self.roi_heads if heads is None else heads
        feats = self._roi_align(list(pooled), boxes, self.cfg.mask_roi_size, canvas)
        feats = feats.reshape(-1, *feats.shape[2:])
        return rh.mask_predictor.features(rh.mask_head(feats))

    # ----------------------------------------------------------------------------- inference
    def predict(self, images: Array, image_sizes: Array) -> Detections:
        """Inference on a padded batch.

        Args:
          images: [N, H, W, 3] float32, normalised, H and W multiples of 32 (see ``transform.preprocess``).
          image_sizes: [N, 2] int32 (h, w) of each image before padding.
        Returns:
          :class:`Detections` with D = ``detections_per_img`` rows per image in the input frame
          (``masks`` None for a box-only detector, ``mask_mode='none'``).
        """
        cfg = self.cfg
        canvas = self._canvas(image_sizes)
        feats = self._features(images, canvas)
        logits, deltas, anchors, counts = self._rpn(feats, images.shape[1:3])
        anchor_valid = None
        if canvas is not None:  # each image's own anchors, as torchvision builds them for its tensor
            anchors, anchor_valid = anchors_lib.anchor_grid_per_image(
                canvas.extent, [f.shape[1:3] for f in feats], self.backbone.strides, self.rpn.anchor_sizes,
                (tuple(self.rpn.aspect_ratios),) * len(self.rpn.anchor_sizes))
        props = select_proposals(logits, deltas, anchors, counts, image_sizes,
                                 pre_nms_top_n=cfg.rpn_pre_nms_top_n_test,
                                 post_nms_top_n=cfg.rpn_post_nms_top_n_test, nms_thresh=cfg.rpn_nms_thresh,
                                 anchor_valid=anchor_valid)
        pooled = feats[:4]  # RoIAlign reads P2..P5, never P6
        box_feats = self._roi_align(pooled, props.boxes, cfg.box_roi_size, canvas)
        class_logits, box_deltas = self._box_outputs(box_feats)
        post = lambda cl, bd, pb, pv, hw: detect_boxes(
            cl, bd, pb, pv, hw, score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.detections_per_img)
        boxes, scores, labels, valid = jax.vmap(post)(class_logits, box_deltas, props.boxes, props.valid,
                                                      image_sizes)
        masks = (None if self.roi_heads.mask_head is None
                 else self._detection_masks(pooled, boxes, labels, valid, canvas))
        return Detections(boxes=boxes, scores=scores, labels=labels, valid=valid, masks=masks)

    def _detection_masks(self, pooled: list[Array], boxes: Array, labels: Array, valid: Array,
                         canvas: Canvas | None = None) -> Array:
        """Mask probabilities [N, D, 28, 28] of the detections (boxes [N, D, 4], labels, valid [N, D]).

        Valid detections are a prefix of each image's D rows, so the mask branch runs on the first k
        rows only, k the smallest of ``mask_slot_buckets`` (+ D) that holds every image's valid
        detections, picked inside ``predict`` by ``lax.switch`` (exact up to summation order: each
        row's mask depends only on its own box). With a high ``box_score_thresh``, or on images
        with few objects, most of the mask head's work (about a third of inference at D = 100) is
        skipped. Rows that are not valid get zero masks.
        """
        n, d = labels.shape

        def branch(k: int) -> Callable[[], Array]:
            def masks() -> Array:
                logits = self.mask_logits(self._mask_features(pooled, boxes[:, :k], canvas),
                                          labels[:, :k].reshape(-1))
                probs = jax.nn.sigmoid(logits).reshape(n, k, *logits.shape[1:])
                return jnp.pad(probs, ((0, 0), (0, d - k), (0, 0), (0, 0)))
            return masks

        sizes = mask_slot_sizes(d, self.cfg.mask_slot_buckets)
        masks = (branch(d)() if len(sizes) == 1
                 else jax.lax.switch(mask_slot_index(valid, sizes), [branch(k) for k in sizes]))
        return jnp.where(valid[:, :, None, None], masks, 0.0)

    # ----------------------------------------------------------------------------- training
    def losses(self, batch: Batch, rng: Array, *, skip: Sequence[str] = ()) -> tuple[Array, dict[str, Array]]:
        """All training losses for a padded batch (see :class:`maskx_jax.types.Batch`).

        Returns (total, {loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
        loss_mask}); the mask loss counts only positive RoIs whose matched gt has a mask
        (``gt_has_mask``: set A), on the gt class's channel. A box-only detector
        (``mask_mode='none'``) has no ``loss_mask``.

        skip: loss groups of :data:`LOSS_GROUPS` neither computed nor returned: ``'rpn'``
          (loss_objectness, loss_rpn_box_reg), ``'box'`` (loss_classifier, loss_box_reg), ``'mask'``.
          Stage-wise training skips the losses of frozen parts, which could train nothing: the
          anchor sampling and the box head's forward pass are then not run at all. The RPN's
          proposals, which the RoI sampling needs, are always computed.
        """
        unknown = set(skip) - set(LOSS_GROUPS)
        if unknown:
            raise ValueError(f"unknown loss groups {sorted(unknown)}; expected some of {LOSS_GROUPS}")
        cfg = self.cfg
        with_mask = "mask" not in skip and self.roi_heads.mask_head is not None
        k_rpn, k_roi = jax.random.split(rng)
        canvas = self._canvas(batch.image_sizes)
        feats = self._features(batch.images, canvas)
        parts: dict[str, Array] = {}
        # The head over every anchor feeds only the proposals, which carry no gradient (torchvision
        # detaches them too); the RPN losses read the head at their sampled anchors alone
        # (RPNHead.at_anchors). So the dense head runs detached and its backward pass, both gradient
        # convolutions of the 3x3 conv over every pixel of P2..P6, is never computed.
        logits, deltas, anchors, counts = self._rpn(feats, batch.images.shape[1:3], detached=True)
        if "rpn" not in skip:
            anchor_samples = sample_anchors(
                anchors, batch.gt_boxes, batch.gt_valid, batch.gt_crowd, k_rpn,
                fg_iou_thresh=cfg.rpn_fg_iou_thresh, bg_iou_thresh=cfg.rpn_bg_iou_thresh,
                batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=cfg.rpn_positive_fraction)
            sampled_logits, sampled_deltas = self.rpn.head.at_anchors(feats, anchor_samples.index)
            parts["loss_objectness"], parts["loss_rpn_box_reg"] = sampled_rpn_losses(
                sampled_logits.astype(jnp.float32), sampled_deltas.astype(jnp.float32), anchor_samples)
        if "box" not in skip or with_mask:
            props = select_proposals(logits, deltas, anchors, counts, batch.image_sizes,
                                     pre_nms_top_n=cfg.rpn_pre_nms_top_n_train,
                                     post_nms_top_n=cfg.rpn_post_nms_top_n_train, nms_thresh=cfg.rpn_nms_thresh)
            samples = sample_rois(props.boxes, props.valid, batch.gt_boxes, batch.gt_classes, batch.gt_valid,
                                  batch.gt_crowd, k_roi, fg_iou_thresh=cfg.roi_fg_iou_thresh,
                                  batch_size_per_image=cfg.roi_batch_size_per_image,
                                  positive_fraction=cfg.roi_positive_fraction)
            pooled = feats[:4]
            if "box" not in skip:
                box_feats = self._roi_align(pooled, samples.rois, cfg.box_roi_size, canvas)
                class_logits, box_deltas = self._box_outputs(box_feats)
                parts["loss_classifier"], parts["loss_box_reg"] = box_losses(
                    class_logits, box_deltas, samples, batch.gt_boxes, beta=cfg.box_reg_beta)
            if with_mask:
                parts["loss_mask"] = self._mask_loss(pooled, samples, batch, canvas)
        total = sum(parts.values()) if parts else jnp.zeros((), jnp.float32)
        return total, parts

    def _mask_loss(self, pooled: list[Array], samples: RoISamples, batch: Batch,
                   canvas: Canvas | None = None) -> Array:
        """Mask loss of the positive RoIs whose matched gt has a mask, on the gt class's channel.

        The sampler puts the positives in the first M = ``max_mask_rois_per_image`` slots. Within those, the
        supervised ones are moved to the front (stable), so that the mask head, the costliest part of the step
        when positives are few, runs on the first slots only; the loss equals the all-M-slots loss (the other
        slots have weight 0) up to float summation order.

        * ``mask_chunk_slots`` c > 0 (default): the mask head runs c slots of every image at a time, for
          ``ceil(k / c)`` chunks, k the largest count of supervised positives of an image (a max over the global
          batch under data parallelism), in a loop whose backward pass recomputes each chunk
          (:func:`maskx_jax.active_chunks.active_chunk_sum`): one compiled copy of the mask head, one chunk's
          activations alive at a time, no work on the chunks without supervised slots.
        * c = 0: all M slots at once, or the smallest of ``mask_slot_buckets`` (+ M) that holds k, chosen by
          ``lax.switch`` over one static-shape branch per bucket (each branch its own copy of the mask head).
        """
        cfg = self.cfg
        m = min(cfg.max_mask_rois_per_image, samples.rois.shape[1])
        n, g = batch.gt_classes.shape
        matched = samples.matched[:, :m]
        per_slot = lambda x: jnp.take_along_axis(x, matched, axis=1)  # gt array -> slots
        supervise = samples.is_pos[:, :m] & per_slot(batch.gt_has_mask) & per_slot(batch.gt_valid)
        order = jnp.argsort(~supervise, axis=1, stable=True)  # supervised slots first
        matched = jnp.take_along_axis(matched, order, axis=1)
        supervise = jnp.take_along_axis(supervise, order, axis=1)
        rois = jnp.take_along_axis(samples.rois[:, :m], order[..., None], axis=1)
        labels = per_slot(batch.gt_classes)  # with the reordered ``matched``
        matched_boxes = jnp.take_along_axis(batch.gt_boxes, matched[..., None], axis=1)
        flat_gt = (matched + jnp.arange(n, dtype=jnp.int32)[:, None] * g)
        crops = batch.gt_masks.reshape(n * g, *batch.gt_masks.shape[2:])
        slots = (rois, labels, matched_boxes, flat_gt, supervise)

        def chunk_loss_sum(slots: tuple[Array, ...], pooled: Sequence[Array], canvas: Canvas | None,
                           crops: Array, heads: RoIHeads | None = None) -> Array:
            """Summed mask BCE of some slots of every image: rois [N, c, 4], the rest [N, c]."""
            c_rois, c_labels, c_boxes, c_gt, c_supervise = slots
            feats = self._mask_features(pooled, jax.lax.stop_gradient(c_rois), canvas, heads)
            logits = self.mask_logits(feats, c_labels.reshape(-1), heads)
            targets = mask_targets(c_rois.reshape(-1, 4), c_boxes.reshape(-1, 4), crops, c_gt.reshape(-1),
                                   resolution=logits.shape[-1])
            if cfg.binarize_mask_targets:  # Detectron: a pixel is in the mask iff >= half of it is
                targets = (targets >= 0.5).astype(targets.dtype)
            return mask_loss_sum(logits, jax.lax.stop_gradient(targets), c_supervise.reshape(-1))

        chunk = int(cfg.mask_chunk_slots)
        if chunk > 0:
            # active_chunk_sum's function must be pure: the heads' parameters and the features go in as
            # arguments (differentiated), the rest of the heads (the box head: unused), the canvas and the gt
            # crops as data. Every parameter of the mask branch (tau, the MLP fusion, the box predictor's
            # weights when tau's input is not detached) gets its gradient; the others, none.
            graphdef, params, rest = nnx.split(
                self.roi_heads, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("box_head"))), ...)

            def fn(diff, data, piece: tuple[Array, ...]) -> Array:
                (params, pooled), (rest, extent, crops) = diff, data
                heads = nnx.merge(graphdef, params, rest)
                return chunk_loss_sum(piece, pooled, None if extent is None else Canvas(extent), crops, heads)

            total = active_chunk_sum(fn, min(chunk, m), (params, tuple(pooled)),
                                     (rest, None if canvas is None else canvas.extent, crops),
                                     slots, chunks_needed(supervise, min(chunk, m)) if skip_is_safe() else None)
            return total / mask_loss_denominator(supervise.reshape(-1), 2 * cfg.mask_roi_size)

        def branch(k: int) -> Callable[[], Array]:
            def loss() -> Array:
                first = tuple(x[:, :k] for x in slots)
                denom = mask_loss_denominator(supervise[:, :k].reshape(-1), 2 * cfg.mask_roi_size)
                return chunk_loss_sum(first, pooled, canvas, crops) / denom
            return loss

        sizes = mask_slot_sizes(m, cfg.mask_slot_buckets)
        if len(sizes) == 1:
            return branch(m)()
        # Rematerialised branches: lax.switch keeps every branch's backward residuals (zero-filled for
        # the branches not taken), ~0.3 GiB of memset per step at 128 slots; with jax.checkpoint the
        # residuals are the branch inputs, which exist anyway, and the taken branch's forward is
        # recomputed in the backward pass.
        return jax.lax.switch(mask_slot_index(supervise, sizes), [jax.checkpoint(branch(k)) for k in sizes])


def mask_slot_sizes(max_slots: int, buckets: Sequence[int]) -> tuple[int, ...]:
    """The static slot counts the mask branch is compiled for: the buckets below ``max_slots``, then it."""
    return tuple(sorted({int(b) for b in buckets if 0 < int(b) < max_slots})) + (max_slots,)


def mask_slot_index(used: Array, sizes: Sequence[int]) -> Array:
    """Index into ``sizes`` (increasing, last = all slots) of the smallest slot count that holds every
    image's used slots (supervised positives, valid detections; moved to the front beforehand).
    used: [N, M] bool -> int32 scalar."""
    need = jnp.max(jnp.sum(used, axis=1)).astype(jnp.int32)
    return jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need, side="left").astype(jnp.int32)


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
