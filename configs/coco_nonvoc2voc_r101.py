"""non-voc -> voc with ResNet-101-FPN."""
from maskx_jax.configs.coco_voc2nonvoc_r101 import get_config as _base


def get_config():
    c = _base()
    c.data.set_a = "nonvoc"
    return c
