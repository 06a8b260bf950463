"""maskx_jax: Mask R-CNN and Mask^X R-CNN in JAX/Flax.

Importing the package tunes XLA:CPU before any JAX backend starts (see ``maskx_jax/xla_cpu.py``;
opt out with ``MASKX_JAX_XLA_CPU_DEFAULTS=0``).
"""
from importlib import metadata as _metadata

from maskx_jax.xla_cpu import apply_cpu_defaults as _apply_cpu_defaults

try:
    __version__ = _metadata.version("maskx_jax")  # pyproject.toml's version, as installed
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

_apply_cpu_defaults()
