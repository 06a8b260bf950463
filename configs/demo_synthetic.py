"""Mask^X R-CNN (cls+box, 2-layer tau, stop-grad, MLP fusion) trained end to end on the built-in synthetic
shapes dataset (``shapes10``), from scratch, sized for a 2-core CPU (ResNet-18-FPN with GroupNorm,
128x128), with Detectron's recipe (the paper's) and this config's own short warmup. ``make demo`` runs
the controlled comparison instead (``configs/transfer_synthetic.py``)."""
from maskx_jax.config import apply_recipe, base_config

# Set A (masks in training) vs set B (boxes only): 6 + 4 of the 10 shape classes.
SET_A = "disk,square,triangle,star,cross,ellipse"


def get_config():
    c = apply_recipe(base_config(), "detectron")
    m, d, t, e = c.model, c.data, c.train, c.eval
    m.depth = 18
    m.norm = "group_norm"  # no pretrained weights can be downloaded: train from scratch
    m.freeze_at = 0
    m.fpn_channels = 64
    m.representation = 256
    m.mask_head_channels = 32  # also sizes the MLP-fusion FC (32*28*28 -> 28*28): the CPU budget
    m.transfer_hidden = 32
    m.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    m.rpn_pre_nms_top_n_train = 600
    m.rpn_post_nms_top_n_train = 300
    m.rpn_pre_nms_top_n_test = 300
    m.rpn_post_nms_top_n_test = 150
    m.rpn_batch_size_per_image = 128
    m.roi_batch_size_per_image = 128
    m.max_mask_rois_per_image = 32
    m.detections_per_img = 30
    m.mask_mode = "transfer"
    m.transfer_input = "cls+box"
    m.transfer_layers = 2
    m.stop_det_grad = True
    m.mlp_fusion = True

    d.source = "synthetic"
    d.set_a = SET_A
    d.min_size = 128
    d.max_size = 128
    d.pad_height = 128
    d.pad_width = 128
    d.max_instances = 12
    d.mask_crop_size = 32
    d.synthetic_num_train = 600
    d.synthetic_num_val = 100
    d.synthetic_image_size = 128

    t.batch_size = 4
    t.steps = 600
    # AdamW, not the paper's SGD: from scratch on a CPU budget it reaches ~1.6x the box AP of
    # SGD (lr 0.01) in the same 500 steps (measured: 10.2 vs 6.3 box AP).
    t.optimizer = "adamw"
    t.lr = 0.001
    t.weight_decay = 1e-4
    t.warmup_steps = 100  # the recipe's 500 would be most of this schedule
    t.lr_steps = (450, 560)
    t.clip_grad_norm = 10.0  # from scratch: keeps an early bad batch from blowing up the run
    t.checkpoint_every = 300
    t.keep_checkpoints = 2
    t.log_every = 20

    e.batch_size = 20
    e.num_pictures = 6
    e.picture_score_thresh = 0.3  # a short CPU schedule gives modest scores: draw more of them
    return c
