"""Large vocabulary, stage 1 of 2: a box detector (Faster R-CNN: ``model.mask_mode=none``) for the ~3000
Visual Genome classes, as the paper trains its VG3k model stage-wise (Hu et al. 2018 Sec. 5; seg_every_thing
``configs/bbox2mask_vg/eval_sw/stage1_e2e_fast_rcnn_R-50-FPN_1x_1im.yaml``: R-50-FPN, 8 images per batch,
LR 0.01, 180k steps, decay at 120k and 160k; Detectron's recipe). Stage 2 (``vg3k_maskx.py``) trains the
mask branch on COCO's masks with this detector frozen.

Data: the COCO-format VG training JSON (boxes; ``categories`` = the 3000 VG classes, named so that a VG
class with a COCO name is that COCO class), images under ``data.train_images``:

  python train.py --config configs/vg3k_boxes.py --workdir runs/vg3k_boxes \\
    --config.data.train_json=vg3k/train.json --config.data.train_images=vg3k/images \\
    --config.data.val_json=vg3k/val.json --config.data.val_images=vg3k/images \\
    --config.train.init_checkpoint=ckpt/r50
"""
from maskx_jax.config import apply_recipe, base_config


def get_config():
    c = apply_recipe(base_config(), "detectron")
    m, d, t = c.model, c.data, c.train
    m.depth = 50
    m.mask_mode = "none"  # boxes only: no mask branch is built or trained
    m.mlp_fusion = False
    d.source = "coco"
    d.set_a = ""  # no masks are read by a box detector
    t.batch_size = 8
    t.steps = 180000
    t.lr = 0.01
    t.lr_steps = (120000, 160000)
    t.weight_decay = 1e-4
    return c
