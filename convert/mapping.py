"""The torch <-> Flax naming table and tensor layout transforms (no torch import here).

Our NNX attribute names mirror torchvision's module names, so a torchvision key maps to an NNX
state path mechanically:

  backbone.body.layer1.0.conv1.weight   <->  ('backbone', 'body', 'layer1', 0, 'conv1', 'kernel')
  backbone.body.bn1.running_var         <->  ('backbone', 'body', 'bn1', 'running_var')

Exceptions are handled by the rename tables below:
  * torchvision >= 0.13 wraps some convs in ``Conv2dNormActivation`` (``inner_blocks.0.0.weight``,
    ``rpn.head.conv.0.0.weight``, ``mask_head.0.0.weight``); older checkpoints use
    ``inner_blocks.0.weight``, ``rpn.head.conv.weight``, ``mask_head.mask_fcn1.weight``. Both are
    accepted; we write the current names.
  * conv weights OIHW -> HWIO; ``conv5_mask`` (ConvTranspose) IOHW -> HWIO; dense [out, in] -> [in, out];
  * ``fc6`` consumes a flattened RoI feature: torch flattens [C, 7, 7] (channel-major), we flatten
    NHWC [7, 7, C], so its input rows are permuted; so are those of Mask^X's MLP fusion FC (``mask_mlp``,
    flattened [C, 28, 28] conv5 mask features; ``convert/torch_models.py`` has its torch module).
  * ``num_batches_tracked`` (BatchNorm bookkeeping, not a parameter) is dropped on import and
    written as 0 on export so that both BatchNorm2d and FrozenBatchNorm2d models load strictly.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

Path = tuple  # tuple[str | int, ...]

# (pattern, replacement) applied in order: any accepted torch key -> our canonical dotted name.
_TO_CANONICAL: list[tuple[re.Pattern, Callable[[re.Match], str] | str]] = [
    (re.compile(r"^(.*\.)?fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\."), r"\1fpn.\2.\3."),
    (re.compile(r"^(.*\.)?rpn\.head\.conv\.0\.0\."), r"\1rpn.head.conv."),
    (re.compile(r"^(.*\.)?mask_head\.(\d+)\.0\."),
     lambda m: f"{m.group(1) or ''}mask_head.mask_fcn{int(m.group(2)) + 1}."),
]

# our canonical dotted name -> the name current torchvision writes in ``state_dict()``.
_TO_TORCHVISION: list[tuple[re.Pattern, Callable[[re.Match], str] | str]] = [
    (re.compile(r"^(.*\.)?fpn\.(inner_blocks|layer_blocks)\.(\d+)\."), r"\1fpn.\2.\3.0."),
    (re.compile(r"^(.*\.)?rpn\.head\.conv\."), r"\1rpn.head.conv.0.0."),
    (re.compile(r"^(.*\.)?mask_head\.mask_fcn(\d+)\."),
     lambda m: f"{m.group(1) or ''}mask_head.{int(m.group(2)) - 1}.0."),
]

# Keys that are bookkeeping, never parameters.
IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(ValueError):
    """Raised when a checkpoint does not fit the target model; the message lists every problem by name."""


def _apply(rules, key: str) -> str:
    for pattern, repl in rules:
        key, n = pattern.subn(repl, key)
        if n:
            break
    return key


def canonical_torch_key(key: str) -> str:
    """Map a legacy or current torchvision key to our canonical dotted name."""
    return _apply(_TO_CANONICAL, key)


def torchvision_key(canonical: str) -> str:
    """Map our canonical dotted name to the key current torchvision uses."""
    return _apply(_TO_TORCHVISION, canonical)


def path_to_dotted(path: Path) -> str:
    """('backbone', 'body', 'layer1', 0, 'conv1', 'kernel') -> 'backbone.body.layer1.0.conv1.weight'."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def dotted_to_path(canonical: str, target_paths: Mapping[Path, object]) -> Path:
    """Inverse of :func:`path_to_dotted` given the set of paths that exist in the model."""
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in canonical.split(".")]
    if parts[-1] == "weight":
        as_kernel = tuple(parts[:-1]) + ("kernel",)
        if as_kernel in target_paths:
            return as_kernel
    return tuple(parts)


