"""Baseline for the voc -> non-voc split: class-agnostic mask head (one channel for all classes)."""
from maskx_jax.configs.coco_voc2nonvoc_r50 import get_config as _base


def get_config():
    c = _base()
    c.model.mask_mode = "class_agnostic"
    c.model.mlp_fusion = False
    return c
