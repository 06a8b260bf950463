"""XLA:CPU settings that maskx_jax's entry points apply before JAX starts its CPU backend.

Why: jaxlib 0.10's CPU backend hands every convolution to YNNPACK, whose *filter-gradient*
convolutions are 2-9x slower than the Eigen path it replaced (measured on this project's 2-core
CPU, 3x3 / 256 -> 256 channels, float32: mask head [256, 14, 14, 256] 0.93 s vs 0.34 s; FPN P2 of an
800 x 1333 image [2, 200, 336, 256] 8.0 s vs ~1.5 s), and whose forward convolutions are slower too
(139 vs 189 GFLOP/s at mask-head sizes). Taking convolutions out of YNNPACK fusion (matmuls,
elementwise and reduction fusions stay) made a Mask R-CNN R50-FPN training step at 512 x 512 go from
17.5 s to 10.4 s. ``benchmarks/`` measures the effect end to end.

The entry points (``maskx-train``, ``maskx-predict``, ``maskx-evaluate``, the transfer experiment, the
benchmarks, the test suite) call :func:`apply_cpu_defaults` before JAX creates a backend and log whether it took
effect; importing ``maskx_jax`` changes nothing. A program of your own calls it first thing (XLA reads the
variable only when the first backend is created). It is not added when
  * the user's ``XLA_FLAGS`` already sets ``--xla_cpu_experimental_ynn_fusion_type`` (theirs wins);
  * ``MASKX_JAX_XLA_CPU_DEFAULTS=0`` is set in the environment (opt out);
  * the installed jaxlib is not a version on which the flag was verified to exist: XLA aborts the
    process on an unknown flag, so a future jaxlib that drops this experimental flag must not see it;
  * a JAX backend is already running (the flag would have no effect; :func:`cpu_defaults_applied`
    then reports False).
GPU and TPU backends ignore ``xla_cpu_*`` flags.
"""
from __future__ import annotations

import os

OPT_OUT_ENV = "MASKX_JAX_XLA_CPU_DEFAULTS"
FLAG_NAME = "--xla_cpu_experimental_ynn_fusion_type"
FLAG = f"{FLAG_NAME}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
# jaxlib (major, minor) releases whose XLA has the flag and where its effect was measured.
VERIFIED_JAXLIB = ((0, 10),)

_applied = False


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        import jaxlib

        major, minor = jaxlib.__version__.split(".")[:2]
        return int(major), int(minor)
    except (ImportError, AttributeError, ValueError):
        return None


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved: assume the worst
        return True
    return bool(getattr(xla_bridge, "_backends", {"unknown": None}))


def apply_cpu_defaults() -> bool:
    """Add :data:`FLAG` to ``XLA_FLAGS`` when it is safe and useful (see the module docstring).

    Returns whether the flag is now in effect for this process's CPU backend.
    """
    global _applied
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    current = os.environ.get("XLA_FLAGS", "")
    if FLAG_NAME in current:
        return False
    if _jaxlib_version() not in VERIFIED_JAXLIB or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = f"{current} {FLAG}".strip()
    _applied = True
    return True


def cpu_defaults_applied() -> bool:
    """True when :func:`apply_cpu_defaults` added the flag before the backend started."""
    return _applied


def apply_for_entry_point() -> str:
    """:func:`apply_cpu_defaults`, and one line saying what it did, for an entry point's log."""
    if apply_cpu_defaults():
        return f"XLA:CPU: added {FLAG} to XLA_FLAGS ({OPT_OUT_ENV}=0 opts out)"
    if FLAG_NAME in os.environ.get("XLA_FLAGS", ""):
        return f"XLA:CPU: {FLAG_NAME} as set in XLA_FLAGS"
    return "XLA:CPU: default convolution settings (no flag added)"
