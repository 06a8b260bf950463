"""Where the training step's peak memory goes (issue 20): the compile, XLA's buffers, the process around them.

    python benchmarks/train_memory.py [--size 512] [--depth 50] [--cases auto:class_specific,xla:class_specific,...]

Each case (``model.conv_impl``:``model.mask_mode``[:all]) runs in its own process, on the benchmark's R50-FPN
training step (``benchmarks/cases.py``: batch 2, 8 instances per image, SGD, frozen BN, torchvision's trainable
layers; ``transfer`` = Mask^X with MLP fusion); ``all`` gives each image 100 instances, so that all 128 mask slots
are supervised (the mask head runs every chunk; ``torch:class_specific:all`` is torchvision's step on that data). It
records the process's peak RSS (``ru_maxrss``) at three moments: with the model built and the batch on the device
(``rss_before_compile_mib``), after compiling the step the way the training loop does (``Trainer.train_step.compile``:
``rss_after_compile_mib`` is the compiler's own peak; the compiler's freed memory is then handed back to the OS,
``rss_released_mib`` is what stays resident), and after two steps (``rss_after_steps_mib``: the run's peak), with
``compiled.memory_analysis()`` of the step: temporaries (activations kept for the backward pass, gradients,
workspace), arguments (parameters, optimiser state, batch) and outputs (the new state, donated into the
arguments' buffers: ``alias``). The case ``torch:class_specific`` is torchvision's same step (its peak RSS after
the benchmark's warm-up and timed steps), for the ratio in the same run. Writes
``benchmarks/results/train_memory.json`` and ``.md``. The processes run with glibc's huge-page tunable, as
``make bench``'s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, run_case, with_hugepages, write_rows

DEFAULT_CASES = ("torch:class_specific,auto:class_specific,torch:class_specific:all,auto:class_specific:all,"
                 "xla:class_specific,auto:transfer")
# Instances per image: the benchmark's, and enough for every one of the 128 mask slots to be supervised.
INSTANCES, ALL_SLOTS_INSTANCES = 8, 100


def measure(conv_impl: str, mask_mode: str, size: int, depth: int = 50, toy: bool = False,
            all_slots: bool = False) -> dict:
    """One case, in this process (``--worker``)."""
    from benchmarks import cases

    instances = ALL_SLOTS_INSTANCES if all_slots else INSTANCES

    if conv_impl == "torch":  # torchvision's step (R-50 at this size): its peak after the timed steps; no JAX here
        row = cases.train("torch", size, size, batch=2, repeats=2, instances=instances)
        return {"conv_impl": "torch", "mask_mode": mask_mode, "size": size, "depth": 50, "toy": False, "batch": 2,
                "all_slots": all_slots, "instances": instances, "rss_after_steps_mib": row["peak_rss_mib"]}
    from maskx_jax.backends.cpu import xla_flags

    xla_flags.apply_cpu_defaults()
    import jax

    from benchmarks.common import isolate_jax, peak_rss_mib
    from maskx_jax.host_memory import resident_mib
    from maskx_jax.train_lib import Trainer

    isolate_jax()
    config = cases._our_train_config(size, size, 2, mask_mode)
    config.model.conv_impl = conv_impl
    config.model.depth = depth
    if toy:  # the driver's test: narrow FPN and heads, few RoIs and mask slots (not a measurement)
        m = config.model
        m.fpn_channels, m.representation, m.mask_head_channels, m.transfer_hidden = 32, 64, 32, 32
        m.roi_batch_size_per_image, m.max_mask_rois_per_image = 64, 16
    images = cases.smooth_images(2, size, size, seed=3)
    targets = cases.train_targets(2, size, size, instances, seed=4)
    trainer = Trainer(config, cases.COCO_CLASSES)
    state = trainer.init_state()
    trainer.release_init()  # as the training loop
    data = trainer.global_batch(cases._our_batch(images, targets, config))
    row = {"conv_impl": conv_impl, "mask_mode": mask_mode, "size": size, "depth": depth, "toy": toy, "batch": 2,
           "all_slots": all_slots, "instances": instances, "mask_chunk_slots": int(config.model.mask_chunk_slots),
           "rss_before_compile_mib": peak_rss_mib()}
    step = trainer.train_step.compile(state, data)  # as the training loop: compile, then release
    row["rss_after_compile_mib"] = peak_rss_mib()
    row["rss_released_mib"] = resident_mib()
    mem = step.memory_analysis()
    mib = 1.0 / 2**20
    row.update(temp_mib=mem.temp_size_in_bytes * mib, argument_mib=mem.argument_size_in_bytes * mib,
               output_mib=mem.output_size_in_bytes * mib, alias_mib=mem.alias_size_in_bytes * mib)
    for _ in range(2):
        state, metrics = step(state, data, trainer.train_step.seed)
        jax.block_until_ready(metrics["total"])
    row["rss_after_steps_mib"] = peak_rss_mib()
    return row


def markdown(result: dict) -> str:
    rows = result["rows"]

    def torch_peak(r: dict) -> float | None:  # torchvision's step on the same data (same instance count)
        return next((t["rss_after_steps_mib"] for t in rows if t.get("conv_impl") == "torch" and "error" not in t
                     and bool(t.get("all_slots")) == bool(r.get("all_slots"))), None)

    out = ["| conv_impl | mask head | RSS before compile | after compile | after release | peak (after 2 steps) "
           "| vs torchvision | XLA temp | arguments | outputs (aliased) |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k: "" if r.get(k) is None else f"{r[k]:.0f}"
    for r in rows:
        head = r["mask_mode"] + (f", all 128 slots supervised ({r.get('instances', '')} instances/image)"
                                  if r.get("all_slots") else "")
        if "error" in r:
            out.append(f"| {r['conv_impl']} | {head} | error: {r['error'][:80]} | | | | | | | |")
            continue
        torch = torch_peak(r)
        ratio = f"{r['rss_after_steps_mib'] / torch:.2f}x" if torch else ""
        aliased = "" if r.get("alias_mib") is None else f" ({r['alias_mib']:.0f})"
        out.append(f"| {r['conv_impl']} | {head} | {f(r, 'rss_before_compile_mib')} | {f(r, 'rss_after_compile_mib')} "
                   f"| {f(r, 'rss_released_mib')} | {f(r, 'rss_after_steps_mib')} | {ratio} | {f(r, 'temp_mib')} "
                   f"| {f(r, 'argument_mib')} | {f(r, 'output_mib')}{aliased} |")
    return "\n".join(out) + ("\n\nMiB; RSS figures are the process's peak so far, except 'after release' (resident "
                             "then); 'vs torchvision': the peak over torchvision's on the same data in this run.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated conv_impl:mask_mode[:all] (conv_impl "
                   "'torch' = torchvision's step)")
    p.add_argument("--size", type=int, default=512, help="square image side (multiple of 32)")
    p.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101), help="ResNet depth")
    p.add_argument("--toy", action="store_true", help="narrow FPN and heads (a test of this script, not a measurement)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        conv_impl, mask_mode, *slots = args.worker.split(":")
        print(json.dumps(measure(conv_impl, mask_mode, args.size, args.depth, args.toy, slots == ["all"])),
              flush=True)
        return 0
    rows = []
    for case in args.cases.split(","):
        conv_impl, mask_mode, *slots = case.split(":")
        print(f"{case} ...", end=" ", flush=True)
        worker_args = ["--worker", case, "--size", str(args.size), "--depth", str(args.depth)] + ["--toy"] * args.toy
        row = run_case(os.path.abspath(__file__), worker_args, env=with_hugepages(dict(os.environ)))
        if "error" in row:
            rows.append({"conv_impl": conv_impl, "mask_mode": mask_mode, "all_slots": slots == ["all"], **row})
            print("error", flush=True)
            continue
        rows.append(row)
        print(f"peak {row['rss_after_steps_mib']:.0f} MiB", flush=True)
    return write_rows(args.out, "train_memory", rows, markdown)


if __name__ == "__main__":
    sys.exit(main())
