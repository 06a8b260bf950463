"""Flat views of an NNX module's variables: {path: array}, used by conversion and checkpoints.

A path is the tuple NNX uses, e.g. ('backbone', 'body', 'layer1', 0, 'conv1', 'kernel').
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple


def flat_variables(module: nnx.Module) -> dict[Path, nnx.Variable]:
    """Every variable (parameters and frozen buffers) of ``module`` by path."""
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module))}


def flat_shapes(module: nnx.Module) -> dict[Path, tuple[int, ...]]:
    """{path: shape} for every variable of a concrete module."""
    return {p: tuple(v[...].shape) for p, v in flat_variables(module).items()}


def flat_arrays(module: nnx.Module) -> dict[Path, np.ndarray]:
    """{path: host NumPy array} for every variable."""
    return {p: np.asarray(jax.device_get(v[...])) for p, v in flat_variables(module).items()}


def assign_flat(module: nnx.Module, flat: Mapping[Path, np.ndarray]) -> None:
    """Overwrite every variable of ``module`` from ``flat``; all paths and shapes must match exactly."""
    state = nnx.state(module)
    variables = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    missing = sorted(".".join(map(str, p)) for p in variables if p not in flat)
    unexpected = sorted(".".join(map(str, p)) for p in flat if p not in variables)
    bad = [f"{'.'.join(map(str, p))}: got {tuple(np.shape(a))}, expected {tuple(variables[p][...].shape)}"
           for p, a in flat.items() if p in variables and tuple(np.shape(a)) != tuple(variables[p][...].shape)]
    if missing or unexpected or bad:
        raise ValueError("parameters do not fit the model:\n"
                         + "".join(f"  missing: {m}\n" for m in missing)
                         + "".join(f"  unexpected: {u}\n" for u in unexpected)
                         + "".join(f"  shape: {b}\n" for b in bad))
    for p, var in variables.items():
        var[...] = jnp.asarray(flat[p], dtype=var[...].dtype)
    nnx.update(module, state)
