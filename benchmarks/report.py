"""Markdown tables from ``bench.json`` (``python benchmarks/report.py [bench.json]`` re-renders one).

Speed-ups are torchvision time / maskx_jax time measured in the same run (> 1: maskx_jax faster).
Utilisation = XLA's FLOP count / run time / the machine's measured float32 matmul peak. torchvision's
FLOPs come from ``torch.utils.flop_counter`` (convolutions and matrix products only), XLA's count
includes element-wise work: compare them as orders of magnitude.
"""
from __future__ import annotations

import json
import sys
from typing import Any

_MATCH = {"roi_align": ("out",), "inference": ("height", "width", "batch", "score_thresh"),
          "train": ("height", "width", "batch")}  # every maskx_jax variant vs torchvision's one Mask R-CNN


def _pairs(rows: list[dict], case: str):
    """(jax row, torch row or None) per configuration, in plan order."""
    keys = _MATCH[case]
    found = [r for r in rows if r.get("case") == case]
    for r in found:
        if r.get("framework") != "jax":
            continue
        twin = next((t for t in found if t.get("framework") == "torch"
                     and all(t.get(k, "class_specific") == r.get(k, "class_specific") for k in keys)), None)
        yield r, twin


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _err(r: dict | None) -> str | None:
    return None if r is None or "error" not in r else "error: " + r["error"].splitlines()[-1][:80]


def _median(r: dict | None, key: str) -> float | None:
    return None if r is None or key not in r else r[key]["median_s"]


def _ratio(torch_s: float | None, jax_s: float | None) -> str:
    return "n/a" if not torch_s or not jax_s else f"**{torch_s / jax_s:.2f}x**"


def _switched(r: dict) -> bool:
    """A train row whose mask-branch work XLA's cost analysis cannot count: a lax.switch over slot buckets
    (it adds up every branch) or the chunk loop (``mask_chunk_slots`` > 0: which chunks run is decided inside the
    step, the loop body counted once). Rows from before the chunk loop have no ``mask_chunk_slots``."""
    return r.get("mask_chunk_slots", 0) > 0 or any(
        b < r.get("max_mask_rois", 128) for b in r.get("mask_slot_buckets", []))


def _util(r: dict, peak: float | None, per: float) -> str:
    if not peak or r.get("xla", {}).get("flops") is None or "run" not in r or _switched(r):
        return "n/a"
    return f"{100 * r['xla']['flops'] / r['run']['median_s'] / 1e9 / peak:.0f}%"


def _gflop(j: dict, t: dict | None) -> str:
    flops = j.get("xla", {}).get("flops")
    ours = "n/a" if _switched(j) or flops is None else f"{flops / 1e9 / j['batch']:.0f}"
    theirs = "n/a" if t is None or "torch_flops" not in t else f"{t['torch_flops'] / 1e9 / t['batch']:.0f}"
    return f"{ours} / {theirs}"


def _mask_work(rows: list[dict]) -> str:
    """How the (default) train rows' mask head picks its slots, e.g. 'on chunks of 8 slots per image, as many as
    hold every image's supervised positives' or, before the chunk loop, 'on the smallest of 8/16/32/64/128 slots
    per image that holds every image's supervised positives'."""
    for r in rows:
        if r.get("case") == "train" and r.get("framework") == "jax" and _switched(r):
            if r.get("mask_chunk_slots", 0) > 0:
                return (f"on chunks of {r['mask_chunk_slots']} slots per image, as many as hold every image's "
                        "supervised positives")
            m = r.get("max_mask_rois", 128)
            ladder = "/".join(str(b) for b in sorted({int(b) for b in r["mask_slot_buckets"] if b < m} | {m}))
            return f"on the smallest of {ladder} slots per image that holds every image's supervised positives"
    return "on all 128 slots"


