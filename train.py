"""Train or evaluate Mask R-CNN / Mask^X R-CNN (the same as the ``maskx-train`` console script).

    python train.py --config configs/demo_synthetic.py --workdir runs/demo
    python train.py --config configs/demo_synthetic.py --workdir runs/demo --config.train.steps=200
    python train.py --config configs/demo_synthetic.py --workdir runs/demo --mode=eval

Every flag and what it does: ``maskx_jax/train_cli.py``.
"""
from maskx_jax.train_cli import main, parse_flags, run  # noqa: F401  (main, parse_flags: tests/crash_worker.py)

if __name__ == "__main__":
    run()
