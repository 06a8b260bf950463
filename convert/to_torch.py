"""Export a maskx_jax checkpoint as a torchvision state dict.

    python -m convert.to_torch --checkpoint DIR --output model.pth      # or model.safetensors

For an R-50 detector the result is checked by loading it into torchvision's
``maskrcnn_resnet50_fpn(num_classes=K)`` (a ``box_detector``: ``fasterrcnn_resnet50_fpn``) with
``strict=True`` (skip with ``--no-verify``).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from convert.mapping import flax_to_torch
from convert.torch_io import save_state_dict
from maskx_jax.checkpoint import detector_config_from_json, load_flat, read_meta


def export_state_dict(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read our checkpoint and return (torchvision state dict, meta)."""
    meta = read_meta(directory)
    flat = load_flat(directory)
    if meta["kind"] in ("detector", "box_detector"):
        cfg = detector_config_from_json(meta["config"])
        fc6_chw = (cfg.fpn_channels, cfg.box_roi_size, cfg.box_roi_size)
        return flax_to_torch(flat, fc6_chw=fc6_chw), meta
    return flax_to_torch(flat), meta


def verify_in_torchvision(state: dict[str, np.ndarray], meta: dict) -> str:
    """Load into the matching torchvision model with strict=True; returns what was checked."""
    import torch
    import torchvision

    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    if meta["kind"] in ("detector", "box_detector"):
        cfg = detector_config_from_json(meta["config"])
        if cfg.depth != 50:
            return "not verified (torchvision ships a builder for R-50-FPN only)"
        name = "maskrcnn_resnet50_fpn" if meta["kind"] == "detector" else "fasterrcnn_resnet50_fpn"
        model = getattr(torchvision.models.detection, name)(
            weights=None, weights_backbone=None, num_classes=cfg.num_classes)
        model.load_state_dict(tensors, strict=True)
        return f"loads into torchvision {name} with strict=True"
    depth = meta["config"]["depth"]
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"fc.weight", "fc.bias"}:
        raise RuntimeError(f"torchvision resnet{depth} rejected the export: {result}")
    return f"loads into torchvision resnet{depth} (all but the fc classifier, which a backbone does not have)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.to_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="maskx_jax checkpoint directory")
    p.add_argument("--output", required=True, help=".pth or .safetensors file to write")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result into torchvision")
    args = p.parse_args(argv)
    try:
        state, meta = export_state_dict(args.checkpoint)
        checked = "not verified" if args.no_verify else verify_in_torchvision(state, meta)
        save_state_dict(state, args.output)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(state)} tensors to {args.output} ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
