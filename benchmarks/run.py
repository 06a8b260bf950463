"""maskx_jax vs torchvision: speed, compile time, memory and FLOPs (``make bench``).

    python benchmarks/run.py                 # everything, ~20-30 min on a 2-core CPU
    python benchmarks/run.py --quick         # 512 x 512 only, fewer repeats (~8 min)
    python benchmarks/run.py --only roi_align,train

Each case runs in a fresh subprocess (its peak RSS is its own; no JAX compilation cache), the two
frameworks one after the other on the same weights and inputs, every one of them with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` added to its environment (see ``benchmarks/common.py``).
Results go to ``benchmarks/results/bench.json`` (every raw time) and ``bench.md`` (the tables quoted in
the README). See ``benchmarks/cases.py`` for exactly what each case measures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, environment, with_hugepages, write_results
from benchmarks.report import markdown

SIZES = ((800, 1333), (512, 512))


def plan(quick: bool, only: set[str] | None, smoke: bool = False) -> list[dict]:
    """The case specs, in run order: {"case": name, "framework": ..., **kwargs}.

    ``smoke``: seconds-long toy versions of the cheap cases (tests/integration/test_benchmarks.py runs the whole
    driver this way so the benchmark code cannot rot); its figures mean nothing.
    """
    if smoke:
        specs = [{"case": "matmul_peak", "n": 128, "repeats": 1}]
        specs += [{"case": "kernels", "framework": fw, "repeats": 1, "smoke": True} for fw in ("jax", "torch")]
        specs += [{"case": "roi_align", "framework": fw, "out": 7, "rois": 16, "channels": 8, "repeats": 1}
                  for fw in ("jax", "torch")]
        return [s for s in specs if only is None or s["case"] in only]
    sizes = SIZES[1:] if quick else SIZES
    reps = 2 if quick else 3
    specs = [{"case": "matmul_peak"}] + [{"case": "kernels", "framework": fw} for fw in ("jax", "torch")]
    for out in (7, 14):
        specs += [{"case": "roi_align", "framework": fw, "out": out, "repeats": 3 if quick else 5}
                  for fw in ("jax", "torch")]
    for h, w in sizes:
        for batch in (1, 2):
            specs += [{"case": "inference", "framework": fw, "height": h, "width": w, "batch": batch, "repeats": reps}
                      for fw in ("jax", "torch")]
        # A deployment threshold: few detections, so the mask head's share shrinks in both frameworks.
        specs += [{"case": "inference", "framework": fw, "height": h, "width": w, "batch": 1, "repeats": reps,
                   "score_thresh": 0.5} for fw in ("jax", "torch")]
        # What torchvision's per-image extent costs (model.exact_canvas, on by default).
        specs.append({"case": "inference", "framework": "jax", "height": h, "width": w, "batch": 1, "repeats": reps,
                      "exact_canvas": False})
    for h, w in sizes:
        specs += [{"case": "train", "framework": fw, "height": h, "width": w, "batch": 2, "repeats": reps}
                  for fw in ("jax", "torch")]
        specs.append({"case": "train", "framework": "jax", "height": h, "width": w, "batch": 2, "repeats": reps,
                      "mask_mode": "transfer"})
        # What running the supervised slots only buys: the same step with the mask head always on all 128 slots.
        specs.append({"case": "train", "framework": "jax", "height": h, "width": w, "batch": 2, "repeats": reps,
                      "mask_slot_buckets": [], "mask_chunk_slots": 0})
        specs.append({"case": "train", "framework": "jax", "height": h, "width": w, "batch": 2, "repeats": reps,
                      "exact_canvas": False})
    return [s for s in specs if only is None or s["case"] in only]


def run_case(spec: dict, timeout_s: float) -> dict:
    """Run one case in a subprocess; returns its row (or {"error": ...} if it failed)."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        return {**spec, "error": f"exit {proc.returncode}: {tail}"}
    return {**spec, **json.loads(lines[-1]), "wall_s": wall}


def _kept_rows(json_path: str, only: set[str]) -> list[dict]:
    """Rows of the cases an ``--only`` run does not measure, from the existing results (each keeps the
    date and the processor it was measured on: a ratio read beside another machine's must say so), so that
    re-measuring one case does not drop the others' tables."""
    if not os.path.isfile(json_path):
        return []
    with open(json_path) as f:
        previous = json.load(f)
    env = previous.get("environment", {})
    measured = ", ".join(filter(None, (env.get("date") or "an earlier run", env.get("processor"))))
    return [{"measured": measured, **r} for r in previous.get("rows", []) if r.get("case") not in only]


def _describe(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items() if k != "repeats")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="512 x 512 only, fewer repeats")
    p.add_argument("--smoke", action="store_true", help="toy sizes of the cheap cases (a test of this script)")
    p.add_argument("--only", default="", help="comma-separated case names: matmul_peak,kernels,roi_align,inference,"
                   "train; the other cases' rows are kept from the existing bench.json")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # inside the subprocess: run one case, print its row as the last JSON line
        from benchmarks.cases import CASES

        spec = json.loads(args.worker)
        kwargs = {k: v for k, v in spec.items() if k != "case"}
        print(json.dumps(CASES[spec["case"]](**kwargs)), flush=True)
        return 0

    # Every case process (both frameworks) starts with glibc's huge-page advice (benchmarks/common.py).
    os.environ["GLIBC_TUNABLES"] = with_hugepages(os.environ)["GLIBC_TUNABLES"]
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    specs = plan(args.quick, only, args.smoke)
    rows = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {_describe(spec)} ...", end=" ", flush=True)
        row = run_case(spec, args.timeout)
        rows.append(row)
        print(row.get("error") or f"done in {row['wall_s']:.0f} s", flush=True)
    json_path = os.path.join(args.out, "bench.json")
    kept = _kept_rows(json_path, only) if only else []
    if kept:
        print(f"kept from the previous {json_path}: {len(kept)} rows of cases not run now")
    result = {"environment": environment(), "quick": args.quick, "smoke": args.smoke, "rows": kept + rows}
    write_results(args.out, "bench", result, markdown(result))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
