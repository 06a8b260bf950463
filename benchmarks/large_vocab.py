"""Large vocabulary: mask-branch (and full predict) cost at K = 80 vs 3000 classes, gathered vs naive.

    python benchmarks/large_vocab.py                      # ~1-2 min on a 2-core CPU
    python benchmarks/large_vocab.py --rois 100 --classes 81,1001,3001 --no-full

Two implementations of Mask^X's inference-time mask logits for D detections with labels l_i:

  * gathered (the library's ``MaskRCNN.mask_logits``): gather the D detected classes' detection
    weights, run tau on those D rows, one 1x1-conv channel per RoI -> [D, 28, 28];
  * naive (only here, for comparison; what a straightforward port of the paper's code does): tau on
    all K+1 classes, K+1-channel 1x1 conv -> [D, 28, 28, K+1], then pick each RoI's channel.

For each (K, path) it reports the compiled executable's memory (``jax.jit(f).lower(...).compile()
.memory_analysis()``: temporaries, arguments, outputs), XLA's flop count, and the median wall time
of the mask branch alone (conv5_mask features -> logits, the paper's mask-head width C = 256 by
default) and, with ``--full``, of a whole ``predict`` on a small detector (R-18-FPN, one 128 x 128
image) whose box branch is K-way in both paths. Weights are random (inference cost does not depend
on their values; ``box_score_thresh`` is 0 so NMS runs its worst case). Writes
``OUT/large_vocab.json`` and ``OUT/large_vocab.md`` (a Markdown table).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import write_results
from maskx_jax import mask_head
from maskx_jax.detector import DetectorConfig, MaskRCNN


class NaiveMaskRCNN(MaskRCNN):
    """Mask^X with the all-classes mask path (benchmark reference only)."""

    def mask_logits(self, features, labels):
        weight, bias = self.mask_class_weights()  # tau on all K+1 classes: [K+1, C]
        logits = mask_head.mask_logits(features, weight, bias)  # [R, 28, 28, K+1]
        picked = jnp.take_along_axis(logits, labels[:, None, None, None], axis=3)[..., 0]
        fused = self.roi_heads.mask_predictor.fusion(features)
        return picked if fused is None else picked + fused


PATHS = {"gathered": MaskRCNN, "naive": NaiveMaskRCNN}


def random_state(cls, cfg: DetectorConfig, seed: int = 0):
    """(graphdef, state) of ``cls(cfg)`` with random N(0, 0.02) weights, without eager initialisation."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return graphdef, jax.tree.map(
        lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape, dtype=np.float32), x.dtype), abstract)


def _timed(fn, args, repeats: int):
    """(compile seconds, run seconds per repeat, compiled executable) of ``jax.jit(fn)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, times, compiled


def _stats(compiled) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes), "flops": float((cost or {}).get("flops", float("nan")))}


def bench_mask_branch(num_classes: int, path: str, args) -> dict:
    cfg = DetectorConfig(depth=18, num_classes=num_classes, fpn_channels=32, representation=args.representation,
                         mask_head_channels=args.channels, transfer_hidden=args.channels, mask_mode="transfer",
                         mlp_fusion=False)
    graphdef, state = random_state(PATHS[path], cfg)
    # Only the RoI heads' weights are arguments: mask_logits never reads the backbone or the RPN,
    # whose (placeholder) zeros XLA drops.
    heads = state["roi_heads"]
    others = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
              for k, v in state.items() if k != "roi_heads"}

    def fn(heads, features, labels):
        full = dict(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), others), roi_heads=heads)
        return nnx.merge(graphdef, nnx.State(full)).mask_logits(features, labels)

    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(args.rois, 28, 28, args.channels)), jnp.float32)
    labels = jnp.asarray(rng.integers(1, num_classes, args.rois), jnp.int32)
    compile_s, times, compiled = _timed(fn, (heads, features, labels), args.repeats)
    return {"what": "mask_branch", "num_classes": num_classes, "path": path, "rois": args.rois,
            "channels": args.channels, "compile_s": compile_s, "median_ms": 1e3 * statistics.median(times),
            "times_ms": [1e3 * t for t in times], **_stats(compiled)}


def bench_full_predict(num_classes: int, path: str, args) -> dict:
    s = args.image_size
    cfg = DetectorConfig(depth=18, num_classes=num_classes, fpn_channels=64, norm="group_norm",
                         representation=256, mask_head_channels=args.channels, transfer_hidden=args.channels,
                         mask_mode="transfer", mlp_fusion=False, anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
                         rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=args.proposals,
                         box_score_thresh=0.0, detections_per_img=args.rois)
    graphdef, state = random_state(PATHS[path], cfg)

    def fn(state, images, sizes):
        return nnx.merge(graphdef, state).predict(images, sizes)

    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, s, s, 3)), jnp.float32)
    sizes = jnp.asarray([[s, s]], jnp.int32)
    compile_s, times, compiled = _timed(fn, (state, images, sizes), args.repeats)
    return {"what": "full_predict", "num_classes": num_classes, "path": path, "rois": args.rois,
            "channels": args.channels, "image": s, "proposals": args.proposals, "compile_s": compile_s,
            "median_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times], **_stats(compiled)}


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| measured | classes K | mask path | time (ms, median) | temp memory (MiB) | inputs + weights (MiB) | "
             "GFLOP |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        what = (f"mask branch, {r['rois']} RoIs, C={r['channels']}" if r["what"] == "mask_branch" else
                f"full predict, R-18-FPN, {r['image']}px, {r['rois']} dets")
        lines.append(f"| {what} | {r['num_classes'] - 1} | {r['path']} | {r['median_ms']:,.1f} | "
                     f"{_mib(r['temp_bytes'])} | {_mib(r['argument_bytes'])} | {r['flops'] / 1e9:,.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="81,3001", help="comma-separated num_classes (background included)")
    p.add_argument("--rois", type=int, default=100, help="detections per image (mask-branch RoIs)")
    p.add_argument("--channels", type=int, default=256, help="mask head width C (the paper's 256)")
    p.add_argument("--representation", type=int, default=1024, help="box head width (tau's input is 5x this)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a whole predict on a small detector")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--proposals", type=int, default=200, help="RPN proposals kept per image (full predict)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    classes = [int(k) for k in args.classes.split(",")]
    rows = []
    for what, fn in (("mask_branch", bench_mask_branch), ("full_predict", bench_full_predict)):
        if what == "full_predict" and not args.full:
            continue
        for k in classes:
            for path in PATHS:
                row = fn(k, path, args)
                rows.append(row)
                print(f"{what:12s} K={k - 1:5d} {path:8s} {row['median_ms']:9.1f} ms  "
                      f"temp {_mib(row['temp_bytes'])} MiB"
                      f"  args {_mib(row['argument_bytes'])} MiB  {row['flops'] / 1e9:.2f} GFLOP"
                      f"  (compile {row['compile_s']:.1f} s)", flush=True)
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
           "cpu_count": os.cpu_count(), "python": platform.python_version()}
    header = f"Environment: {env['backend']} ({env['device']}), {env['cpu_count']} CPU cores, jax {env['jax']}.\n\n"
    write_results(args.out, "large_vocab", {"env": env, "args": vars(args), "rows": rows}, header + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
