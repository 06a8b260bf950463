"""Oracle: ordinary Mask R-CNN with a class-specific mask head trained on masks of all 80 classes
(set A = all): the upper bound the paper compares against."""
from maskx_jax.configs.coco_voc2nonvoc_r50 import get_config as _base


def get_config():
    c = _base()
    c.model.mask_mode = "class_specific"
    c.model.mlp_fusion = False
    c.data.set_a = "all"
    return c