def markdown(result: dict) -> str:
    rows = result["rows"]
    env = result.get("environment", {})
    peak_row = next((r for r in rows if r.get("case") == "matmul_peak" and "gflops" in r), None)
    peak = peak_row["gflops"] if peak_row else None
    out = [f"Machine: {env.get('processor', '?')}, {env.get('cpu_count', '?')} cores; jax {env.get('jax', '?')} "
           f"({env.get('backend', '?')}), torch {env.get('torch', '?')} / torchvision {env.get('torchvision', '?')} "
           f"({env.get('torch_threads', '?')} threads). Medians after warm-up; speed-up = torchvision time / "
           f"maskx_jax time in the same run. float32 matmul peak (JAX, measured): {_f(peak, '{:.0f}')} GFLOP/s."]
    kept = sorted({(r["case"], r["measured"]) for r in rows if "measured" in r})
    if kept:
        out[-1] += " Kept from an earlier run (`--only` re-measured the rest): " + ", ".join(
            f"{case} ({date})" for case, date in kept) + "."
    out.append("")

    out += ["**Kernels** (float32, one op at training-step sizes, GFLOP/s; the gradients without the forward):", "",
            "| op | input | what | forward (jax / torch) | input grad (jax / torch) | filter grad (jax / torch) |",
            "|---|---|---|---|---|---|"]
    found = {r.get("framework"): r for r in rows if r.get("case") == "kernels"}
    j, t = found.get("jax"), found.get("torch")
    if _err(j) or _err(t):
        out.append(f"| {_err(j) or _err(t)} | | | | | |")
    elif j and t:
        for kj, kt in zip(j["kernels"], t["kernels"]):
            rates = [f"{kj['gflop'] / kj[m]['median_s']:.0f} / {kt['gflop'] / kt[m]['median_s']:.0f}"
                     for m in ("forward", "input_grad", "filter_grad")]
            shape = "x".join(str(d) for d in kj["shape"] if kj["name"] != "matmul" or d != 1)
            stride = f", stride {kj['stride']}" if kj.get("stride", 1) > 1 else ""
            op = kj["name"] if kj["name"] == "matmul" else f"{kj['name']} -> {kj['out']}{stride}"
            out.append(f"| {op} | {shape} | {kj['what']} | " + " | ".join(rates) + " |")
    out.append("")

    out += ["**FPN RoIAlign** (P2-P5 of 800x1344, batch 2, 512 RoIs/image, 256 channels, sampling 2):", "",
            "| output | forward ms (jax / torch) | speed-up | forward+backward ms (jax / torch) | speed-up | "
            "jax compile s | peak RSS MiB (jax / torch) |", "|---|---|---|---|---|---|---|"]
    for j, t in _pairs(rows, "roi_align"):
        if _err(j) or _err(t):
            out.append(f"| {j['out']}x{j['out']} | {_err(j) or _err(t)} | | | | | |")
            continue
        fj, ft, bj, bt = (_median(j, "forward"), _median(t, "forward"), _median(j, "forward_backward"),
                          _median(t, "forward_backward"))
        out.append(f"| {j['out']}x{j['out']} | {1e3 * fj:.0f} / {1e3 * ft:.0f} | {_ratio(ft, fj)} | "
                   f"{1e3 * bj:.0f} / {1e3 * bt:.0f} | {_ratio(bt, bj)} | {j['compile_s']:.1f} | "
                   f"{j['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} |")

    out += ["", "**Inference** (Mask R-CNN R50-FPN, COCO head, uint8 images to pasted masks; box score threshold "
            "0.05 (torchvision's default): ~100 detections/image, higher: fewer, and both run the mask head on "
            "fewer boxes; maskx_jax on the smallest of 8/16/32/64/100 rows holding every image's detections, "
            "picked inside predict. GFLOP and utilisation: rows where all 100 detections are kept):",
            "", "| image | batch | score threshold | detections/image (jax / torch) | images/s (jax / torch) "
            "| speed-up | jax compile s | peak RSS MiB (jax / torch) | GFLOP/image (jax XLA / torch counter) "
            "| jax utilisation |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for j, t in _pairs(rows, "inference"):
        size = (f"{j['height']}x{j['width']} | {j['batch']} | {j.get('score_thresh', 0.05):g}"
                + (" (jax: exact_canvas off)" if j.get("exact_canvas") is False else ""))
        if _err(j) or _err(t):
            out.append(f"| {size} | {_err(j) or _err(t)} | | | | | | |")
            continue
        dets = f"{j.get('detections_per_image', float('nan')):.0f} / {t.get('detections_per_image', float('nan')):.0f}"
        out.append(f"| {size} | {dets} | {j['images_per_s']:.3f} / {t['images_per_s']:.3f} | "
                   f"{_ratio(_median(t, 'run'), _median(j, 'run'))} | {j['compile_s']:.0f} | "
                   f"{j['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} | "
                   f"{_gflop(j, t)} | {_util(j, peak, j['batch'])} |")

    out += ["", "**Training step** (Mask R-CNN R50-FPN, frozen BN, stem + layer1 frozen, SGD, batch 2, "
            f"8 instances/image, 512 RoIs/image; maskx_jax runs the mask head {_mask_work(rows)} "
            "(exact; decided inside the step), torchvision on its positives; "
            "'all 128 slots' = the static mask branch; 'transfer' = Mask^X with tau + MLP fusion. XLA's cost "
            "analysis counts a loop's body once and adds up every branch of a switch, so GFLOP and utilisation "
            "are given for the static rows only):", "",
            "| image | mask head | images/s (jax / torch) | speed-up | jax compile s | peak RSS MiB (jax / torch) | "
            "GFLOP/image (jax XLA / torch counter) | torch mask RoIs/image | jax utilisation |",
            "|---|---|---|---|---|---|---|---|---|"]
    for j, t in _pairs(rows, "train"):
        size = f"{j['height']}x{j['width']}"
        mode = j.get("mask_mode", "class_specific") + (
            f", {j['max_mask_rois']} mask slots" if j.get("max_mask_rois", 128) != 128 else "") + (
            f", all {j.get('max_mask_rois', 128)} slots"
            if j.get("mask_slot_buckets") == [] and not j.get("mask_chunk_slots") else "") + (
            ", exact_canvas off" if j.get("exact_canvas") is False else "")
        if _err(j) or (t is not None and _err(t)):
            out.append(f"| {size} | {mode} | {_err(j) or _err(t)} | | | | | | |")
            continue
        tv = "n/a" if t is None else f"{t['images_per_s']:.3f}"
        rss = "n/a" if t is None else f"{t['peak_rss_mib']:.0f}"
        out.append(f"| {size} | {mode} | {j['images_per_s']:.3f} / {tv} | "
                   f"{_ratio(_median(t, 'run'), _median(j, 'run'))} | {j['compile_s']:.0f} | "
                   f"{j['peak_rss_mib']:.0f} / {rss} | {_gflop(j, t)} | "
                   f"{'n/a' if t is None else _f(t.get('mask_rois_per_image'), '{:.0f}')} | "
                   f"{_util(j, peak, j['batch'])} |")
    return "\n".join(out) + "\n"


def _default_variant(r: dict) -> bool:
    """A maskx_jax row at the library's defaults (slot buckets, all 128 mask slots, exact canvas)."""
    return (r.get("exact_canvas") is not False and r.get("max_mask_rois", 128) == 128
            and r.get("mask_slot_buckets", [8, 16, 32, 64]) == [8, 16, 32, 64])


def _range(ratios: list[float]) -> str:
    lo, hi = min(ratios), max(ratios)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}x-{hi:.2f}x"


