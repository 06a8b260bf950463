"""Saving and loading model weights as orbax checkpoints with a JSON description of the model.

Layout of a checkpoint directory::

    DIR/maskx_meta.json   {"format": 1, "kind": "detector" | "box_detector" | "resnet", "config": {...}, "source": ...,
                           "digests": {dotted variable name: "sha256:..."}}
    DIR/params/           orbax checkpoint of every variable (parameters and frozen buffers)

Every array's content hash is recorded at save and checked at load, before any array is used
(:mod:`maskx_jax.integrity`): a damaged file is refused with the arrays named, never loaded as weights.

Kinds: ``detector`` is a whole Mask R-CNN / Mask^X R-CNN; ``box_detector`` a converted Faster R-CNN,
every detector variable except the mask branch (``roi_heads.mask_head``, ``mask_predictor``,
``weight_transfer``), usable only as ``train.init_checkpoint``; ``resnet`` an ImageNet backbone.

Writes are atomic: everything is written to a temporary sibling directory and renamed into place,
so a crash never leaves a half-written checkpoint under DIR.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from maskx_jax import integrity
from maskx_jax.detector import DetectorConfig, MaskRCNN
from maskx_jax.resnet import ResNet
from maskx_jax.state_utils import Path, abstract_module, flat_arrays, flat_shapes, from_flat, path_name

META_FILE = "maskx_meta.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def _nest(flat: Mapping[Path, np.ndarray]) -> dict:
    """{('a', 0, 'b'): x} -> {'a': {'0': {'b': x}}} (orbax wants string keys)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return root


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, np.ndarray]:
    out: dict[Path, np.ndarray] = {}
    for key, value in tree.items():
        part = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (part,)))
        else:
            out[prefix + (part,)] = np.asarray(value)
    return out


def config_to_json(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def detector_config_from_json(d: Mapping) -> DetectorConfig:
    """Rebuild a DetectorConfig; JSON lists become the tuples the dataclass declares.

    Raises:
      ValueError: unknown keys, or values whose type differs from the field's (each listed).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"checkpoint config must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"checkpoint config has keys this version does not know: {unknown}")

    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    values = {k: tup(v) for k, v in d.items()}
    wrong = []
    for k, v in values.items():
        default = fields[k].default
        if default is dataclasses.MISSING:
            continue
        ok = (isinstance(v, bool) if isinstance(default, bool)
              else isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(default, float)
              else isinstance(v, int) and not isinstance(v, bool) if isinstance(default, int)
              else isinstance(v, type(default)))
        if not ok:
            wrong.append(f"{k}={v!r} (expected {type(default).__name__})")
    if wrong:
        raise ValueError(f"checkpoint config has values of the wrong type: {', '.join(wrong)}")
    return DetectorConfig(**values)


def save_flat(directory: str, flat: Mapping[Path, np.ndarray], meta: Mapping[str, Any], *,
              overwrite: bool = False) -> None:
    """Atomically write ``flat`` parameters and ``meta`` to ``directory``."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), _nest(flat))
        ckptr.wait_until_finished()
        recorded = integrity.digests({path_name(p): a for p, a in flat.items()})
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"format": FORMAT_VERSION, **meta, integrity.KEY: recorded}, f, indent=2, sort_keys=True)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a maskx_jax checkpoint (no {META_FILE})")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    return meta


def load_flat(directory: str, *, verify: bool = True) -> dict[Path, np.ndarray]:
    """Every saved array by variable path, each checked against its recorded content hash.

    Raises:
      integrity.CorruptCheckpointError: an array that differs from what was saved, or cannot be read (a data
        file cut short or missing), named with the checkpoint's path.
    """
    directory = os.path.abspath(directory)
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorstore (through orbax): a data file cut short or missing
        raise integrity.read_error(e, directory) from None
    flat = _flatten(restored)
    recorded = read_meta(directory).get(integrity.KEY)
    integrity.check({path_name(p): a for p, a in flat.items()}, recorded, directory, verify=verify)
    return flat


def save_detector(directory: str, model: MaskRCNN, *, source: str = "", overwrite: bool = False) -> None:
    save_flat(directory, flat_arrays(model),
              {"kind": "detector", "config": config_to_json(model.cfg), "source": source}, overwrite=overwrite)


def fit_problems(expected: Mapping[Path, tuple], flat: Mapping[Path, np.ndarray], max_lines: int = 20) -> list[str]:
    """Lines naming every missing / unexpected variable and shape difference (at most ``max_lines`` each)."""
    name = lambda p: ".".join(map(str, p))

    def listed(kind: str, items: list[str]) -> list[str]:
        more = [f"  ... and {len(items) - max_lines} more {kind}"] if len(items) > max_lines else []
        return [f"  {kind}: {i}" for i in items[:max_lines]] + more

    missing = sorted(name(p) for p in expected if p not in flat)
    unexpected = sorted(name(p) for p in flat if p not in expected)
    shapes = sorted(f"{name(p)}: checkpoint {tuple(np.shape(a))}, model {tuple(expected[p])}"
                    for p, a in flat.items() if p in expected and tuple(np.shape(a)) != tuple(expected[p]))
    return listed("missing", missing) + listed("unexpected", unexpected) + listed("shape", shapes)


def load_detector(directory: str, *, verify: bool = True) -> MaskRCNN:
    """Build the detector described by the checkpoint and fill it with the saved weights.

    The saved arrays are checked against the architecture ``maskx_meta.json`` describes (built
    abstractly, nothing initialised) before anything is built: a checkpoint whose parameters come
    from another architecture is refused with the missing / unexpected / mis-shaped names. The model
    is then made from the saved arrays directly (:func:`maskx_jax.state_utils.from_flat`), without
    first initialising random weights: about a second instead of ~25 s for an R-50 on a CPU. Every
    array is checked against its recorded content hash first (``verify=False`` skips that, logged).
    """
    meta = read_meta(directory)
    if meta.get("kind") == "box_detector":
        raise ValueError(f"{directory} holds a box-only detector (a converted Faster R-CNN, no mask branch): it "
                         "cannot predict masks; train its mask branch with train.init_checkpoint set to it first")
    if meta.get("kind") != "detector":
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} checkpoint, not a detector")
    cfg = detector_config_from_json(meta.get("config", {}))
    flat = load_flat(directory, verify=verify)
    abstract = abstract_module(lambda: MaskRCNN(cfg, rngs=nnx.Rngs(0)))
    problems = fit_problems(flat_shapes(abstract), flat)
    if problems:
        raise ValueError(
            f"{directory}: the saved parameters do not fit the architecture its {META_FILE} describes "
            f"(depth={cfg.depth}, num_classes={cfg.num_classes}, mask_mode={cfg.mask_mode}, "
            f"fpn_channels={cfg.fpn_channels}); refusing to load it:\n" + "\n".join(problems))
    return from_flat(abstract, flat)  # filled from the checkpoint: no random initialisation runs


def save_resnet(directory: str, body: ResNet, *, source: str = "", overwrite: bool = False) -> None:
    save_flat(directory, flat_arrays(body), {"kind": "resnet", "config": {"depth": body.depth}, "source": source},
              overwrite=overwrite)
