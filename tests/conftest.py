"""Test-wide settings: float32 with the highest matmul precision, so parity tolerances mean something."""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_x64", False)

# The longest test files, longest first (seconds measured in a 2-worker run on the 2-core machine).
# ``make test`` runs files in parallel (pytest-xdist, ``--dist loadfile``), and the scheduler hands out
# files in collection order: starting the long ones first keeps one worker from ending alone on a long
# file at the end (longest-processing-time-first). Files not listed keep their usual order, after these.
LONG_FILES_FIRST: tuple[str, ...] = (
    "test_readme_commands.py",  # ~280 s: every README command as a subprocess
    "test_sharding.py",  # ~170 s: 8-device workers
    "test_train_lib.py",
    "test_maskx.py",
    "test_overfit.py",  # ~105 s
    "test_crash_resume.py",  # ~80 s
    "test_many_hosts.py",  # ~77 s
    "test_benchmarks.py",
    "test_stagewise.py",
    "test_detector_parity.py",
)


def pytest_collection_modifyitems(config, items):
    """Long files first (see LONG_FILES_FIRST); a stable sort, so tests keep their order within a file."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
