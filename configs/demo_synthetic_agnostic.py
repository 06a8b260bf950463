"""Demo baseline: the class-agnostic mask head (one mask channel for every class), otherwise
identical to ``demo_synthetic.py`` (same data, set A, schedule)."""
from maskx_jax.configs.demo_synthetic import get_config as _maskx


def get_config():
    c = _maskx()
    c.model.mask_mode = "class_agnostic"
    c.model.mlp_fusion = False
    return c
