"""The convolutions of a Mask R-CNN R50-FPN training step, one by one: maskx_jax vs torchvision's ops.

    python benchmarks/conv_layers.py                       # 800 x 1333 and 512 x 512, ~3 min on 2 cores
    python benchmarks/conv_layers.py --sizes 512x512 --repeats 3

For every trainable convolution of the training step (ResNet-50 layer2-4 with stem + layer1
frozen, the FPN's lateral and output convolutions, the RPN head's 3x3 conv and its objectness +
box 1x1 convs, taken as one 15-channel conv), at its shape for a batch of 2 images, it times what
each framework's step does with it: torchvision forward + input gradient + filter gradient of every
one (``torch.nn.functional.conv2d`` and autograd, NCHW, oneDNN); maskx_jax the same through
``maskx_jax.conv.conv2d`` (the path its layers take: Winograd where it applies, custom gradients),
except for the RPN head's convolutions, which its step runs forward only (the RPN losses read the
head at their sampled anchors, ``RPNHead.at_anchors``). Each row is weighted by how often the step
runs that shape; the total is the step's convolution time if every convolution ran alone.
Comparing it with the whole step's time (``benchmarks/run.py``'s train rows) splits each framework's
step into convolutions and the rest. Every figure is a median over ``--repeats`` timed calls after
one warm-up.
Writes ``OUT/conv_layers.json`` and ``OUT/conv_layers.md``.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np

from benchmarks.common import environment, timed, write_results

# (input height, input width, in channels, out channels, kernel, stride, maskx_jax differentiates it)
#   -> how often the step runs it
Shapes = dict[tuple[int, int, int, int, int, int, bool], int]


def _ceil_div(v: int, d: int) -> int:
    return -(-v // d)


def step_convolutions(height: int, width: int) -> Shapes:
    """The trainable convolutions of a R50-FPN Mask R-CNN step on (height, width) images.

    The batch is padded to a multiple of 32 like the detector's (800x1333 -> 800x1344).

    ResNet-50 v1.5 bottlenecks (stride on the 3x3), stages layer2-4 (layer1 and the stem frozen),
    the FPN on C2-C5 (lateral 1x1 -> 256, output 3x3), P6 by max-pool, the RPN head's 3x3 on P2-P6
    and its 1x1 objectness (3) + box (12) convs counted as one 15-channel conv. The last key field is
    False for the RPN head's convolutions: maskx_jax's step runs them forward only.
    """
    shapes: Shapes = collections.Counter()
    height, width = 32 * _ceil_div(height, 32), 32 * _ceil_div(width, 32)
    h, w = height // 4, width // 4  # C2 (layer1 output)
    levels = [(h, w)]
    for mid, out, blocks, cin in ((128, 512, 4, 256), (256, 1024, 6, 512), (512, 2048, 3, 1024)):
        shapes[(h, w, cin, mid, 1, 1, True)] += 1  # first block: conv1, strided conv2, strided downsample
        shapes[(h, w, mid, mid, 3, 2, True)] += 1
        shapes[(h, w, cin, out, 1, 2, True)] += 1
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)
        levels.append((h, w))
        shapes[(h, w, mid, out, 1, 1, True)] += 1
        shapes[(h, w, out, mid, 1, 1, True)] += blocks - 1
        shapes[(h, w, mid, mid, 3, 1, True)] += blocks - 1
        shapes[(h, w, mid, out, 1, 1, True)] += blocks - 1
    for (lh, lw), cin in zip(levels, (256, 512, 1024, 2048)):
        shapes[(lh, lw, cin, 256, 1, 1, True)] += 1  # FPN lateral
        shapes[(lh, lw, 256, 256, 3, 1, True)] += 1  # FPN output
    p6 = (_ceil_div(levels[-1][0], 2), _ceil_div(levels[-1][1], 2))
    for lh, lw in levels + [p6]:
        shapes[(lh, lw, 256, 256, 3, 1, False)] += 1  # RPN conv
        shapes[(lh, lw, 256, 15, 1, 1, False)] += 1   # RPN objectness + box deltas
    return dict(shapes)


def _gflop(h: int, w: int, cin: int, cout: int, k: int, s: int, batch: int) -> float:
    """The forward's multiply-adds x 2 (the gradients are as much again each)."""
    return 2 * batch * _ceil_div(h, s) * _ceil_div(w, s) * cin * cout * k * k / 1e9


