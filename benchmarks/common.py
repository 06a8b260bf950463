"""Shared by the benchmarks: timing, machine facts, peak memory and XLA's cost figures.

Every figure a benchmark reports is a median over ``repeats`` timed calls after ``warmup``
untimed ones; the raw times are kept beside it in the JSON.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from maskx_jax.backends.cpu import xla_flags  # noqa: E402

# Every benchmark script and case process is an entry point: XLA:CPU's defaults as maskx-train sets them,
# before JAX starts a backend (recorded in environment() as xla_cpu_defaults).
xla_flags.apply_cpu_defaults()


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    ``fn`` must block until its work is done (``jax.block_until_ready`` / torch's synchronous CPU ops).

    Returns:
      {"median_s": float, "times_s": [float, ...]}.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def write_results(out_dir: str, name: str, data: Any, table: str) -> tuple[str, str]:
    """Write ``OUT/name.json`` (every raw figure) and ``OUT/name.md`` (the table), print the table.

    Each file is written beside its final name and renamed into place, so an interrupted run leaves the
    previous results whole. Returns (json path, md path).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    for path, text in zip(paths, (json.dumps(data, indent=1), table)):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print("\n" + table)
    print(f"written: {paths[0]}, {paths[1]}")
    return paths


def write_rows(out_dir: str, name: str, rows: list[dict], markdown: Callable[[dict], str]) -> int:
    """``{"environment", "rows"}`` through :func:`write_results`; the exit status: 1 if a row holds an error."""
    result = {"environment": environment(), "rows": rows}
    write_results(out_dir, name, result, markdown(result))
    return 1 if any("error" in r for r in rows) else 0


def run_case(script: str, args: list[str], env: dict | None = None) -> dict:
    """Runs ``python script *args`` (a benchmark's ``--worker`` mode) in its own process and returns the JSON
    row it printed last, or ``{"error": <its last line of output>}``."""
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def xla_figures(compiled: Any) -> dict:
    """FLOPs and memory of a compiled JAX executable, from XLA's own analyses.

    Returns:
      {"flops": float (XLA cost analysis: multiply-adds count 2), "temp_mib", "argument_mib",
       "output_mib": float (memory analysis of the executable, not of the process)}.
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    mib = 1.0 / 2**20
    return {"flops": float((cost or {}).get("flops", float("nan"))),
            "temp_mib": mem.temp_size_in_bytes * mib, "argument_mib": mem.argument_size_in_bytes * mib,
            "output_mib": mem.output_size_in_bytes * mib}


# glibc's malloc advises transparent huge pages for the memory it maps (glibc >= 2.35; read at process
# start). XLA:CPU maps a fresh temporary buffer for every execution of a compiled step, ~1.1 GiB for
# the 512x512 training step: with 4 KiB pages that is ~290k page faults and ~0.5 s of kernel time per
# step on this project's VM, with 2 MiB pages ~2k faults and ~0.1 s. Both frameworks' benchmark
# processes run with it (torchvision's step time does not change with it).
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def with_hugepages(env: dict) -> dict:
    """``env`` with :data:`HUGEPAGE_TUNABLE` added to ``GLIBC_TUNABLES``, unless that already says
    something about ``hugetlb`` (the caller's setting wins)."""
    current = env.get("GLIBC_TUNABLES", "")
    if "hugetlb" in current:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": f"{current}:{HUGEPAGE_TUNABLE}" if current else HUGEPAGE_TUNABLE}


def isolate_jax() -> None:
    """Measure compile times honestly: no persistent compilation cache in benchmark workers."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def environment() -> dict:
    """Versions and machine facts recorded beside every benchmark table."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "processor": _cpu_model(), "date": time.strftime("%Y-%m-%d"),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "transparent_hugepages": _thp_mode(),
            "xla_cpu_defaults": xla_flags.FLAG_NAME in os.environ.get("XLA_FLAGS", "")}
    try:
        import jax

        info.update(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0]))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["jax"] = f"unavailable: {e}"
    try:
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__, torch_threads=torch.get_num_threads())
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["torch"] = f"unavailable: {e}"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _thp_mode() -> str:
    """The kernel's transparent huge page mode (the bracketed word), or "" where there is none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
