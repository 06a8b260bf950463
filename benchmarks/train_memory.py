"""Where the training step's peak memory goes (issue 20): the compile, XLA's buffers, the process around them.

    python benchmarks/train_memory.py [--size 512] [--depth 50] [--cases auto:class_specific,xla:class_specific,...]

Each case (``model.conv_impl``:``model.mask_mode``) runs in its own process, on the benchmark's R50-FPN training
step (``benchmarks/cases.py``: batch 2, 8 instances per image, SGD, frozen BN, torchvision's trainable layers;
``transfer`` = Mask^X with MLP fusion). It records the process's peak RSS (``ru_maxrss``) at three moments: with
the model built and the batch on the device (``rss_before_compile_mib``), after compiling the step
(``rss_after_compile_mib``: the compiler's own peak), and after two steps (``rss_after_steps_mib``: the step's
peak), with ``compiled.memory_analysis()`` of the step: temporaries (activations kept for the backward pass,
gradients, workspace), arguments (parameters, optimiser state, batch) and outputs (the new state, donated into
the arguments' buffers: ``alias``). Writes ``benchmarks/results/train_memory.json`` and ``.md``. The processes
run with glibc's huge-page tunable, as ``make bench``'s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, run_case, with_hugepages, write_rows

DEFAULT_CASES = "auto:class_specific,xla:class_specific,auto:transfer"


def measure(conv_impl: str, mask_mode: str, size: int, depth: int = 50, toy: bool = False) -> dict:
    """One case, in this process (``--worker``)."""
    from maskx_jax.backends.cpu import xla_flags

    xla_flags.apply_cpu_defaults()
    import jax

    from benchmarks import cases
    from benchmarks.common import isolate_jax, peak_rss_mib
    from maskx_jax.train_lib import Trainer

    isolate_jax()
    config = cases._our_train_config(size, size, 2, mask_mode)
    config.model.conv_impl = conv_impl
    config.model.depth = depth
    if toy:  # the driver's test: narrow FPN and heads, few RoIs, one mask branch (not a measurement)
        m = config.model
        m.fpn_channels, m.representation, m.mask_head_channels, m.transfer_hidden = 32, 64, 32, 32
        m.roi_batch_size_per_image, m.max_mask_rois_per_image, m.mask_slot_buckets = 64, 16, ()
    images = cases.smooth_images(2, size, size, seed=3)
    targets = cases.train_targets(2, size, size, 8, seed=4)
    trainer = Trainer(config, cases.COCO_CLASSES)
    state = trainer.init_state()
    data = trainer.global_batch(cases._our_batch(images, targets, config))
    row = {"conv_impl": conv_impl, "mask_mode": mask_mode, "size": size, "depth": depth, "toy": toy, "batch": 2,
           "rss_before_compile_mib": peak_rss_mib()}
    step = trainer.train_step.lower(state, data).compile()
    row["rss_after_compile_mib"] = peak_rss_mib()
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
    out = ["| conv_impl | mask head | RSS before compile | after compile | after 2 steps | XLA temp | arguments "
           "| outputs (aliased) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            out.append(f"| {r['conv_impl']} | {r['mask_mode']} | error: {r['error'][:80]} | | | | | |")
            continue
        out.append(f"| {r['conv_impl']} | {r['mask_mode']} | {r['rss_before_compile_mib']:.0f} | "
                   f"{r['rss_after_compile_mib']:.0f} | {r['rss_after_steps_mib']:.0f} | {r['temp_mib']:.0f} | "
                   f"{r['argument_mib']:.0f} | {r['output_mib']:.0f} ({r['alias_mib']:.0f}) |")
    return "\n".join(out) + "\n\nMiB; RSS figures are the process's peak so far.\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated conv_impl:mask_mode")
    p.add_argument("--size", type=int, default=512, help="square image side (multiple of 32)")
    p.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101), help="ResNet depth")
    p.add_argument("--toy", action="store_true", help="narrow FPN and heads (a test of this script, not a measurement)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        conv_impl, mask_mode = args.worker.split(":")
        print(json.dumps(measure(conv_impl, mask_mode, args.size, args.depth, args.toy)), flush=True)
        return 0
    rows = []
    for case in args.cases.split(","):
        conv_impl, mask_mode = case.split(":")
        print(f"{conv_impl}, {mask_mode} ...", end=" ", flush=True)
        worker_args = ["--worker", case, "--size", str(args.size), "--depth", str(args.depth)] + ["--toy"] * args.toy
        row = run_case(os.path.abspath(__file__), worker_args, env=with_hugepages(dict(os.environ)))
        if "error" in row:
            rows.append({"conv_impl": conv_impl, "mask_mode": mask_mode, **row})
            print("error", flush=True)
            continue
        rows.append(row)
        print(f"peak {row['rss_after_steps_mib']:.0f} MiB", flush=True)
    return write_rows(args.out, "train_memory", rows, markdown)


if __name__ == "__main__":
    sys.exit(main())