def readme_rows(result: dict) -> list[str]:
    """The README's speed rows (maskx_jax's speed-up over torchvision) from a full run's ``bench.json``:
    the training step per size (class-specific, and Mask^X with MLP fusion against torchvision's one model),
    inference at torchvision's score threshold (batch 1 and 2, every size: the range), RoIAlign (both outputs).

    Raises KeyError when a needed row is missing or failed (a quick or partial run)."""
    ok = [r for r in result["rows"] if "error" not in r]
    speed = {case: [(j, t) for j, t in _pairs(ok, case) if t is not None and _default_variant(j)]
             for case in ("train", "inference", "roi_align")}
    sizes = sorted({(j["height"], j["width"]) for j, _ in speed["train"]}, reverse=True)

    def train(size: tuple, mode: str) -> str:
        pairs = [(j, t) for j, t in speed["train"] if (j["height"], j["width"]) == size
                 and j.get("mask_mode", "class_specific") == mode]
        if not pairs:
            raise KeyError(f"no {mode} training row at {size}")
        j, t = pairs[0]
        return f"{t['run']['median_s'] / j['run']['median_s']:.2f}x"

    names = " / ".join(f"{h}x{w}" for h, w in sizes)
    specific = " / ".join(f"**{train(s, 'class_specific')}**" for s in sizes)
    maskx = " / ".join(train(s, "transfer") for s in sizes)
    inference = [t["run"]["median_s"] / j["run"]["median_s"] for j, t in speed["inference"]
                 if j["score_thresh"] == 0.05]
    roi = {m: [t[m]["median_s"] / j[m]["median_s"] for j, t in speed["roi_align"]]
           for m in ("forward", "forward_backward")}
    if not inference or not roi["forward"]:
        raise KeyError("no inference or RoIAlign pair")
    return [f"| training step, {names}, batch 2 | {specific} the images/s (Mask^X with MLP fusion: {maskx}) |",
            "| inference, uint8 images to pasted masks, ~100 detections/image | "
            f"**{_range(inference)}** the images/s |",
            f"| FPN RoIAlign forward / forward+backward | **{_range(roi['forward'])}** / "
            f"**{_range(roi['forward_backward'])}** |"]


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bench.json"
    with open(path) as f:
        result = json.load(f)
    print(markdown(result))
    if "--readme" in sys.argv:
        print("\n".join(readme_rows(result)))
