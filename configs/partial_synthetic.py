"""Partially labelled data, mask supervision read from the annotations (``data.mask_supervision=by_annotation``).

The demo's model and schedule (``demo_synthetic.py``) on a variant of the built-in synthetic shapes
whose training annotations say themselves which instances have a mask: ring, hexagon, crescent and
l_shape annotations carry no segmentation at all, and only half of the star annotations keep theirs
(``data.synthetic_mask_fraction``, derived deterministically on first use under ``data.cache_dir``).
Set A is then read from the data: the six classes with at least one mask (disk, square, triangle,
star, cross, ellipse, as in the demo); set B = the other four, whose mask AP is the Mask^X headline.
The validation split keeps every mask.

    python train.py --config configs/partial_synthetic.py --workdir runs/partial
"""
from maskx_jax.configs.demo_synthetic import get_config as _demo

# Fraction of each class's training instances that keep their mask (unlisted classes: all).
MASK_FRACTION = "ring:0,hexagon:0,crescent:0,l_shape:0,star:0.5"


def get_config():
    c = _demo()
    c.data.mask_supervision = "by_annotation"
    c.data.set_a = ""  # read from the annotations
    c.data.synthetic_mask_fraction = MASK_FRACTION
    return c
