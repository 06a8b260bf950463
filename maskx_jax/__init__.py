"""maskx_jax: Mask R-CNN and Mask^X R-CNN in JAX/Flax.

Importing the package has no side effects. The command-line entry points tune XLA:CPU before JAX starts
(:func:`maskx_jax.backends.cpu.xla_flags.apply_cpu_defaults`); call it first in a program of your own.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("maskx_jax")  # pyproject.toml's version, as installed
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
