"""voc -> non-voc with ResNet-101-FPN (the backbone of the paper's Table 2). Convert the backbone
with ``--arch resnet101`` and pass it as ``--config.train.init_checkpoint``.

Schedule of the reference's R-101 configs (seg_every_thing ``configs/bbox2mask_coco/*R101*.yaml``):
8 images per batch, LR 0.01, 180k steps, decay at 120k and 160k (the same number of epochs as the
R-50 schedule at half the batch)."""
from maskx_jax.configs.coco_voc2nonvoc_r50 import get_config as _base


def get_config():
    c = _base()
    c.model.depth = 101
    c.train.batch_size = 8
    c.train.lr = 0.01
    c.train.steps = 180000
    c.train.lr_steps = (120000, 160000)
    return c
