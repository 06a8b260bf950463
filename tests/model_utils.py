"""Tiny detectors and synthetic batches shared by the training-side tests (fast on 2 CPU cores)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from maskx_jax.detector import DetectorConfig
from maskx_jax.types import Batch

TINY = DetectorConfig(
    depth=18, num_classes=5, fpn_channels=32, freeze_at=0, norm="group_norm", representation=64,
    anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, roi_batch_size_per_image=32,
    max_mask_rois_per_image=8, detections_per_img=10, mask_head_channels=32, transfer_hidden=32,
    mask_mode="transfer", mlp_fusion=True)


def tiny_config(**overrides) -> DetectorConfig:
    return dataclasses.replace(TINY, **overrides)


def synthetic_batch(seed: int = 0, n: int = 2, size: int = 64, g: int = 4, num_classes: int = 5,
                    crop: int = 16, has_mask=None) -> Batch:
    """Random boxes with disk-shaped masks; the last slot of each image is padding."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size * 0.6, size=(n, g, 2))
    wh = rng.uniform(size * 0.15, size * 0.4, size=(n, g, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, size - 1)], -1).astype(np.float32)
    valid = np.ones((n, g), bool)
    valid[:, -1] = False
    yy, xx = np.mgrid[0:crop, 0:crop]
    disk = (((yy + 0.5) / crop - 0.5) ** 2 + ((xx + 0.5) / crop - 0.5) ** 2 < 0.2).astype(np.float32)
    classes = rng.integers(1, num_classes, size=(n, g)).astype(np.int32)
    hm = np.ones((n, g), bool) if has_mask is None else np.asarray(has_mask, bool)
    return Batch(
        images=rng.normal(size=(n, size, size, 3)).astype(np.float32),
        image_sizes=np.full((n, 2), size, np.int32),
        gt_boxes=boxes, gt_classes=np.where(valid, classes, 0).astype(np.int32), gt_valid=valid,
        gt_crowd=np.zeros((n, g), bool), gt_has_mask=hm & valid,
        gt_masks=np.broadcast_to(disk, (n, g, crop, crop)).copy(),
        image_ids=np.arange(n, dtype=np.int32), original_sizes=np.full((n, 2), size, np.int32))


def loss_and_grads(model, batch: Batch, seed: int = 0):
    """Jitted ``((total, parts), grads)`` of ``model.losses`` w.r.t. its ``nnx.Param``s (an nnx.State)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return nnx.merge(graphdef, p, rest).losses(batch, jax.random.PRNGKey(seed))

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)
