"""torchvision models that take a maskx_jax export: the architecture of a :class:`DetectorConfig`, in torch.

``convert.to_torch`` writes a state dict and, beside it, ``<file>.json`` with the detector's configuration;
:func:`load_exported` builds the matching torchvision model and loads the file with ``strict=True``::

    from maskx_jax.convert.torch_models import load_exported
    model = load_exported("model.pth")          # a torchvision MaskRCNN (or FasterRCNN), eval mode
    outputs = model([image_chw_float_0_1])      # torchvision's usual inference

What torchvision's own classes express directly: any ResNet depth (18-101) with FrozenBatchNorm (epsilon
included) or GroupNorm (32 groups), any FPN width, anchors, RPN / RoI settings, box head width, class count,
a class-specific mask head. Mask^X's parts become plain torchvision layers at export: tau is evaluated for
every class into ``mask_fcn_logits`` (a class-agnostic head's one channel is repeated for every class). The
one thing torchvision has no layer for, Mask^X's MLP fusion, is :class:`MaskXPredictor`: torchvision's
``MaskRCNNPredictor`` plus the fusion FC, whose 28x28 output is added to every class's logits. torchvision's
RoIAlign is the ``aligned=False`` one: a model trained with ``model.aligned=True`` is refused.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

SPEC_SUFFIX = ".json"  # the export's description beside the state dict: "<file>.json"


class MaskXPredictor(nn.Module):
    """torchvision's ``MaskRCNNPredictor`` (``conv5_mask`` 2x2/2 transposed conv + ReLU, ``mask_fcn_logits`` 1x1)
    plus Mask^X's MLP fusion: ``mask_mlp``, an FC from the flattened conv5 features [C*M*M] (torch's
    channel-major order) to M*M logits, added to every class's logits. x: [R, C, 14, 14] -> [R, K+1, 28, 28]."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int, resolution: int = 28):
        super().__init__()
        self.resolution = resolution
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)
        self.mask_mlp = nn.Linear(dim_reduced * resolution * resolution, resolution * resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv5_mask(x))
        fused = self.mask_mlp(x.flatten(1)).view(-1, 1, self.resolution, self.resolution)
        return self.mask_fcn_logits(x) + fused


def unsupported(cfg: Mapping[str, Any]) -> list[str]:
    """What of ``cfg`` (a ``DetectorConfig`` as a dict) torchvision cannot express; empty when it can."""
    problems = []
    if cfg.get("aligned"):
        problems.append("model.aligned=True (torchvision's MultiScaleRoIAlign is aligned=False)")
    if cfg.get("norm") not in ("frozen_bn", "group_norm"):
        problems.append(f"model.norm={cfg.get('norm')!r}")
    if int(cfg.get("depth", 50)) not in (18, 34, 50, 101):
        problems.append(f"model.depth={cfg.get('depth')}")
    return problems


# torchvision's own R-50-FPN builders' architecture (maskrcnn_resnet50_fpn / fasterrcnn_resnet50_fpn, v1).
_STOCK_R50 = {"depth": 50, "norm": "frozen_bn", "fpn_channels": 256, "representation": 1024, "box_roi_size": 7,
              "mask_roi_size": 14, "sampling_ratio": 2, "anchor_sizes": [[32], [64], [128], [256], [512]],
              "aspect_ratios": [0.5, 1.0, 2.0]}


def stock_builder(cfg: Mapping[str, Any]) -> str | None:
    """``'maskrcnn_resnet50_fpn'`` / ``'fasterrcnn_resnet50_fpn'`` when torchvision's own builder has ``cfg``'s
    architecture (a plain mask predictor of width 256), else None (then :func:`build_detector` is the model)."""
    plain = json.loads(json.dumps({k: cfg.get(k) for k in _STOCK_R50}))
    if plain != _STOCK_R50 or cfg.get("aligned"):
        return None
    if cfg.get("mask_mode") == "none":
        return "fasterrcnn_resnet50_fpn"
    if cfg.get("mlp_fusion") or int(cfg.get("mask_head_channels", 0)) != 256:
        return None
    return "maskrcnn_resnet50_fpn"


