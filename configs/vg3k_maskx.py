"""Large vocabulary (the paper's headline use, Hu et al. 2018 Sec. 5), stage 2 of 2: Mask^X R-CNN
segmenting ~3000 Visual Genome classes while mask supervision exists for COCO's 80 only.

Stage-wise, as the paper trains it: stage 1 (``vg3k_boxes.py``) is a box detector for all K = 3000 VG
classes; here its work directory is ``train.init_checkpoint`` and it stays frozen (``train.freeze=detector``),
and only the mask branch trains: tau (cls+box, 2-layer LeakyReLU, stop-grad), the mask head and the MLP
fusion, on the masks of set A = the 80 COCO classes (seg_every_thing
``configs/bbox2mask_vg/eval_sw/stage2_cocomask_clsbox_2_layer_mlp_nograd.yaml``: 16 images per batch,
LR 0.02, 90k steps, decay at 60k and 80k; Detectron's recipe). tau turns each class's frozen detection
weights into its mask weights, so all 3000 classes get masks.

Data (source=coco, no new loader needed): one COCO-format training JSON whose ``categories`` are the 3000
VG classes (the same list as stage 1's, so the class count and order match the detector), holding the COCO
instances with their masks, labelled with the COCO names below (set A); a VG category with a COCO name is
the same class. The class count comes from the data: K = 3000 gives ``num_classes`` = 3001
(:data:`NUM_CLASSES`, used by ``benchmarks/large_vocab.py`` and ``tests/model/test_large_vocab.py``). VG has no
instance masks, so a VG validation JSON scores boxes for all classes and masks wherever the JSON has them.

Inference cost of the mask branch does not grow with K: ``MaskRCNN.mask_logits`` gathers each
detection's class embedding straight from the detection weights' columns, runs tau on those D
rows and applies one 1x1 conv channel per RoI; nothing of size K x 28 x 28 is formed (see the
README's "Large vocabulary" table). The box branch is K-way by nature (classifier, per-class
decoding and NMS).

  python train.py --config configs/vg3k_maskx.py --workdir runs/vg3k_maskx \\
    --config.data.train_json=vg3k_coco80/train.json --config.data.train_images=coco/images \\
    --config.data.val_json=vg3k_coco80/val.json --config.data.val_images=vg3k/images \\
    --config.train.init_checkpoint=runs/vg3k_boxes
"""
from maskx_jax.config import apply_recipe, base_config
from maskx_jax.data.classes import COCO_CATEGORIES

NUM_CLASSES = 3001  # 3000 Visual Genome classes + background
SET_A = ",".join(name for _, name in COCO_CATEGORIES)  # the 80 COCO classes: mask supervision


def get_config():
    c = apply_recipe(base_config(), "detectron")
    m, d, t = c.model, c.data, c.train
    m.depth = 50
    m.mask_mode = "transfer"  # every class's mask weights come from tau
    m.transfer_input = "cls+box"
    m.transfer_layers = 2
    m.transfer_activation = "leaky_relu"
    m.stop_det_grad = True
    m.mlp_fusion = True
    d.source = "coco"
    d.set_a = SET_A
    t.init_checkpoint = "runs/vg3k_boxes"  # stage 1's work directory (its latest checkpoint)
    t.freeze = "detector"  # backbone + FPN, RPN, box head fixed: only the mask branch trains
    t.batch_size = 16
    t.steps = 90000
    t.lr = 0.02
    t.lr_steps = (60000, 80000)
    t.weight_decay = 1e-4
    return c