def _fc6_rows_torch_to_ours(w_in_out: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Permute fc6 input rows from torch's (c, h, w) flattening to our (h, w, c)."""
    c, h, w = chw
    out = w_in_out.shape[1]
    return w_in_out.reshape(c, h, w, out).transpose(1, 2, 0, 3).reshape(h * w * c, out)


def _fc6_rows_ours_to_torch(w_in_out: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    c, h, w = chw
    out = w_in_out.shape[1]
    return w_in_out.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(c * h * w, out)


def _flattened_input_chw(path: Path, fc6_chw: tuple[int, int, int],
                         mask_mlp_chw: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """The [C, H, W] a dense kernel's input rows flatten (fc6, mask_mlp), or None for an ordinary FC."""
    if "fc6" in path:
        return fc6_chw
    if "mask_mlp" in path:
        if mask_mlp_chw is None:
            raise ConversionError(f"{path_to_dotted(path)}: the MLP fusion FC needs its input layout (mask_mlp_chw)")
        return mask_mlp_chw
    return None


def torch_tensor_to_flax(path: Path, value: np.ndarray, fc6_chw: tuple[int, int, int],
                         mask_mlp_chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """Layout transform for one tensor, chosen by our parameter name and the tensor rank."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:
        if "conv5_mask" in path:  # ConvTranspose2d weight [in, out, kh, kw]
            return value.transpose(2, 3, 0, 1)
        return value.transpose(2, 3, 1, 0)  # Conv2d weight [out, in, kh, kw]
    if value.ndim == 2:
        w = value.T
        chw = _flattened_input_chw(path, fc6_chw, mask_mlp_chw)
        return w if chw is None else _fc6_rows_torch_to_ours(w, chw)
    raise ConversionError(f"{path_to_dotted(path)}: unexpected rank {value.ndim} for a kernel")


def flax_tensor_to_torch(path: Path, value: np.ndarray, fc6_chw: tuple[int, int, int],
                         mask_mlp_chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """Inverse of :func:`torch_tensor_to_flax`."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:
        if "conv5_mask" in path:
            return value.transpose(2, 3, 0, 1)
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        chw = _flattened_input_chw(path, fc6_chw, mask_mlp_chw)
        return (value if chw is None else _fc6_rows_ours_to_torch(value, chw)).T
    raise ConversionError(f"{path_to_dotted(path)}: unexpected rank {value.ndim} for a kernel")


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target_shapes: Mapping[Path, tuple[int, ...]],
    *,
    fc6_chw: tuple[int, int, int] = (256, 7, 7),
    ignore: Callable[[str], bool] = lambda key: False,
) -> dict[Path, np.ndarray]:
    """Convert a torch state_dict (NumPy values) to our flat {path: array} for a model whose
    flat parameter shapes are ``target_shapes``.

    Refuses to return a partial result: every target path must be filled, every source key used
    (except ``num_batches_tracked`` and keys ``ignore`` accepts), every shape must match. All
    problems are collected and raised together in one :class:`ConversionError`.
    """
    out: dict[Path, np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if key.endswith(IGNORED_SUFFIXES) or ignore(key):
            continue
        path = dotted_to_path(canonical_torch_key(key), target_shapes)
        if path not in target_shapes:
            unexpected.append(key)
            continue
        converted = torch_tensor_to_flax(path, np.asarray(value), fc6_chw)
        if tuple(converted.shape) != tuple(target_shapes[path]):
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(value))} -> {tuple(converted.shape)}, "
                              f"model expects {tuple(target_shapes[path])}")
            continue
        out[path] = converted
    missing = [path_to_dotted(p) for p in target_shapes if p not in out and not _mismatch_covers(p, mismatched)]
    if missing or unexpected or mismatched:
        lines = ["checkpoint does not fit the model; nothing was written."]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {it}" for it in items)
        raise ConversionError("\n".join(lines))
    return out


def _mismatch_covers(path: Path, mismatched: list[str]) -> bool:
    """A target whose source had the wrong shape is reported once, as a mismatch, not also as missing."""
    name = path_to_dotted(path)
    return any(m.split(":")[0] in (name, torchvision_key(name)) or canonical_torch_key(m.split(":")[0]) == name
               for m in mismatched)


def flax_to_torch(flat: Mapping[Path, np.ndarray], *, fc6_chw: tuple[int, int, int] = (256, 7, 7),
                  mask_mlp_chw: tuple[int, int, int] | None = None,
                  key_prefix_strip: str = "") -> dict[str, np.ndarray]:
    """Our flat {path: array} -> a torchvision state_dict (NumPy values, current key names).

    Every FrozenBN (identified by its ``running_var``) also gets ``num_batches_tracked = 0``.
    ``mask_mlp_chw``: [C, 28, 28] of the conv5 mask features, when ``flat`` has Mask^X's MLP fusion FC.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        name = torchvision_key(path_to_dotted(path))
        if key_prefix_strip and name.startswith(key_prefix_strip):
            name = name[len(key_prefix_strip):]
        out[name] = np.ascontiguousarray(flax_tensor_to_torch(path, np.asarray(value), fc6_chw, mask_mlp_chw))
        if name.endswith(".running_var"):
            out[name[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out
