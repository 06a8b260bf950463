"""voc -> non-voc with ResNet-101-FPN (the backbone of the paper's Table 2). Convert the backbone
with ``--arch resnet101`` and pass it as ``--config.train.init_checkpoint``."""
from configs.coco_voc2nonvoc_r50 import get_config as _base


def get_config():
    c = _base()
    c.model.depth = 101
    return c
