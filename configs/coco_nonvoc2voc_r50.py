"""Paper experiment, reverse split: set A = the 60 non-VOC COCO classes, set B = the 20 VOC ones.
Everything else as ``coco_voc2nonvoc_r50.py`` (see it for the launch command)."""
from maskx_jax.configs.coco_voc2nonvoc_r50 import get_config as _base


def get_config():
    c = _base()
    c.data.set_a = "nonvoc"
    return c
