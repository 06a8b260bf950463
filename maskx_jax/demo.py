"""``make demo``: does Mask^X transfer? The controlled comparison on the built-in ``shapes10`` data, one seed.

    python -m maskx_jax.demo --workdir runs/demo [--detector-steps N] [--mask-steps M] [--set SECTION.KEY=VALUE]

One box detector is trained (boxes of all 10 classes), then frozen, and three mask branches are trained on
it with the masks of set A only: the class-agnostic head (the baseline), Mask^X (tau on the detection
weights + MLP fusion), and the oracle (a class-specific head given the masks of every class: the ceiling).
The detector is the same for the three, so the mask head is the only difference. Prints and writes
``WORKDIR/results.md`` (mask AP on set B, the classes whose masks were never seen), with prediction
pictures per arm. The multi-seed experiment with the controls (``python -m maskx_jax.transfer_experiment``)
is in ``benchmarks/results/transfer.md``; this demo is its first seed on a shorter schedule. Every run
resumes if interrupted (re-run the same command).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from maskx_jax.backends.cpu import xla_flags
from maskx_jax.transfer_experiment import Protocol, parse_override, run_experiment

ARMS = ("class_agnostic", "transfer_mlp", "oracle")
TITLES = {
    "class_agnostic": "class-agnostic mask head (baseline)",
    "transfer_mlp": "Mask^X R-CNN (tau: cls+box, 2-layer, stop-grad, MLP fusion)",
    "oracle": "oracle: class-specific head with the masks of ALL classes (ceiling)",
}
COLUMNS = (("set_b_mask_ap", "mask AP set B"), ("set_b_mask_ap50", "mask AP50 set B"),
           ("set_a_mask_ap", "mask AP set A"), ("set_b_box_ap", "box AP set B"))
MULTI_SEED_TABLE = "benchmarks/results/transfer.md"


def results_table(results: dict) -> str:
    """One row per arm of a one-seed ``transfer_experiment`` results dict (AP in %)."""
    head = "| mask branch (on the same frozen detector) | " + " | ".join(c[1] for c in COLUMNS) + " | s/step |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for arm in [a for a in ARMS if a in results["arms"]] + [a for a in results["arms"] if a not in ARMS]:
        values = results["arms"][arm]
        cells = ["n/a" if not values.get(k) or values[k][0] is None else f"{values[k][0]:.1f}" for k, _ in COLUMNS]
        sec = values.get("seconds_per_step") or [None]
        lines.append(f"| {TITLES.get(arm, arm)} | " + " | ".join(cells)
                     + f" | {'n/a' if sec[0] is None else f'{sec[0]:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config_module = importlib.import_module("maskx_jax.configs.transfer_shapes10")
    p = argparse.ArgumentParser(prog="python -m maskx_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--detector-steps", type=int, default=config_module.DEMO_DETECTOR_STEPS)
    p.add_argument("--mask-steps", type=int, default=config_module.DEMO_MASK_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", type=parse_override, default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of configs/transfer_shapes10.py (repeatable)")
    args = p.parse_args(argv)
    print(xla_flags.apply_for_entry_point())  # before anything starts a JAX backend

    from absl import logging as absl_logging

    from maskx_jax import train_lib

    absl_logging.set_verbosity(absl_logging.WARNING)
    train_lib.quiet_library_logs()
    workdir = os.path.abspath(args.workdir)
    protocol = Protocol(
        config_path=config_module.__file__, seeds=(args.seed,), detector_steps=args.detector_steps,
        mask_steps=args.mask_steps, arms=ARMS, end_to_end=(),
        overrides=(("data.synthetic_dir", os.path.join(workdir, "synthetic_data")),
                   ("data.cache_dir", os.path.join(workdir, "data_cache"))) + tuple(args.set))
    start = time.time()
    results = run_experiment(protocol, workdir, os.path.join(workdir, "results.json"))
    seed_dir = os.path.join(workdir, f"seed{args.seed}")
    text = (f"Built-in synthetic shapes10 (10 classes; set B, boxes only in training: "
            f"{', '.join(config_module.SET_B)}). One detector ({args.detector_steps} steps), frozen; each mask "
            f"branch {args.mask_steps} steps on it; seed {args.seed}; {(time.time() - start) / 60:.1f} min.\n\n"
            f"{results_table(results)}\n\n"
            f"Mask^X wins if its set-B mask AP is above the class-agnostic head's; the oracle shows how far up it "
            f"could go. One seed on a short schedule is a demonstration, not a measurement: the multi-seed "
            f"experiment with its controls is {MULTI_SEED_TABLE} (README, \"Does Mask^X transfer?\").\n\n"
            f"Pictures (set-B classes marked with *): "
            + ", ".join(os.path.join(seed_dir, arm, train_lib.PICTURES_DIR) for arm in ARMS) + "\n")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
