"""Train or evaluate Mask R-CNN / Mask^X R-CNN: ``python train.py`` (in the repository) or ``maskx-train``.

    python train.py --config configs/demo_synthetic.py --workdir runs/demo
    python train.py --config configs/demo_synthetic.py --workdir runs/demo --config.train.steps=200
    python train.py --config configs/demo_synthetic.py --workdir runs/demo --mode=eval

Re-running an interrupted command resumes from the latest checkpoint in --workdir. Multi-process
runs (SLURM, Open MPI, Cloud TPU pods, or JAX_COORDINATOR_ADDRESS) are detected from the
environment; set MASKX_DISTRIBUTED=1 / 0 to force it on / off (see train_lib.maybe_initialize_distributed).
"""
from __future__ import annotations

import difflib
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from maskx_jax import config as config_lib
from maskx_jax.backends.cpu import xla_flags
from maskx_jax import train_lib

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "output directory: checkpoints, TensorBoard, metrics, pictures")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate), or only evaluate the latest checkpoint")
flags.DEFINE_bool("progress", True, "show the progress bar")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _fail(message: str) -> NoReturn:
    """A configuration error: one message on stderr, no traceback, exit status 2; nothing was written or compiled."""
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.exit(2)


def _unknown_keys(argv: list[str]) -> list[str]:
    """'unknown config key ...' for every --config.KEY override that names no key of the schema."""
    known = set(train_lib.flat_config(train_lib.config_to_json_dict(config_lib.base_config())))
    out = []
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        if key in known or any(k.startswith(key + ".") for k in known):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        out.append(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                   + "; every key is listed in maskx_jax/config.py")
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a bad ``--config.*`` override (unknown key, value of the wrong type) is one message."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # e.g. "flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"
        _fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections: a key the config lacks, ...
        _fail("\n".join(_unknown_keys(argv)) or f"bad --config override: {e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = FLAGS.config
    logging.info(xla_flags.apply_for_entry_point())  # before anything starts a JAX backend
    try:
        config_lib.validate(cfg)  # before anything touches a device or compiles
    except ValueError as e:
        _fail(str(e))
    train_lib.maybe_initialize_distributed()
    try:
        train_lib.check_scaling(cfg, train_lib.create_mesh())
        # Class names, set A, annotation files and folders: checked before the work directory is touched.
        info = train_lib.load_datasets(cfg)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    train_lib.quiet_library_logs()
    try:
        if FLAGS.mode == "train":
            train_lib.train(cfg, FLAGS.workdir, progress=FLAGS.progress, info=info)
        else:
            train_lib.evaluate(cfg, FLAGS.workdir, progress=FLAGS.progress, info=info)
    except (train_lib.NonFiniteLossError, train_lib.ConfigMismatchError) as e:
        logging.error("%s", e)
        sys.exit(1)


def run() -> None:
    """The ``maskx-train`` console script and ``train.py``."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
