"""Convert a torchvision checkpoint into a maskx_jax orbax checkpoint.

    python -m convert.from_torch --arch maskrcnn_resnet50_fpn --checkpoint X.pth --output DIR
    python -m convert.from_torch --arch resnet50 --checkpoint resnet50.pth --output DIR   # backbone only

``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``; ``.safetensors`` also work.
Legacy and current torchvision key names are both accepted. Missing / unexpected keys and shape
mismatches are listed by name and nothing is written.

FrozenBN epsilon: torchvision uses 1e-5, except that it sets 0.0 when it loads its *legacy COCO v1*
Mask R-CNN weights (``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``); pass ``--bn-eps 0`` for that file.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Mapping

import numpy as np
from flax import nnx

from convert.mapping import ConversionError, torch_to_flax
from convert.torch_io import load_state_dict
from maskx_jax.checkpoint import save_detector, save_resnet
from maskx_jax.detector import DetectorConfig, MaskRCNN
from maskx_jax.resnet import RESNET_SPECS, ResNet
from maskx_jax.state_utils import assign_flat, flat_shapes

_DETECTOR_ARCH = re.compile(r"^maskrcnn_resnet(\d+)_fpn$")
_RESNET_ARCH = re.compile(r"^resnet(\d+)$")
ARCHS = [f"maskrcnn_resnet{d}_fpn" for d in RESNET_SPECS] + [f"resnet{d}" for d in RESNET_SPECS]


def _hint(state: Mapping[str, np.ndarray], arch: str) -> str:
    """A one-line guess at what the checkpoint really is, when it does not fit ``arch``."""
    keys = set(state)
    if "fc.weight" in keys and not any(k.startswith("backbone.") for k in keys):
        return "hint: this looks like an ImageNet ResNet classification checkpoint: use --arch resnetNN"
    if any(k.startswith("roi_heads.box_predictor") for k in keys) and not any("mask" in k for k in keys):
        return "hint: this looks like a box-only Faster R-CNN checkpoint: it has no mask head"
    if arch.startswith("resnet") and any(k.startswith("backbone.body.") for k in keys):
        return "hint: this looks like a detector checkpoint: use --arch maskrcnn_resnetNN_fpn"
    return ""


def convert_maskrcnn(state: Mapping[str, np.ndarray], depth: int = 50, bn_eps: float = 1e-5) -> MaskRCNN:
    """torchvision Mask R-CNN state dict -> :class:`MaskRCNN` (num_classes read from ``cls_score``)."""
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ConversionError(f"not a Mask R-CNN checkpoint: no {key}. {_hint(state, 'maskrcnn')}".strip())
    cfg = DetectorConfig(depth=depth, num_classes=int(state[key].shape[0]), norm_eps=bn_eps)
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    fc6_chw = (cfg.fpn_channels, cfg.box_roi_size, cfg.box_roi_size)
    try:
        flat = torch_to_flax(state, flat_shapes(model), fc6_chw=fc6_chw)
    except ConversionError as e:
        raise ConversionError(f"{e}\n{_hint(state, 'maskrcnn')}".rstrip()) from None
    assign_flat(model, flat)
    return model


def convert_resnet(state: Mapping[str, np.ndarray], depth: int, bn_eps: float = 1e-5) -> ResNet:
    """torchvision ImageNet ResNet state dict -> backbone :class:`ResNet` (the ``fc`` classifier is dropped)."""
    body = ResNet(depth, norm_eps=bn_eps, rngs=nnx.Rngs(0))
    try:
        flat = torch_to_flax(state, flat_shapes(body), ignore=lambda k: k in ("fc.weight", "fc.bias"))
    except ConversionError as e:
        raise ConversionError(f"{e}\n{_hint(state, 'resnet')}".rstrip()) from None
    assign_flat(body, flat)
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--checkpoint", required=True, help="torch .pth/.pt (state dict) or .safetensors file")
    p.add_argument("--output", required=True, help="directory to write the orbax checkpoint to")
    p.add_argument("--bn-eps", type=float, default=1e-5, help="FrozenBN epsilon (0 for torchvision's legacy COCO v1 weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        state = load_state_dict(args.checkpoint)
        if m := _DETECTOR_ARCH.match(args.arch):
            model = convert_maskrcnn(state, int(m.group(1)), args.bn_eps)
            save_detector(args.output, model, source=args.checkpoint, overwrite=args.overwrite)
            what = f"Mask R-CNN R-{m.group(1)}-FPN, {model.cfg.num_classes} classes (incl. background)"
        else:
            depth = int(_RESNET_ARCH.match(args.arch).group(1))
            body = convert_resnet(state, depth, args.bn_eps)
            save_resnet(args.output, body, source=args.checkpoint, overwrite=args.overwrite)
            what = f"ResNet-{depth} backbone"
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {what} ({len(state)} tensors) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
