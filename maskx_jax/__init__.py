"""maskx_jax: Mask R-CNN and Mask^X R-CNN in JAX/Flax.

Importing the package tunes XLA:CPU before any JAX backend starts (see ``maskx_jax/xla_cpu.py``;
opt out with ``MASKX_JAX_XLA_CPU_DEFAULTS=0``).
"""
from maskx_jax.xla_cpu import apply_cpu_defaults as _apply_cpu_defaults

_apply_cpu_defaults()