def _norm_layer(cfg: Mapping[str, Any]):
    eps = float(cfg.get("norm_eps", 1e-5))
    if cfg.get("norm") == "group_norm":
        return lambda channels: nn.GroupNorm(32, channels, eps=eps)
    return functools.partial(FrozenBatchNorm2d, eps=eps)


def build_detector(cfg: Mapping[str, Any], *, min_size: int = 800, max_size: int = 1333) -> nn.Module:
    """The torchvision detector of ``cfg`` (a ``DetectorConfig`` as a dict, e.g. the export's ``.json``), in eval mode.

    ``mask_mode='none'`` gives a FasterRCNN; any other mode a MaskRCNN whose mask predictor is torchvision's
    (or :class:`MaskXPredictor` when ``mlp_fusion``). ``min_size`` / ``max_size``: torchvision's resize.
    """
    problems = unsupported(cfg)
    if problems:
        raise ValueError("torchvision cannot express this model: " + "; ".join(problems))
    depth, fpn = int(cfg["depth"]), int(cfg["fpn_channels"])
    body = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=_norm_layer(cfg))
    width = 64 if depth < 50 else 256  # channels out of layer1 (BasicBlock vs Bottleneck)
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [width, 2 * width, 4 * width, 8 * width], fpn, extra_blocks=LastLevelMaxPool())
    sizes = tuple(tuple(int(s) for s in level) for level in cfg["anchor_sizes"])
    ratios = tuple(float(r) for r in cfg["aspect_ratios"])
    anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
    num_classes, rep, sampling = int(cfg["num_classes"]), int(cfg["representation"]), int(cfg["sampling_ratio"])
    box_size = int(cfg["box_roi_size"])
    levels = ["0", "1", "2", "3"]
    common = dict(
        min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_test=int(cfg["rpn_pre_nms_top_n_test"]),
        rpn_post_nms_top_n_test=int(cfg["rpn_post_nms_top_n_test"]), rpn_nms_thresh=float(cfg["rpn_nms_thresh"]),
        box_roi_pool=MultiScaleRoIAlign(levels, box_size, sampling),
        box_head=TwoMLPHead(fpn * box_size * box_size, rep), box_predictor=FastRCNNPredictor(rep, num_classes),
        box_score_thresh=float(cfg["box_score_thresh"]), box_nms_thresh=float(cfg["box_nms_thresh"]),
        box_detections_per_img=int(cfg["detections_per_img"]))
    if cfg["mask_mode"] == "none":
        return FasterRCNN(backbone, **common).eval()
    mc = int(cfg["mask_head_channels"])
    predictor = (MaskXPredictor(mc, mc, num_classes, 2 * int(cfg["mask_roi_size"])) if cfg.get("mlp_fusion")
                 else torchvision.models.detection.mask_rcnn.MaskRCNNPredictor(mc, mc, num_classes))
    return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(levels, int(cfg["mask_roi_size"]), sampling),
                    mask_head=MaskRCNNHeads(fpn, [mc] * 4, 1), mask_predictor=predictor, **common).eval()


def load_exported(path: str, *, verify: bool = True) -> nn.Module:
    """The model of a ``convert.to_torch`` export: built from ``<path>.json``, weights from ``path`` (strict),
    each tensor first checked against the content hash the export recorded (``verify=False`` skips it, logged).

    Raises:
      maskx_jax.integrity.CorruptCheckpointError: a tensor of the file differs from what was exported, named.
    """
    from .torch_io import load_state_dict
    from maskx_jax import integrity

    spec_path = path + SPEC_SUFFIX
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"{spec_path} not found: load_exported needs the description convert.to_torch "
                                f"writes beside the state dict")
    with open(spec_path) as f:
        spec = json.load(f)
    model = build_detector(spec["detector"], min_size=int(spec["min_size"]), max_size=int(spec["max_size"]))
    arrays = load_state_dict(path)
    integrity.check(arrays, spec.get(integrity.KEY), path, verify=verify)
    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model
