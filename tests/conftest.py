"""Test-wide settings: float32 with the highest matmul precision, so parity tolerances mean something."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One persistent XLA compilation cache for the whole run: the workers and every subprocess they start
# (train.py, predict, the README's commands) inherit these variables, so a program compiled once (the tiny
# detector's predict, a tiny config's train step) is read back instead of compiled again. The cache key is
# the program and the compile options, so a hit is the same executable. The directory belongs to this run
# (made by the controller, removed at its end); MASKX_JAX_TEST_JIT_CACHE=0 turns the cache off.
_JIT_CACHE_PREFIX = "maskx_jax_test_jit_cache_"
_OWN_JIT_CACHE = None
if os.environ.get("MASKX_JAX_TEST_JIT_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import glob
    import time

    for _stale in glob.glob(os.path.join(tempfile.gettempdir(), _JIT_CACHE_PREFIX + "*")):
        try:  # left by a run that was killed before its cleanup; a day old, so no run still uses it
            if time.time() - os.path.getmtime(_stale) > 86400:
                shutil.rmtree(_stale, ignore_errors=True)
        except OSError:
            pass
    _OWN_JIT_CACHE = tempfile.mkdtemp(prefix=_JIT_CACHE_PREFIX)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_JIT_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from maskx_jax.backends.cpu import xla_flags  # noqa: E402

xla_flags.apply_cpu_defaults()  # as the entry points do, before any test starts a JAX backend

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_x64", False)

# The longest test files, longest first (worker seconds from the junit of a full 2-worker fresh-clone run on a
# quiet machine; see the comment on the tuple).
# ``make test`` runs files in parallel (pytest-xdist, ``--dist loadfile``), and the scheduler hands out
# files in collection order: starting the long ones first keeps one worker from ending alone on a long
# file at the end (longest-processing-time-first). Files not listed keep their usual order, after these.
LONG_FILES_FIRST: tuple[str, ...] = (  # worker seconds in session 15's fresh-clone run (both workers busy)
    "test_readme_commands.py",  # 334 s: every README command as a subprocess
    "test_transfer_experiment.py",  # 252 s: the transfer experiment at toy size (10 training runs)
    "test_overfit.py",  # 175 s
    "test_sharding.py",  # 154 s: 8-device workers
    "test_maskx.py",  # 139 s
    "test_benchmarks.py",  # 125 s
    "test_crash_resume.py",  # 120 s
    "test_many_hosts.py",  # 113 s
    "test_mask_slots.py",  # 110 s
    "test_detector_parity.py",  # 95 s
    "test_stagewise.py",  # 94 s
    "test_train_lib.py",  # 75 s
    "test_canvas.py",  # 74 s
    "test_predict.py",  # 71 s
    "test_dtype.py",  # 64 s
    "test_export_torch.py",  # 53 s
    "test_rpn_sampled.py",  # 47 s
    "test_nonfinite.py",  # 28 s
)


def pytest_collection_modifyitems(config, items):
    """Long files first (see LONG_FILES_FIRST); a stable sort, so tests keep their order within a file."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# What a full run writes under pytest's temporary directory at its peak: 5.7 GiB measured with two
# workers, 4.6 GiB of it the README walk-through's (converted torch files, R-50 training workdirs);
# the bound adds a little headroom. A run that fills the disk fails tens of tests minutes later, with
# errors that do not name the cause.
MIN_FREE_GIB = float(os.environ.get("MASKX_JAX_TEST_MIN_FREE_GIB", "6.5"))


def pytest_sessionstart(session):
    """Refuse to start (clear message, before any test) when the temporary directory's disk is too full."""
    if hasattr(session.config, "workerinput"):
        return  # xdist workers: the controller checked
    base = session.config.option.basetemp or tempfile.gettempdir()
    free = shutil.disk_usage(base if os.path.isdir(base) else tempfile.gettempdir()).free / 2**30
    if free < MIN_FREE_GIB:
        raise pytest.UsageError(
            f"only {free:.1f} GiB free on the disk of {base}; the test suite writes up to ~5.7 GiB of "
            f"checkpoints there. Free some space, point TMPDIR elsewhere, or lower the check with "
            f"MASKX_JAX_TEST_MIN_FREE_GIB (now {MIN_FREE_GIB:g}).")


def pytest_unconfigure(config):
    """Remove this run's compilation cache (see ``_OWN_JIT_CACHE``); only the process that made it does."""
    if _OWN_JIT_CACHE is not None:
        shutil.rmtree(_OWN_JIT_CACHE, ignore_errors=True)
