"""Give the host memory a finished XLA compile leaves behind back to the operating system.

Compiling a training step allocates host memory that the compiler frees when it is done; glibc keeps those freed
pages in its arenas, so they stay resident. The step's own buffers (XLA's temporaries) are large allocations that
glibc maps afresh rather than reusing the arenas' free pages, so without a release the step's peak sits on top of
the compiler's leftovers (figures: docs/performance.md, "Where the training step's peak memory goes").
``malloc_trim(0)`` hands every free page of every arena back (after a garbage collection, so that objects JAX
dropped but that sit in reference cycles are freed first). Elsewhere (no glibc, no /proc) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os


def resident_mib() -> float | None:
    """This process's resident set size now, in MiB (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def release_host_memory() -> tuple[float, float] | None:
    """``gc.collect()``, then ``malloc_trim(0)``: return the C heap's free pages to the OS.

    Returns (resident MiB before, after), or None when the C library has no ``malloc_trim`` (not glibc) or the
    resident size cannot be read. Safe to call at any time (it only releases memory nobody holds).
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return None
    gc.collect()
    before = resident_mib()
    trim(0)
    after = resident_mib()
    return None if before is None or after is None else (before, after)
