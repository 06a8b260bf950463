"""Train or evaluate Mask R-CNN / Mask^X R-CNN.

    python train.py --config configs/demo_synthetic.py --workdir runs/demo
    python train.py --config configs/demo_synthetic.py --workdir runs/demo --config.train.steps=200
    python train.py --config configs/demo_synthetic.py --workdir runs/demo --mode=eval

Re-running an interrupted command resumes from the latest checkpoint in --workdir. Multi-process
runs (SLURM, Open MPI, Cloud TPU pods, or JAX_COORDINATOR_ADDRESS) are detected from the
environment; set MASKX_DISTRIBUTED=1 / 0 to force it on / off (see train_lib.maybe_initialize_distributed).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from maskx_jax import config as config_lib
from maskx_jax import train_lib

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "output directory: checkpoints, TensorBoard, metrics, pictures")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate), or only evaluate the latest checkpoint")
flags.DEFINE_bool("progress", True, "show the progress bar")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = FLAGS.config
    config_lib.validate(cfg)  # before anything touches a device or compiles
    train_lib.maybe_initialize_distributed()
    train_lib.check_scaling(cfg, train_lib.create_mesh())
    train_lib.quiet_library_logs()
    try:
        if FLAGS.mode == "train":
            train_lib.train(cfg, FLAGS.workdir, progress=FLAGS.progress)
        else:
            train_lib.evaluate(cfg, FLAGS.workdir, progress=FLAGS.progress)
    except (train_lib.NonFiniteLossError, train_lib.ConfigMismatchError) as e:
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
