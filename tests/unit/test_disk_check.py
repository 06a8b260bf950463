"""The suite refuses to start on a disk too full for its checkpoints (tests/conftest.py)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository (tests/unit/ -> tests/ -> root)


def _collect_only(min_free_gib: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASKX_JAX_TEST_MIN_FREE_GIB=min_free_gib)
    # --collect-only: the session starts (and checks the disk) without running any test.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           os.path.join(HERE, "test_disk_check.py")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_too_little_free_space_stops_the_run_with_a_clear_error():
    proc = _collect_only("1e9")  # more than any disk has
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "GiB free on the disk of" in out and "MASKX_JAX_TEST_MIN_FREE_GIB" in out


def test_enough_free_space_starts_the_run():
    proc = _collect_only("0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 tests collected" in proc.stdout
