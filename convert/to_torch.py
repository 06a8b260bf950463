"""Export a maskx_jax model to PyTorch: a torchvision state dict, and its description beside it.

    python -m convert.to_torch --checkpoint DIR --output model.pth      # or model.safetensors

``DIR`` is a converted checkpoint (``convert.from_torch``), a ``train.py`` work directory (its latest
checkpoint; ``--step N`` or ``WORKDIR/checkpoints/N`` for another) or a converted ResNet backbone. For a
detector, ``model.pth.json`` is written too: its architecture (the ``DetectorConfig``) and the resize
(``data.min_size`` / ``max_size`` of the run), from which ``convert.torch_models.load_exported`` builds the
matching torchvision model. Every mask head becomes what a torchvision Mask R-CNN runs:

* class-specific: as it is; class-agnostic: its one channel repeated for every class (the same masks);
* Mask^X (``mask_mode=transfer``): tau evaluated for every class, written into ``mask_fcn_logits`` (the
  bias is zero, as tau's 1x1 weights have none); a random-embedding control alike;
* MLP fusion: the FC is kept (``roi_heads.mask_predictor.mask_mlp``), and the model is torchvision's Mask R-CNN
  with ``convert.torch_models.MaskXPredictor`` as its mask predictor;
* box-only detectors (``mask_mode=none``, converted Faster R-CNNs): torchvision's Faster R-CNN.

The export is loaded into that model with ``strict=True`` before anything is written (skip with
``--no-verify``); a model torchvision cannot express (``model.aligned=True``) is refused, naming why.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from .mapping import flax_to_torch
from .torch_io import save_state_dict
from maskx_jax import integrity
from maskx_jax.checkpoint import detector_config_from_json, load_flat, read_meta
from maskx_jax.detector import DetectorConfig

SPEC_FORMAT = 1
_LOGITS = ("roi_heads", "mask_predictor", "mask_fcn_logits")


def torchvision_mask_logits(flat: dict[tuple, np.ndarray], cfg: DetectorConfig) -> dict[tuple, np.ndarray]:
    """``flat`` with every class's 1x1 mask weights in ``mask_fcn_logits`` (HWIO [1, 1, C, K+1], bias [K+1]) and
    no ``weight_transfer``: tau evaluated for all classes, or the class-agnostic channel repeated."""
    if cfg.mask_mode not in ("transfer", "class_agnostic"):
        return dict(flat)
    from flax import nnx

    from maskx_jax.detector import MaskRCNN
    from maskx_jax.state_utils import abstract_module, from_flat

    model = from_flat(abstract_module(lambda: MaskRCNN(cfg, rngs=nnx.Rngs(0))), flat)
    weight, bias = model.mask_class_weights()  # [K+1 or 1, C], [K+1 or 1] or None
    k1, channels = cfg.num_classes, cfg.mask_head_channels
    weight = np.broadcast_to(np.asarray(weight, np.float32), (k1, channels))
    bias = np.zeros((k1,), np.float32) if bias is None else np.broadcast_to(np.asarray(bias, np.float32), (k1,))
    out = {p: a for p, a in flat.items() if p[:2] != ("roi_heads", "weight_transfer")}
    out[_LOGITS + ("kernel",)] = np.ascontiguousarray(weight.T[None, None])
    out[_LOGITS + ("bias",)] = np.ascontiguousarray(bias)
    return out


def detector_state_dict(flat: dict[tuple, np.ndarray], cfg: DetectorConfig) -> dict[str, np.ndarray]:
    """A detector's flat variables -> the torchvision state dict of ``convert.torch_models.build_detector(cfg)``."""
    flat = torchvision_mask_logits(flat, cfg)
    fc6_chw = (cfg.fpn_channels, cfg.box_roi_size, cfg.box_roi_size)
    res = 2 * cfg.mask_roi_size
    return flax_to_torch(flat, fc6_chw=fc6_chw, mask_mlp_chw=(cfg.mask_head_channels, res, res))


