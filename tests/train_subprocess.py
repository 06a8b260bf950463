"""Running ``train.py`` in a subprocess from the tests (crash/resume, bad data, config errors).

Every such run uses the toy real-model config ``tests/tiny_train_config.py`` and one persistent
XLA compilation cache shared by the test files and sessions (keyed by the program, the JAX
version and the flags, so a stale entry is never used): only the first run of a given program
compiles, the others load the executable in a second.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_CONFIG = os.path.join(HERE, "tiny_train_config.py")
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"maskx_jax_tests_xla_cache_{os.getuid()}")


def env(**extra: str) -> dict:
    e = dict(os.environ)
    for k in ("MASKX_CRASH_AT", "MASKX_CRASH_MARKER", "MASKX_NAN_AT", "XLA_FLAGS"):
        e.pop(k, None)
    e.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=os.pathsep.join([ROOT, HERE, e.get("PYTHONPATH", "")]))
    e.update(extra)
    return e


def command(workdir: str, *overrides: str, data_dir: str | None = None, worker: bool = False,
            config: str = TINY_CONFIG) -> list[str]:
    """``train.py --config CONFIG --workdir WORKDIR --progress=false [data folders] OVERRIDES``.

    ``worker``: run ``tests/crash_worker.py`` (``train.py`` plus an optional pause point or fault) instead.
    ``data_dir``: where the synthetic dataset and the data cache go.
    """
    script = os.path.join(HERE, "crash_worker.py") if worker else os.path.join(ROOT, "train.py")
    cmd = [sys.executable, script, "--config", config, "--workdir", workdir, "--progress=false"]
    if data_dir is not None:
        cmd += [f"--config.data.synthetic_dir={data_dir}/synthetic", f"--config.data.cache_dir={data_dir}/cache"]
    return cmd + list(overrides)


def run(cmd: list[str], timeout: float = 400, **env_extra: str) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cmd, env=env(**env_extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def checkpoint_steps(workdir: str) -> list[int]:
    """The checkpoints orbax itself would resume from (a fresh read-only manager over WORKDIR/checkpoints)."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(str(workdir), "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return sorted(manager.all_steps(read=True))
    finally:
        manager.close()


def read_checkpoint(workdir: str, step: int) -> dict:
    """{'/params/rpn/head/conv/kernel/value': array, ...}: every array of TrainState checkpoint ``step``."""
    import warnings

    import numpy as np
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
        tree = ocp.PyTreeCheckpointer().restore(os.path.join(str(workdir), "checkpoints", str(step), "default"))

    def flat(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from flat(v, f"{prefix}/{i}")
        elif node is not None:
            yield prefix, np.asarray(node)

    return dict(flat(tree))
