"""Reading and writing torch checkpoints safely (torch is imported lazily, only here in convert/).

Never unpickles arbitrary objects: ``.pth``/``.pt`` files are read with ``weights_only=True`` (torch's
restricted unpickler, which refuses code-carrying payloads), ``.safetensors`` with safetensors.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


class CheckpointReadError(ValueError):
    """The file is not a readable, safe torch/safetensors state dict."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a state dict as {key: NumPy array}.

    Accepts a plain state dict or one wrapped under 'model' / 'state_dict' / 'model_state_dict'
    (as training scripts often save it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(
            f"{path}: refused to load: it is not a plain tensor state dict (torch's safe loader said: "
            f"{str(e).splitlines()[0]}). Re-save it as a state_dict or .safetensors from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointReadError(f"{path}: not a readable torch checkpoint: {e}") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    out, bad = {}, []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().numpy()
        else:
            bad.append(f"{k} ({type(v).__name__})")
    if bad:
        raise CheckpointReadError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    return out


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Write {key: array} as a torch ``.pth`` (tensors only) or ``.safetensors`` file, atomically."""
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
    else:
        import torch

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp)
    os.replace(tmp, path)