def export_state_dict(directory: str, step: int | None = None, *, verify: bool = True
                      ) -> tuple[dict[str, np.ndarray], dict]:
    """Read a converted checkpoint or a work directory; return (torchvision state dict, spec).

    spec: {"format", "kind" ('detector' | 'box_detector' | 'resnet'), "source", and for detectors
    "detector" (the DetectorConfig as a dict), "min_size", "max_size"}.
    """
    from maskx_jax import workdir as workdir_lib

    if workdir_lib.find_workdir(directory) is not None:
        from maskx_jax.model_builder import detector_config

        flat, found = workdir_lib.load_variables(directory, step, verify=verify)
        config = found["config"]
        cfg = detector_config(config, found["num_classes"])
        kind = "box_detector" if cfg.mask_mode == "none" else "detector"
        sizes = dict(min_size=int(config.data.min_size), max_size=int(config.data.max_size))
        source = f"{found['workdir']} step {found['step']}"
    else:
        if step is not None:
            raise ValueError(f"--step applies to a training work directory; {directory} is a converted checkpoint")
        meta = read_meta(directory)
        flat = load_flat(directory, verify=verify)
        kind = meta["kind"]
        if kind == "resnet":
            return flax_to_torch(flat), {"format": SPEC_FORMAT, "kind": kind, "source": meta.get("source", ""),
                                         "depth": meta["config"]["depth"]}
        cfg = detector_config_from_json(meta["config"])
        if kind == "box_detector":
            cfg = dataclasses.replace(cfg, mask_mode="none", mlp_fusion=False)
        sizes = dict(min_size=800, max_size=1333)  # torchvision's defaults: a converted file does not say
        source = meta.get("source", "") or os.path.abspath(directory)
    state = detector_state_dict(flat, cfg)
    spec = {"format": SPEC_FORMAT, "kind": kind, "source": source, "detector": dataclasses.asdict(cfg), **sizes,
            integrity.KEY: integrity.digests(state)}
    return state, json.loads(json.dumps(spec))


def verify_in_torchvision(state: dict[str, np.ndarray], spec: dict[str, Any]) -> str:
    """Load into the matching torchvision model with strict=True; returns what was checked."""
    import torch
    import torchvision

    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    if spec["kind"] in ("detector", "box_detector"):
        from .torch_models import build_detector, stock_builder

        model = build_detector(spec["detector"], min_size=spec["min_size"], max_size=spec["max_size"])
        model.load_state_dict(tensors, strict=True)
        stock = stock_builder(spec["detector"])
        if stock is not None:  # torchvision's own builder takes it too
            getattr(torchvision.models.detection, stock)(
                weights=None, weights_backbone=None, num_classes=spec["detector"]["num_classes"]
            ).load_state_dict(tensors, strict=True)
            return f"loads into torchvision {stock} with strict=True"
        predictor = getattr(model.roi_heads, "mask_predictor", None)
        head = "no mask branch" if predictor is None else f"mask predictor {type(predictor).__name__}"
        return f"loads into torchvision {type(model).__name__} ({head}) with strict=True"
    depth = spec["depth"]
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"fc.weight", "fc.bias"}:
        raise RuntimeError(f"torchvision resnet{depth} rejected the export: {result}")
    return f"loads into torchvision resnet{depth} (all but the fc classifier, which a backbone does not have)"


def write_export(state: dict[str, np.ndarray], spec: dict[str, Any], output: str) -> None:
    """The state dict, and for a detector ``<output>.json`` (written first, each renamed into place)."""
    from .torch_models import SPEC_SUFFIX

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if spec["kind"] != "resnet":
        tmp = output + SPEC_SUFFIX + ".tmp"
        with open(tmp, "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
        os.replace(tmp, output + SPEC_SUFFIX)
    save_state_dict(state, output)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.to_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="converted checkpoint, train.py work directory or WORKDIR/checkpoints/<step>")
    p.add_argument("--step", type=int, default=None, help="a work directory's checkpoint (default: the latest)")
    p.add_argument("--output", required=True, help=".pth or .safetensors file to write (and <file>.json)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result into torchvision")
    p.add_argument("--skip-checksums", action="store_true",
                   help="do not check the checkpoint against its saved content hashes (logged)")
    args = p.parse_args(argv)
    try:
        state, spec = export_state_dict(args.checkpoint, args.step, verify=not args.skip_checksums)
        checked = "not verified" if args.no_verify else verify_in_torchvision(state, spec)
        write_export(state, spec, args.output)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    extra = f" and {args.output}.json" if spec["kind"] != "resnet" else ""
    print(f"wrote {len(state)} tensors to {args.output}{extra} ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
