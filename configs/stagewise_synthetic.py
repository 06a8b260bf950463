"""Stage-wise Mask^X R-CNN on an existing box detector, on the built-in synthetic shapes.

The detector (R-50-FPN backbone, RPN, box head) comes from a converted torchvision
``fasterrcnn_resnet50_fpn`` checkpoint (``train.init_checkpoint``, see the README section
"Stage-wise Mask^X on an existing box detector") and stays fixed (``train.freeze=detector``);
only the mask branch trains: tau (``roi_heads.weight_transfer``), the mask head and the MLP fusion,
on the masks of set A. This is the paper's stage-wise training (Hu et al. 2018; vs end-to-end): tau reads
the box predictor's ``cls_score``/``bbox_pred`` weights, which here never change.

Architecture keys match torchvision's Faster R-CNN (R-50-FPN, FrozenBN, 256-channel FPN, 1024-wide
box head, default anchors) so its weights load; the RPN's top-n and the RoI counts are inference /
sampling settings, sized down for 128x128 images on a CPU. The mask branch is new, so its width is
free: 32 channels keep the MLP-fusion FC (32*28*28 -> 28*28) small, as in ``demo_synthetic.py``.
The detector must have 11 classes (10 shapes + background): the synthetic label space.
"""
from maskx_jax.config import base_config

# Set A (masks in training) vs set B (boxes only), as in demo_synthetic.py.
SET_A = "disk,square,triangle,star,cross,ellipse"


def get_config():
    c = base_config()
    m, d, t, e = c.model, c.data, c.train, c.eval
    m.depth = 50
    m.norm = "frozen_bn"  # torchvision's Faster R-CNN backbone
    m.mask_mode = "transfer"
    m.transfer_input = "cls+box"
    m.transfer_layers = 2
    m.mask_head_channels = 32
    m.transfer_hidden = 32
    m.mlp_fusion = True
    m.rpn_pre_nms_top_n_train = 600
    m.rpn_post_nms_top_n_train = 300
    m.rpn_pre_nms_top_n_test = 300
    m.rpn_post_nms_top_n_test = 150
    m.roi_batch_size_per_image = 128
    m.max_mask_rois_per_image = 32
    m.detections_per_img = 30

    d.source = "synthetic"
    d.set_a = SET_A
    d.min_size = 128
    d.max_size = 128
    d.pad_height = 128
    d.pad_width = 128
    d.max_instances = 12
    d.mask_crop_size = 32

    t.init_checkpoint = "runs/stagewise/fasterrcnn"  # written by the README's convert command
    t.freeze = "detector"  # backbone + FPN, RPN, box head fixed: only the mask branch trains
    t.batch_size = 4
    t.steps = 200
    t.optimizer = "sgd"  # the paper's
    t.lr = 0.01
    t.weight_decay = 1e-4
    t.warmup_steps = 50
    t.lr_steps = (140, 180)
    t.checkpoint_every = 100
    t.keep_checkpoints = 2
    t.log_every = 20

    e.batch_size = 20
    e.num_pictures = 4
    e.picture_score_thresh = 0.3
    return c
