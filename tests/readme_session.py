"""A stand-in for the directory a README reader works in, and what its commands need to exist.

:func:`make_session` builds a fresh directory that looks like a checkout of this repository (every
top-level entry is a symlink to the real one) plus the inputs the README's commands assume the reader
has: ``photos/`` and ``extra.jpg`` (real COCO photographs from ``../shared/data/minicoco``), a
``coco/`` folder in COCO 2017's layout (``annotations/instances_{train,val}2017.json``,
``train2017/``, ``val2017/``) holding minicoco's 30 + 10 images under COCO's official 80-category list
and ids, and torchvision state-dict files (random weights, nothing downloaded) created on demand by
:func:`make_torch_checkpoint` for the conversion commands.
"""
from __future__ import annotations

import json
import os
import shutil

import resources

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MINICOCO = resources.MINICOCO
# Never linked into the session: what the README's commands create there, and the checkout's own state.
_NOT_LINKED = frozenset({"runs", "ckpt", "out", "photos", "coco"})


def _link_checkout(session: str) -> None:
    for name in sorted(os.listdir(ROOT)):
        if name.startswith(".") or name in _NOT_LINKED or name.endswith(".egg-info"):
            continue
        os.symlink(os.path.join(ROOT, name), os.path.join(session, name))


def _coco_split(split: str) -> dict:
    """minicoco's ``split`` annotations with COCO's own 80 categories and category ids (minicoco renumbers
    its 3 classes 1..3), so configs and converted detectors see COCO 2017's label space."""
    from maskx_jax.data.classes import COCO_CATEGORIES

    with open(os.path.join(MINICOCO, f"annotations_{split}.json")) as f:
        data = json.load(f)
    official = {name: cat_id for cat_id, name in COCO_CATEGORIES}
    renumber = {c["id"]: official[c["name"]] for c in data["categories"]}
    for ann in data["annotations"]:
        ann["category_id"] = renumber[ann["category_id"]]
    data["categories"] = [{"id": cat_id, "name": name, "supercategory": ""} for cat_id, name in COCO_CATEGORIES]
    return data


def _coco_layout(session: str) -> None:
    images = os.path.abspath(os.path.join(MINICOCO, "images"))
    os.makedirs(os.path.join(session, "coco", "annotations"))
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        with open(os.path.join(session, "coco", "annotations", f"instances_{folder}.json"), "w") as f:
            json.dump(_coco_split(split), f)
        os.symlink(images, os.path.join(session, "coco", folder))


def _photos(session: str) -> list[str]:
    """Two photos in ``photos/`` and a third as ``extra.jpg``; returns the photos' paths."""
    with open(os.path.join(MINICOCO, "annotations_val.json")) as f:
        names = [im["file_name"] for im in json.load(f)["images"]][:3]
    os.makedirs(os.path.join(session, "photos"))
    for name in names[:2]:
        shutil.copy(os.path.join(MINICOCO, "images", name), os.path.join(session, "photos", name))
    shutil.copy(os.path.join(MINICOCO, "images", names[2]), os.path.join(session, "extra.jpg"))
    return [os.path.join("photos", n) for n in names[:2]]


def make_session(session: str, aliases: dict[str, str]) -> None:
    """Fill the empty directory ``session``; ``aliases`` {path: target} become relative symlinks
    (e.g. a work directory ``make demo`` would have written -> the one a README command writes)."""
    _link_checkout(session)
    _coco_layout(session)
    _photos(session)
    for path, target in aliases.items():
        link = os.path.join(session, path)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(session, target), os.path.dirname(link)), link)


def make_torch_checkpoint(path: str, arch: str) -> None:
    """A torchvision state dict for ``convert.from_torch --arch ARCH`` at ``path`` (.pth/.pt or
    .safetensors), random weights and torchvision's default class count (91 for detectors)."""
    import torch
    import torchvision
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    if arch.startswith(("maskrcnn_", "fasterrcnn_")):
        family, backbone = arch.split("_")[:2]
        builder = getattr(torchvision.models.detection, arch, None)
        if builder is not None:  # torchvision has R-50 builders only
            model = builder(weights=None, weights_backbone=None)
        else:
            cls = MaskRCNN if family == "maskrcnn" else FasterRCNN
            model = cls(resnet_fpn_backbone(backbone_name=backbone, weights=None), num_classes=91)
    else:
        model = getattr(torchvision.models, arch)(weights=None)
    state = model.state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
