"""``DetectorConfig``: every model setting, its type, its default and its meaning, in one place.

The experiment config's ``model`` section (:func:`maskx_jax.config.base_config`) is built from these
defaults, and :func:`maskx_jax.model_builder.detector_config` builds this from that section, so a model key
and its default exist once. The defaults are torchvision's ``maskrcnn_resnet50_fpn`` (v1) with a
class-specific mask head (what a converted torchvision checkpoint is); ``base_config`` then selects Mask^X
(``mask_mode='transfer'``, ``mlp_fusion=True``) as the experiment's model, in one marked place.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Typed architecture, training-target and inference settings of one detector.

    ``num_classes`` counts the background (COCO in torchvision: 91); it comes from the dataset, not from the
    experiment config. Modules never see the experiment config, only this.
    """

    depth: int = 50  # ResNet depth: 18, 34, 50, 101
    num_classes: int = 91
    fpn_channels: int = 256  # FPN output channels (P2..P6)
    freeze_at: int = 2  # stop-gradient through the stem (1) and layer1 (2); 0 trains everything
    norm: str = "frozen_bn"  # frozen_bn (pretrained backbones) | group_norm (trains from scratch)
    norm_eps: float = 1e-5  # normalisation epsilon (0 for torchvision's legacy COCO v1 weights)
    # RPN
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))  # one tuple per P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor height/width ratios at every level
    rpn_pre_nms_top_n_train: int = 2000  # proposals kept per level before NMS (training)
    rpn_post_nms_top_n_train: int = 2000  # proposals kept per image after NMS (training)
    rpn_pre_nms_top_n_test: int = 1000  # per level before NMS (inference)
    rpn_post_nms_top_n_test: int = 1000  # per image after NMS (inference)
    rpn_nms_thresh: float = 0.7  # RPN NMS IoU (applied per pyramid level)
    rpn_fg_iou_thresh: float = 0.7  # anchor IoU >= this: foreground
    rpn_bg_iou_thresh: float = 0.3  # anchor IoU < this: background (between: ignored)
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN losses
    rpn_positive_fraction: float = 0.5  # at most this fraction of them positive
    # RoI heads
    box_roi_size: int = 7  # RoIAlign output for the box head
    mask_roi_size: int = 14  # mask logits are 2x this (28x28)
    sampling_ratio: int = 2  # RoIAlign samples per bin side (>= 1: static shapes)
    aligned: bool = False  # RoIAlign pixel alignment (True = Detectron2's ROIAlignV2)
    representation: int = 1024  # box head fc6/fc7 width
    roi_fg_iou_thresh: float = 0.5  # RoI IoU >= this: foreground, else background
    roi_batch_size_per_image: int = 512  # RoIs sampled per image for the box/mask losses
    roi_positive_fraction: float = 0.25  # at most this fraction of them positive
    max_mask_rois_per_image: int = 128  # static cap on positive RoIs that get a mask loss
    # Smaller mask-branch sizes chosen inside the step when every image has fewer valid detections
    # (inference) or, with mask_chunk_slots = 0, fewer supervised positives (training); exact: see
    # MaskRCNN._detection_masks and MaskRCNN._mask_loss. () = always run all detections_per_img /
    # max_mask_rois_per_image slots.
    mask_slot_buckets: tuple[int, ...] = (8, 16, 32, 64)
    # Training: the mask head runs this many slots per image at a time, for only as many chunks as hold the
    # supervised positives (a loop whose backward pass recomputes each chunk: maskx_jax/active_chunks.py), so
    # that one chunk's activations are alive and one copy of the mask head is compiled; the loss is the same
    # up to float summation order. 0 = all slots at once, or the smallest of mask_slot_buckets that holds them.
    mask_chunk_slots: int = 8
    box_score_thresh: float = 0.05  # inference: drop detections scoring <= this
    box_nms_thresh: float = 0.5  # inference: per-class NMS IoU
    detections_per_img: int = 100  # inference: detections kept per image
    # Training recipe: torchvision's values here; config.apply_recipe(c, "detectron") sets the paper's
    box_predictor_init: str = "torch"  # torch: U(+-1/sqrt(rep)) | detectron: N(0, 0.01) / N(0, 0.001), zero biases
    box_reg_beta: float = 1.0 / 9  # smooth-L1 beta of the Fast R-CNN box loss (the RPN's stays 1/9)
    binarize_mask_targets: bool = False  # mask targets thresholded at 0.5 (Detectron) instead of soft averages
    # Mask branch / Mask^X: how the per-class mask weights are produced
    mask_head_channels: int = 256  # width of the 4 mask convs and conv5_mask
    mask_mode: str = "class_specific"  # class_specific (oracle Mask R-CNN) | class_agnostic | transfer | none
    # (box-only). transfer_input: which detection weights embed a class (cls | box | cls+box); random: a control
    # (fixed N(0, 1) vectors per class instead of detection weights, the paper's Table 1a "random")
    transfer_input: str = "cls+box"
    transfer_layers: int = 2  # tau depth: 1, 2 or 3 FC layers
    transfer_hidden: int = 256  # tau hidden width (and the mask feature width it must match)
    transfer_activation: str = "leaky_relu"  # leaky_relu (slope 0.1) | relu
    stop_det_grad: bool = True  # stop_gradient on the detection weights fed to tau
    mlp_fusion: bool = False  # add a class-agnostic FC mask prediction to every class's logits
    # Compute dtype of the convolutions and FC layers (float32 | bfloat16). Parameters, box
    # coding, NMS, RoIAlign sample positions and every loss stay float32; bfloat16 halves the
    # activation memory of a training step on accelerators.
    dtype: str = "float32"
    # torchvision's per-image numbers on any canvas (maskx_jax/canvas.py): features zero outside each
    # image's size rounded up to 32, its own anchors, RoIAlign clamped to it. Training uses the same features
    # and RoIAlign (its anchors stay the canvas's, as torchvision's stay its padded batch's). False: the
    # canvas's border only (a select less before each spatial op).
    exact_canvas: bool = True
    # How convolutions are computed (maskx_jax/conv.py): auto (the backend's fast paths: on CPU Winograd and
    # canonical gradients) | canonical (CPU: canonical gradients, no Winograd) | xla (XLA's own everywhere).
    conv_impl: str = "auto"

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def pooler_scales(self) -> tuple[float, ...]:
        """RoIAlign scales of P2..P5 (torchvision infers exactly these from the feature shapes)."""
        return (1 / 4, 1 / 8, 1 / 16, 1 / 32)


NOT_FROM_EXPERIMENT_CONFIG = ("num_classes",)  # set from the dataset / checkpoint


def model_defaults() -> dict[str, Any]:
    """{field: default} of every setting an experiment config's ``model`` section holds, in field order."""
    return {f.name: f.default for f in dataclasses.fields(DetectorConfig) if f.name not in NOT_FROM_EXPERIMENT_CONFIG}
