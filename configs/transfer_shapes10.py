"""The transfer experiment of ``transfer_synthetic.py`` on the default built-in data, ``shapes10``: the same
model, recipe, arms, schedules and seeds; 10 classes, set A = the demo's six (disk, square, triangle, star,
cross, ellipse), set B = ring, hexagon, crescent, l_shape; 600 training / 100 validation images. The
README's primary result, and what ``make demo`` runs (seed 0, three arms, ``DEMO_*`` steps).

    python -m maskx_jax.transfer_experiment --config configs/transfer_shapes10.py --workdir runs/transfer_shapes10
"""
from maskx_jax.configs.demo_synthetic import SET_A
from maskx_jax.configs.transfer_synthetic import DETECTOR_STEPS, MASK_STEPS, SEEDS  # noqa: F401  (the driver reads them)
from maskx_jax.configs.transfer_synthetic import get_config as _shapes24
from maskx_jax.data.synthetic_shapes import CLASS_NAMES

SET_B = tuple(n for n in CLASS_NAMES if n not in SET_A.split(","))  # ring, hexagon, crescent, l_shape
# ``make demo``: seed 0, three arms (class_agnostic, transfer_mlp, oracle) on a shorter schedule, so that the
# demo with its install stays within ~15 minutes on a 2-core CPU.
DEMO_DETECTOR_STEPS = 800
DEMO_MASK_STEPS = 300


def get_config():
    c = _shapes24()
    d = c.data
    d.synthetic_variant = "shapes10"
    d.set_a = SET_A
    d.synthetic_num_train = 600
    d.synthetic_num_val = 100
    d.max_instances = 12
    d.synthetic_dir = "runs/shapes10_data"
    d.cache_dir = "runs/shapes10_cache"
    return c
