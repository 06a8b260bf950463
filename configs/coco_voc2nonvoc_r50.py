"""Paper experiment: COCO, set A = the 20 VOC classes (masks), set B = the other 60 (boxes only),
Mask^X R-CNN (cls+box, 2-layer LeakyReLU tau, stop-grad, MLP fusion), ResNet-50-FPN, the paper's
schedule: 16 images per batch, LR 0.02, decay at 60k and 80k of 90k steps, weight decay 1e-4,
800/1333 images, 512 RoIs per image; Detectron's recipe as the paper trained with it (box predictor
init N(0, 0.01) / N(0, 0.001), biases at 2x LR without decay, warmup 500 steps from 1/3, box smooth-L1
beta 1, binarised mask targets: ``maskx_jax.config.RECIPES``).

Needs the COCO 2017 files locally and an ImageNet backbone converted with
``python -m convert.from_torch --arch resnet50 --checkpoint resnet50.pth --output ckpt/r50``:

  python train.py --config configs/coco_voc2nonvoc_r50.py --workdir runs/voc2nonvoc_r50 \
    --config.data.train_json=coco/annotations/instances_train2017.json \
    --config.data.train_images=coco/train2017 \
    --config.data.val_json=coco/annotations/instances_val2017.json \
    --config.data.val_images=coco/val2017 --config.train.init_checkpoint=ckpt/r50
"""
from maskx_jax.config import apply_recipe, base_config


def get_config():
    c = apply_recipe(base_config(), "detectron")
    c.model.depth = 50
    c.model.mask_mode = "transfer"
    c.model.transfer_input = "cls+box"
    c.model.transfer_layers = 2
    c.model.transfer_activation = "leaky_relu"
    c.model.stop_det_grad = True
    c.model.mlp_fusion = True
    c.data.source = "coco"
    c.data.set_a = "voc"
    c.train.batch_size = 16
    c.train.steps = 90000
    c.train.lr = 0.02
    c.train.lr_steps = (60000, 80000)
    c.train.weight_decay = 1e-4
    return c
