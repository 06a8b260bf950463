"""Convert a torchvision checkpoint into a maskx_jax orbax checkpoint.

    python -m convert.from_torch --arch maskrcnn_resnet50_fpn --checkpoint X.pth --output DIR
    python -m convert.from_torch --arch fasterrcnn_resnet50_fpn --checkpoint X.pth --output DIR  # box detector
    python -m convert.from_torch --arch resnet50 --checkpoint resnet50.pth --output DIR   # backbone only

``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``; ``.safetensors`` also work.
Legacy and current torchvision key names are both accepted. Missing / unexpected keys and shape
mismatches are listed by name and nothing is written.

A Faster R-CNN (``fasterrcnn_resnetNN_fpn``) has every Mask R-CNN key except the mask branch; it is
written as a ``box_detector`` checkpoint for ``train.init_checkpoint`` (stage-wise Mask^X: freeze it
with ``train.freeze=detector`` and train only the mask branch), and the keys it lacks are listed.
``--classes coco80`` re-indexes torchvision's 91-slot COCO label space to the 80 contiguous classes
maskx_jax's COCO data uses (see :mod:`convert.classes`).

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

from .classes import parse_classes, select_classes
from .mapping import ConversionError, path_to_dotted, torch_to_flax, torchvision_key
from .torch_io import load_state_dict
from maskx_jax.checkpoint import config_to_json, save_detector, save_flat, save_resnet
from maskx_jax.detector import DetectorConfig, MaskRCNN
from maskx_jax.optim import FREEZE_GROUPS
from maskx_jax.resnet import RESNET_SPECS, ResNet
from maskx_jax.state_utils import Path, abstract_module, flat_shapes, from_flat

_DETECTOR_ARCH = re.compile(r"^maskrcnn_resnet(\d+)_fpn$")
_BOX_DETECTOR_ARCH = re.compile(r"^fasterrcnn_resnet(\d+)_fpn$")
_RESNET_ARCH = re.compile(r"^resnet(\d+)$")
ARCHS = ([f"maskrcnn_resnet{d}_fpn" for d in RESNET_SPECS] + [f"fasterrcnn_resnet{d}_fpn" for d in RESNET_SPECS]
         + [f"resnet{d}" for d in RESNET_SPECS])
_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"


def _hint(state: Mapping[str, np.ndarray], arch: str) -> str:
    """A one-line guess at what the checkpoint really is, when it does not fit ``arch``."""
    keys = set(state)
    if "fc.weight" in keys and not any(k.startswith("backbone.") for k in keys):
        return "hint: this looks like an ImageNet ResNet classification checkpoint: use --arch resnetNN"
    if (arch != "fasterrcnn" and any(k.startswith("roi_heads.box_predictor") for k in keys)
            and not any("mask" in k for k in keys)):
        return ("hint: this looks like a box-only Faster R-CNN checkpoint (no mask head): use --arch "
                "fasterrcnn_resnetNN_fpn and train the mask branch on it (README: 'Stage-wise Mask^X')")
    if arch == "fasterrcnn" and any(k.startswith("roi_heads.mask_") for k in keys):
        return "hint: this checkpoint has a mask branch, so it is a Mask R-CNN: use --arch maskrcnn_resnetNN_fpn"
    if arch.startswith("resnet") and any(k.startswith("backbone.body.") for k in keys):
        return "hint: this looks like a detector checkpoint: use --arch maskrcnn_resnetNN_fpn"
    return ""


def convert_maskrcnn(state: Mapping[str, np.ndarray], depth: int = 50, bn_eps: float = 1e-5) -> MaskRCNN:
    """torchvision Mask R-CNN state dict -> :class:`MaskRCNN` (num_classes read from ``cls_score``)."""
    key = _CLS_SCORE
    if key not in state:
        raise ConversionError(f"not a Mask R-CNN checkpoint: no {key}. {_hint(state, 'maskrcnn')}".strip())
    cfg = DetectorConfig(depth=depth, num_classes=int(state[key].shape[0]), norm_eps=bn_eps)
    fc6_chw = (cfg.fpn_channels, cfg.box_roi_size, cfg.box_roi_size)
    abstract = _abstract_detector(cfg)
    try:  # checked against the abstract model: nothing is initialised, the model is built from the arrays
        flat = torch_to_flax(state, flat_shapes(abstract), fc6_chw=fc6_chw)
    except ConversionError as e:
        raise ConversionError(f"{e}\n{_hint(state, 'maskrcnn')}".rstrip()) from None
    return from_flat(abstract, flat)


def _abstract_detector(cfg: DetectorConfig) -> MaskRCNN:
    """``MaskRCNN(cfg)`` built abstractly (nothing initialised)."""
    return abstract_module(lambda: MaskRCNN(cfg, rngs=nnx.Rngs(0)))


def _is_mask_branch(path: Path) -> bool:
    """The variables a Faster R-CNN lacks: mask head, mask predictor (and Mask^X's tau and MLP fusion),
    i.e. the ``train.freeze`` part ``mask_head``."""
    return any(tuple(path[:len(prefix)]) == prefix for prefix in FREEZE_GROUPS["mask_head"])


def box_detector_shapes(cfg: DetectorConfig) -> tuple[dict[Path, tuple], dict[Path, tuple]]:
    """({path: shape} of a Faster R-CNN's variables, {path: shape} of the mask branch it lacks) for ``cfg``
    (built abstractly: nothing is initialised)."""
    shapes = flat_shapes(_abstract_detector(cfg))
    box = {p: s for p, s in shapes.items() if not _is_mask_branch(p)}
    return box, {p: s for p, s in shapes.items() if _is_mask_branch(p)}


def convert_fasterrcnn(state: Mapping[str, np.ndarray], depth: int = 50,
                       bn_eps: float = 1e-5) -> tuple[dict[Path, np.ndarray], DetectorConfig, list[str]]:
    """torchvision Faster R-CNN state dict -> (our flat {path: array} of every detector variable but the
    mask branch, its :class:`DetectorConfig`, the torchvision keys a Mask R-CNN has and this lacks).

    Strict like :func:`convert_maskrcnn`: every backbone / RPN / box-head key must be present with its
    shape, and a mask key is refused (that file is a Mask R-CNN).
    """
    if _CLS_SCORE not in state:
        raise ConversionError(f"not a Faster R-CNN checkpoint: no {_CLS_SCORE}. {_hint(state, 'fasterrcnn')}".strip())
    cfg = DetectorConfig(depth=depth, num_classes=int(state[_CLS_SCORE].shape[0]), norm_eps=bn_eps)
    box_shapes, mask_shapes = box_detector_shapes(cfg)
    try:
        flat = torch_to_flax(state, box_shapes, fc6_chw=(cfg.fpn_channels, cfg.box_roi_size, cfg.box_roi_size))
    except ConversionError as e:
        raise ConversionError(f"{e}\n{_hint(state, 'fasterrcnn')}".rstrip()) from None
    lacking = sorted(torchvision_key(path_to_dotted(p)) for p in mask_shapes)
    return flat, cfg, lacking


def lacking_report(lacking: list[str], output: str) -> str:
    """What a converted Faster R-CNN lacks for a Mask R-CNN and for Mask^X, and what training does about it."""
    return "\n".join(
        [f"not in a Faster R-CNN: the mask branch, these {len(lacking)} keys of a torchvision Mask R-CNN:"]
        + [f"  {k}" for k in lacking]
        + [f"Training from it (--config.train.init_checkpoint={output}) initialises them freshly; a Mask^X model",
           "(model.mask_mode=transfer) also trains tau (roi_heads.weight_transfer) and the MLP fusion",
           "(roi_heads.mask_predictor.mask_mlp) from scratch. Stage-wise Mask^X: --config.train.freeze=detector",
           "keeps the converted backbone, RPN and box head fixed and trains only the mask branch."])


def convert_resnet(state: Mapping[str, np.ndarray], depth: int, bn_eps: float = 1e-5) -> ResNet:
    """torchvision ImageNet ResNet state dict -> backbone :class:`ResNet` (the ``fc`` classifier is dropped)."""
    abstract = abstract_module(lambda: ResNet(depth, norm_eps=bn_eps, rngs=nnx.Rngs(0)))
    try:
        flat = torch_to_flax(state, flat_shapes(abstract), ignore=lambda k: k in ("fc.weight", "fc.bias"))
    except ConversionError as e:
        raise ConversionError(f"{e}\n{_hint(state, 'resnet')}".rstrip()) from None
    return from_flat(abstract, flat)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--checkpoint", required=True, help="torch .pth/.pt (state dict) or .safetensors file")
    p.add_argument("--output", required=True, help="directory to write the orbax checkpoint to")
    p.add_argument("--bn-eps", type=float, default=1e-5,
                   help="FrozenBN epsilon (0 for torchvision's legacy COCO v1 weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--classes", default="",
                   help="detectors: keep only these class rows of the predictors: 'coco80' (torchvision's 91-slot "
                        "COCO labels -> the 80 contiguous classes of maskx_jax's COCO data) or indices '0,3,7'")
    args = p.parse_args(argv)
    notes = ""
    try:
        state = load_state_dict(args.checkpoint)
        if args.classes:
            if _CLS_SCORE not in state or _RESNET_ARCH.match(args.arch):
                raise ConversionError("--classes applies to detector checkpoints (with roi_heads.box_predictor)")
            state = select_classes(state, parse_classes(args.classes, int(state[_CLS_SCORE].shape[0])))
        if m := _DETECTOR_ARCH.match(args.arch):
            model = convert_maskrcnn(state, int(m.group(1)), args.bn_eps)
            save_detector(args.output, model, source=args.checkpoint, overwrite=args.overwrite)
            what = f"Mask R-CNN R-{m.group(1)}-FPN, {model.cfg.num_classes} classes (incl. background)"
        elif m := _BOX_DETECTOR_ARCH.match(args.arch):
            flat, cfg, lacking = convert_fasterrcnn(state, int(m.group(1)), args.bn_eps)
            save_flat(args.output, flat, {"kind": "box_detector", "config": config_to_json(cfg),
                                          "source": args.checkpoint}, overwrite=args.overwrite)
            what = f"Faster R-CNN R-{m.group(1)}-FPN (box detector), {cfg.num_classes} classes (incl. background)"
            notes = lacking_report(lacking, args.output)
        else:
            depth = int(_RESNET_ARCH.match(args.arch).group(1))
            body = convert_resnet(state, depth, args.bn_eps)
            save_resnet(args.output, body, source=args.checkpoint, overwrite=args.overwrite)
            what = f"ResNet-{depth} backbone"
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {what} ({len(state)} tensors) to {args.output}")
    if notes:
        print(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
