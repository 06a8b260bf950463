"""Does Mask^X transfer? The controlled experiment on the built-in ``shapes24`` data (README: "Does
Mask^X transfer?"; driver: ``python -m maskx_jax.transfer_experiment``).

``get_config()`` is the shared base: model, data, recipe and the detector's schedule. The driver derives
every run from it (see ``maskx_jax/transfer_experiment.py``):

1. per seed, one box detector (``mask_mode=none``: boxes of all 24 classes) for ``DETECTOR_STEPS``;
2. on that detector, frozen (``train.freeze=detector``), one mask branch per arm for ``MASK_STEPS``, same
   seed, so the same data order and RoI sampling: class_agnostic, transfer, transfer_mlp, random_embedding
   (the control) and oracle (class-specific, masks of every class: the ceiling);
3. the end-to-end runs (class_agnostic and transfer_mlp trained from scratch for ``DETECTOR_STEPS``).

The protocol (arms, split, schedules, seeds, metric) was fixed in this file before any arm was run on
``shapes24``; see the README for how and why.

ResNet-18-FPN with GroupNorm from scratch (nothing is downloaded), 128x128 images, sized for a 2-core CPU.
"""
from maskx_jax.config import apply_recipe, base_config
from maskx_jax.data.synthetic_shapes import CLASS_NAMES_24

# Set B (boxes only in training): every third class of the 24, a rule fixed before any result.
SET_B = tuple(CLASS_NAMES_24[2::3])  # triangle, cross, ellipse, arrow, diamond, chevron, star4, h_shape
SET_A = ",".join(n for n in CLASS_NAMES_24 if n not in SET_B)  # the other 16

# Schedules, sized by the CPU budget (measured at batch 4: detector 0.24 s/step, a frozen-detector mask branch
# 0.17-0.35 s/step), not by any result: ~50 min per seed for all runs on a 2-core CPU.
DETECTOR_STEPS = 2000  # stage 1 and the end-to-end runs: 8000 images, ~5 epochs of the 1500
MASK_STEPS = 800  # stage 2: the mask branch on the frozen detector
SEEDS = (0, 1, 2)


def get_config():
    c = base_config()
    apply_recipe(c, "detectron")  # Mask^X's own recipe: box predictor init, 2x bias lr, beta 1, binary targets
    m, d, t, e = c.model, c.data, c.train, c.eval
    m.depth = 18
    m.norm = "group_norm"
    m.freeze_at = 0
    m.fpn_channels = 64
    m.representation = 256
    m.mask_head_channels = 32
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
    d.synthetic_variant = "shapes24"
    d.set_a = SET_A
    d.min_size = d.max_size = 128
    d.pad_height = d.pad_width = 128
    d.max_instances = 8
    d.mask_crop_size = 32
    d.synthetic_num_train = 1500
    d.synthetic_num_val = 300
    d.synthetic_image_size = 128

    t.batch_size = 4
    t.steps = DETECTOR_STEPS
    t.optimizer = "adamw"  # from scratch on a CPU budget (demo_synthetic.py says why)
    t.lr = 0.001
    t.weight_decay = 1e-4
    t.warmup_steps = 100  # the recipe's 500 is a sixth of this short schedule
    t.lr_steps = (int(0.75 * DETECTOR_STEPS), int(0.92 * DETECTOR_STEPS))
    t.clip_grad_norm = 10.0
    t.checkpoint_every = 500
    t.keep_checkpoints = 1
    t.log_every = 50

    e.batch_size = 20
    e.num_pictures = 4
    e.picture_score_thresh = 0.3
    return c