def time_jax(shape: tuple, batch: int, repeats: int, differentiate: bool) -> float:
    import jax
    import jax.numpy as jnp

    from maskx_jax.conv import conv2d

    h, w, cin, cout, k, s = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.float32(np.sqrt(k * k * cin)))
    g = jnp.asarray(rng.standard_normal((batch, _ceil_div(h, s), _ceil_div(w, s), cout), np.float32))

    @jax.jit
    def fwd_bwd(x, kernel, g):
        y, vjp = jax.vjp(lambda a, b: conv2d(a, b, s, k // 2), x, kernel)
        return (y, *vjp(g))

    fwd = jax.jit(lambda x, kernel, g: conv2d(x, kernel, s, k // 2))
    fn = fwd_bwd if differentiate else fwd
    return timed(lambda: jax.block_until_ready(fn(x, kernel, g)), repeats)["median_s"]


def time_torch(shape: tuple, batch: int, repeats: int) -> float:
    import torch

    h, w, cin, cout, k, s = shape
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, cin, h, w), np.float32)).requires_grad_(True)
    kernel = rng.standard_normal((cout, cin, k, k), np.float32) / np.float32(np.sqrt(k * k * cin))
    kernel = torch.from_numpy(kernel).requires_grad_(True)
    g = torch.from_numpy(rng.standard_normal((batch, cout, _ceil_div(h, s), _ceil_div(w, s)), np.float32))

    def fwd_bwd():
        y = torch.nn.functional.conv2d(x, kernel, stride=s, padding=k // 2)
        torch.autograd.grad(y, (x, kernel), g)

    return timed(fwd_bwd, repeats)["median_s"]


def run(height: int, width: int, batch: int, repeats: int) -> dict:
    rows = []
    by_map_size = sorted(step_convolutions(height, width).items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))
    for key, count in by_map_size:
        shape, differentiate = key[:6], key[6]
        tj, tt = time_jax(shape, batch, repeats, differentiate), time_torch(shape, batch, repeats)
        fwd_gflop = _gflop(*shape, batch)
        rows.append({"shape": list(shape), "jax_differentiates": differentiate, "count": count,
                     "jax_gflop": fwd_gflop * (3 if differentiate else 1), "torch_gflop": 3 * fwd_gflop,
                     "jax_s": tj, "torch_s": tt})
        print(f"  {_label(key)} x{count}: jax {1e3 * tj:.1f} ms, torch {1e3 * tt:.1f} ms", flush=True)
    total = {fw: sum(r["count"] * r[f"{fw}_s"] for r in rows) for fw in ("jax", "torch")}
    gflop = {fw: sum(r["count"] * r[f"{fw}_gflop"] for r in rows) for fw in ("jax", "torch")}
    return {"height": height, "width": width, "batch": batch, "rows": rows, "total_jax_s": total["jax"],
            "total_torch_s": total["torch"], "total_jax_gflop": gflop["jax"], "total_torch_gflop": gflop["torch"]}


def _label(key: tuple) -> str:
    h, w, cin, cout, k, s, differentiated = key
    rpn = "" if differentiated else " (RPN)"
    return f"{k}x{k}{'/' + str(s) if s > 1 else ''} {cin}->{cout} at {h}x{w}{rpn}"


def markdown(result: dict) -> str:
    env = result["environment"]
    out = [f"Machine: {env.get('processor')}, {env.get('cpu_count')} cores; jax {env.get('jax')}, torch "
           f"{env.get('torch')} ({env.get('torch_threads')} threads). Each convolution alone as its framework's "
           "training step runs it: forward + input gradient + filter gradient, but forward only for maskx_jax's "
           "RPN rows; float32, median ms; total = sum over the step's convolutions (count x time). GFLOP/s "
           "counts the direct convolution's multiply-adds (Winograd does fewer).", ""]
    for size in result["sizes"]:
        tj, tt = size["total_jax_s"], size["total_torch_s"]
        out += [f"**{size['height']}x{size['width']}, batch {size['batch']}**: total {tj:.2f} s (maskx_jax, "
                f"{size['total_jax_gflop']:.0f} GFLOP) vs {tt:.2f} s (torchvision, {size['total_torch_gflop']:.0f} "
                f"GFLOP), **{tt / tj:.2f}x**", "",
                "| convolution | count | GFLOP each (jax / torch) | ms (jax / torch) | GFLOP/s (jax / torch) "
                "| speed-up |",
                "|---|---|---|---|---|---|"]
        for r in size["rows"]:
            j, t = r["jax_s"], r["torch_s"]
            key = (*r["shape"], r["jax_differentiates"])
            out.append(f"| {_label(key)} | {r['count']} | {r['jax_gflop']:.1f} / {r['torch_gflop']:.1f} | "
                       f"{1e3 * j:.1f} / {1e3 * t:.1f} | {r['jax_gflop'] / j:.0f} / {r['torch_gflop'] / t:.0f} | "
                       f"{t / j:.2f}x |")
        out.append("")
    return "\n".join(out)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 800x1333, got {text!r}") from None
    if h < 64 or w < 64:
        raise argparse.ArgumentTypeError(f"image sides must be >= 64 (the FPN goes down to 1/64), got {text!r}")
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda t: [_size(v) for v in t.split(",")], default=[(800, 1333), (512, 512)],
                   help="comma-separated HEIGHTxWIDTH (default 800x1333,512x512)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    import maskx_jax  # noqa: F401  (sets the XLA:CPU flag before JAX starts its backend)

    sizes = []
    for h, w in args.sizes:
        print(f"{h}x{w}, batch {args.batch}:", flush=True)
        sizes.append(run(h, w, args.batch, args.repeats))
    result = {"environment": environment(), "repeats": args.repeats, "sizes": sizes}
    write_results(args.out, "conv_layers", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
