"""The host input pipeline alone: training batches per second, CPU seconds per image and peak memory, for each
number of decoding worker processes (issue 20; the pipeline a pod host must run).

    python benchmarks/input_pipeline.py [--batches 12] [--workers 0,1,2] [--datasets minicoco,synthetic]

Each (dataset, workers) case runs in its own process: the training iterator of a config is built and drained for
``--batches`` batches after 2 warm-up batches; ``images_per_s`` = images / wall time, ``cpu_s_per_image`` = user +
system CPU time of the process and its decoding workers over the timed batches / images, ``rss_mib`` = the sum of
each process's peak RSS in that tree (an upper bound: shared pages count once per process). ``workers`` 0 decodes
on a thread of the process; n > 0 in n worker processes. Datasets:

* ``minicoco``: the COCO photos and annotations in ``../shared/data/minicoco`` at 800x1333 (canvas 800x1344),
  batch 8, ``data.mask_supervision=by_annotation``, horizontal flips on: what a COCO run's host does per image;
* ``synthetic``: the built-in ``shapes10`` data at its 128x128 (the demo's pipeline), batch 8.

Results: ``benchmarks/results/input_pipeline.json`` as ``{"environment": ..., "rows": [{"dataset", "workers",
"images_per_s", "cpu_s_per_image", "rss_mib", ...}]}`` and ``input_pipeline.md``. Measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, run_case, write_rows

MINICOCO = os.path.join(os.path.dirname(ROOT), "shared", "data", "minicoco")
BATCH = 8
WARMUP = 2


def _config(dataset: str, workers: int, scratch: str):
    from maskx_jax.config import base_config

    c = base_config()
    d = c.data
    if dataset == "minicoco":
        d.source, d.set_a = "coco", "all"
        d.train_json, d.train_images = f"{MINICOCO}/annotations_train.json", f"{MINICOCO}/images"
        d.val_json, d.val_images = f"{MINICOCO}/annotations_val.json", f"{MINICOCO}/images"
        d.min_size, d.max_size, d.pad_height, d.pad_width = 800, 1333, 800, 1344
        d.mask_supervision = "by_annotation"
    elif dataset == "synthetic":
        d.synthetic_dir = os.path.join(scratch, "synthetic")
        d.min_size = d.max_size = d.pad_height = d.pad_width = 128
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    d.cache_dir = os.path.join(scratch, "cache")
    d.num_workers = workers
    c.train.batch_size = BATCH
    return c


def _tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live descendants (the decoding workers)."""
    import psutil

    total = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _tree_peak_rss_mib() -> float:
    """Sum over this process and its live descendants of each one's peak RSS (Linux ``VmHWM``), MiB.

    Pages shared between processes (the shared-memory batches, the libraries) count once per process that
    touched them, so this is an upper bound of the tree's peak."""
    import psutil

    total = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            with open(f"/proc/{p.pid}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024.0
        except (OSError, StopIteration):
            continue
    return total


def measure(dataset: str, workers: int, batches: int) -> dict:
    """One case, in this process (``--worker``)."""
    from maskx_jax.data.pipeline import load_datasets, make_train_iterator

    with tempfile.TemporaryDirectory() as scratch:
        config = _config(dataset, workers, scratch)
        info = load_datasets(config)
        with make_train_iterator(config, info=info) as it:
            for _ in range(WARMUP):
                next(it)
            cpu0, t0 = _tree_cpu_s(), time.perf_counter()
            for _ in range(batches):
                next(it)
            wall = time.perf_counter() - t0
            cpu1 = _tree_cpu_s()
            rss = _tree_peak_rss_mib()
    images = batches * BATCH
    return {"dataset": dataset, "workers": workers, "batch": BATCH, "batches": batches,
            "images_per_s": images / wall, "cpu_s_per_image": (cpu1 - cpu0) / images,
            "rss_mib": rss, "train_images": len(info.train)}


def markdown(result: dict) -> str:
    out = ["| dataset | workers | images/s | CPU s / image | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            out.append(f"| {r['dataset']} | {r['workers']} | error: {r['error'][:80]} | | |")
        else:
            out.append(f"| {r['dataset']} | {r['workers']} | {r['images_per_s']:.1f} | {r['cpu_s_per_image']:.3f} "
                       f"| {r['rss_mib']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="minicoco,synthetic")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        dataset, workers = args.worker.split(":")
        print(json.dumps(measure(dataset, int(workers), args.batches)), flush=True)
        return 0
    rows = []
    for dataset in args.datasets.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            print(f"{dataset}, {workers} worker(s) ...", end=" ", flush=True)
            row = run_case(os.path.abspath(__file__), ["--worker", f"{dataset}:{workers}", "--batches",
                                                       str(args.batches)])
            if "error" in row:
                rows.append({"dataset": dataset, "workers": workers, **row})
                print("error", flush=True)
                continue
            rows.append(row)
            print(f"{row['images_per_s']:.1f} images/s", flush=True)
    return write_rows(args.out, "input_pipeline", rows, markdown)


if __name__ == "__main__":
    sys.exit(main())
