"""What ``model.exact_canvas`` (torchvision's per-image extent on a fixed canvas) costs: maskx_jax's inference
and training step with it on and off, in alternation, each run in its own process as ``run.py`` runs them.

    python benchmarks/exact_canvas.py [--sizes 512x512,800x1333] [--rounds 2]

Writes ``benchmarks/results/exact_canvas.json`` (every row) and ``exact_canvas.md`` (the medians and the
on/off ratio). The images fill the canvas, so both settings compute the same detections: only the cost of
the extra masking (a select before each spatial operation, per-image anchors, clamped RoIAlign) differs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, with_hugepages, write_rows
from benchmarks.run import run_case


def markdown(result: dict) -> str:
    out = ["| case | image | images/s exact_canvas on | off | on / off | peak RSS MiB on / off |",
           "|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[bool, list[dict]]] = {}
    for r in result["rows"]:
        if "error" in r:
            out.append(f"| {r['case']} | {r['height']}x{r['width']} | error: {r['error'].splitlines()[-1][:80]} "
                       "| | | |")
            continue
        groups.setdefault((r["case"], r["height"], r["width"]), {True: [], False: []})[r["exact_canvas"]].append(r)
    for (case, h, w), by in groups.items():
        if not by[True] or not by[False]:
            continue
        on = statistics.median(r["images_per_s"] for r in by[True])
        off = statistics.median(r["images_per_s"] for r in by[False])
        rss_on = max(r["peak_rss_mib"] for r in by[True])
        rss_off = max(r["peak_rss_mib"] for r in by[False])
        out.append(f"| {case} | {h}x{w} | {on:.3f} | {off:.3f} | {on / off:.3f} | {rss_on:.0f} / {rss_off:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512x512,800x1333")
    p.add_argument("--rounds", type=int, default=2, help="on/off pairs per case (alternating)")
    p.add_argument("--cases", default="inference,train")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    os.environ["GLIBC_TUNABLES"] = with_hugepages(os.environ)["GLIBC_TUNABLES"]
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        for case in args.cases.split(","):
            extra = {"batch": 1} if case == "inference" else {"batch": 2}
            for k in range(args.rounds):
                for exact in (True, False):
                    spec = {"case": case, "framework": "jax", "height": h, "width": w, "repeats": 3,
                            "exact_canvas": exact, **extra}
                    print(f"{case} {h}x{w} exact_canvas={exact} round {k + 1} ...", end=" ", flush=True)
                    row = run_case(spec, args.timeout)
                    rows.append(row)
                    print(row.get("error") or f"{row['images_per_s']:.3f} images/s", flush=True)
    return write_rows(args.out, "exact_canvas", rows, markdown)


if __name__ == "__main__":
    sys.exit(main())
