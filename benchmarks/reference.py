"""The same model and inputs on both sides: torchvision's Mask R-CNN R50-FPN and its conversion.

No pretrained weights can be downloaded, so the torchvision model is randomly initialised and
calibrated (``tests.torch_utils.calibrate_maskrcnn_``) on the benchmark image so it detects like a
trained model: ~100 detections of many classes per image, which is what the inference cost of
post-processing and the mask head depends on. maskx_jax gets exactly these weights through
``convert.from_torch.convert_maskrcnn``.
"""
from __future__ import annotations

import numpy as np

from benchmarks.common import ROOT  # noqa: F401  (puts the repo on sys.path)

COCO_CLASSES = 91  # torchvision's COCO head: 90 category slots + background


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` uint8 [height, width, 3] images: 16-px colour blocks plus noise (objects for an RPN to find)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, size=(height // 16 + 1, width // 16 + 1, 3))
        img = np.kron(base, np.ones((16, 16, 1)))[:height, :width]
        out.append(np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8))
    return out


def torch_images(images: list[np.ndarray]):
    """uint8 HWC NumPy -> list of float CHW tensors in [0, 1] (torchvision's detection input)."""
    import torch

    return [torch.from_numpy(im).permute(2, 0, 1).float().div_(255.0) for im in images]


def torch_maskrcnn(min_size: int, max_size: int, calibration_image: np.ndarray, seed: int = 0):
    """torchvision ``maskrcnn_resnet50_fpn`` (COCO head, random init, calibrated), eval mode."""
    import torch
    import torchvision

    from tests.torch_utils import calibrate_maskrcnn_, randomize_batchnorm_

    torch.manual_seed(seed)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=COCO_CLASSES, min_size=min_size, max_size=max_size)
    randomize_batchnorm_(model, seed=seed + 1)
    calibrate_maskrcnn_(model, torch_images([calibration_image]), seed=seed)
    return model.eval()


def converted(model):
    """The maskx_jax ``MaskRCNN`` holding ``model``'s weights."""
    from convert.from_torch import convert_maskrcnn
    from tests.torch_utils import state_dict_numpy

    return convert_maskrcnn(state_dict_numpy(model), depth=50)


def train_targets(batch: int, height: int, width: int, instances: int, seed: int = 0) -> list[dict]:
    """Random instances per image: boxes XYXY in pixels, labels 1..90, full-image binary masks
    (ellipses inside the boxes), as NumPy; both frameworks' training steps are fed these."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    out = []
    for _ in range(batch):
        side = np.exp(rng.uniform(np.log(32), np.log(min(height, width) * 0.6), instances))
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), instances))
        bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
        x1 = rng.uniform(0, width - bw)
        y1 = rng.uniform(0, height - bh)
        boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)
        masks = np.zeros((instances, height, width), np.uint8)
        for k, (a, b, c, d) in enumerate(boxes):
            cx, cy, rx, ry = (a + c) / 2, (b + d) / 2, (c - a) / 2, (d - b) / 2
            masks[k] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        out.append({"boxes": boxes, "labels": rng.integers(1, COCO_CLASSES, instances).astype(np.int64),
                    "masks": masks})
    return out
