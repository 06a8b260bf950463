"""Per-device memory of the training step on a pod, from XLA's memory analysis of the compiled step.

    python benchmarks/pod_memory.py                        # R-50/R-101 x float32/bfloat16, ~10 min
    python benchmarks/pod_memory.py --depths 50 --dtypes bfloat16 --size 800
    python benchmarks/pod_memory.py --mask-slot-buckets ""            # the static mask branch only
    python benchmarks/pod_memory.py --depths 50 --dtypes float32 --shard-params none,mask_mlp --name pod_memory_fsdp

Nothing runs and nothing is allocated: the train step of ``Trainer`` is lowered on abstract
(ShapeDtypeStruct) state and batch over a mesh of ``--devices`` fake CPU devices
(``--xla_force_host_platform_device_count``), data parallel with a per-device batch of
``--per-device-batch`` images, and ``compiled.memory_analysis()`` gives each device's buffers:
arguments (parameters + optimiser state + its batch shard), outputs (the new state, donated into
the arguments' buffers) and temporaries (activations kept for the backward pass, gradients,
workspace). The figures are the XLA CPU backend's buffer assignment; GPU and TPU backends
assign (and fuse) differently, so read them as the size of the problem, within tens of percent.
Winograd convolutions, which only the CPU takes, are turned off for it.
``--shard-params`` compares ``train.shard_params`` settings (``none`` = everything replicated; ``mask_mlp`` = the
MLP-fusion FC and its momentum split over the devices). Writes ``benchmarks/results/<--name>.json`` and ``.md``
(default ``pod_memory``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _buckets(text: str) -> tuple[int, ...]:
    """'8,16,32' -> (8, 16, 32); '' -> () (static mask branch)."""
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slot counts, got {text!r}") from None
    if any(v <= 0 for v in sizes):
        raise argparse.ArgumentTypeError(f"slot counts must be positive, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--per-device-batch", type=int, default=2)
    p.add_argument("--size", type=int, default=1024, help="square padded image side (multiple of 32)")
    p.add_argument("--depths", default="50,101")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--classes", type=int, default=81, help="num_classes incl. background (COCO: 81)")
    p.add_argument("--mask-slot-buckets", default=None, type=_buckets,
                   help="comma-separated model.mask_slot_buckets (training uses them only with "
                        "model.mask_chunk_slots=0; '' = none; default: the config's)")
    p.add_argument("--shard-params", default="none",
                   help="comma-separated train.shard_params settings to compare ('none' = all replicated)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="pod_memory", help="results file name (without .json / .md)")
    args = p.parse_args(argv)
    shard_settings = ["" if s.strip() == "none" else s.strip() for s in args.shard_params.split(",")]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp

    from benchmarks.common import write_results
    from maskx_jax.config import base_config
    from maskx_jax.train_lib import Trainer
    from maskx_jax.types import Batch

    jax.config.update("jax_enable_compilation_cache", False)
    # Winograd convolutions are a CPU-only path (maskx_jax/backends/cpu/winograd.py); a pod's GPUs/TPUs run
    # XLA's own convolutions, so the figures leave it out: model.conv_impl="canonical" below. (The CPU gradient
    # forms of backends/cpu/conv_gradients.py stay: they change the temporaries by ~0.01-0.02 GiB.)
    rows = []
    cases = [(int(d), t, s) for d in args.depths.split(",") for t in args.dtypes.split(",") for s in shard_settings]
    for depth, dtype, shard in cases:
        c = base_config()
        c.model.depth, c.model.dtype = depth, dtype
        c.model.conv_impl = "canonical"
        if args.mask_slot_buckets is not None:
            c.model.mask_slot_buckets = args.mask_slot_buckets
        c.model.mask_mode, c.data.set_a = "transfer", "voc"
        c.data.pad_height = c.data.pad_width = args.size
        c.train.batch_size = args.devices * args.per_device_batch
        c.train.shard_params = shard
        trainer = Trainer(c, args.classes)
        b, g, s, hw = c.train.batch_size, c.data.max_instances, c.data.mask_crop_size, args.size
        shapes = Batch(images=((b, hw, hw, 3), jnp.float32), image_sizes=((b, 2), jnp.int32),
                       gt_boxes=((b, g, 4), jnp.float32), gt_classes=((b, g), jnp.int32),
                       gt_valid=((b, g), jnp.bool_), gt_crowd=((b, g), jnp.bool_),
                       gt_has_mask=((b, g), jnp.bool_), gt_masks=((b, g, s, s), jnp.float32),
                       image_ids=((b,), jnp.int32), original_sizes=((b, 2), jnp.int32))
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(*x, sharding=trainer.batch_sharding), shapes,
                             is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
        mem = compiled.memory_analysis()
        gib = 1.0 / 2**30
        row = {"depth": depth, "dtype": dtype, "devices": args.devices, "global_batch": b,
               "per_device_batch": args.per_device_batch, "image": hw,
               "mask_slot_buckets": list(c.model.mask_slot_buckets),
               "mask_chunk_slots": int(c.model.mask_chunk_slots), "shard_params": shard,
               "compile_s": time.perf_counter() - t0,
               "argument_gib": mem.argument_size_in_bytes * gib, "output_gib": mem.output_size_in_bytes * gib,
               "alias_gib": mem.alias_size_in_bytes * gib, "temp_gib": mem.temp_size_in_bytes * gib}
        # Donated outputs reuse the argument buffers (alias), so they are not counted twice.
        row["total_gib"] = row["argument_gib"] + row["output_gib"] - row["alias_gib"] + row["temp_gib"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| backbone | compute dtype | mesh | sharded | global batch | image | arguments GiB | temporaries GiB | "
             "per-device total GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| R-{r['depth']}-FPN | {r['dtype']} | data={r['devices']} | {r['shard_params'] or '-'} | "
                     f"{r['global_batch']} "
                     f"({r['per_device_batch']}/device) | {r['image']}x{r['image']} | {r['argument_gib']:.2f} | "
                     f"{r['temp_gib']:.2f} | {r['total_gib']:.2f} |")
    write_results(args.out, args.name, rows, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
