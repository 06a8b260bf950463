"""Summaries of the transfer experiment's results file: statistics, a markdown table, a bar chart.

The results file (``benchmarks/results/transfer.json``, written by :mod:`maskx_jax.transfer_experiment`)
holds one value per seed, in seed order, for every run; everything here is derived from it, so the
README's table can be regenerated from the committed file and checked against it (tests/docs/test_docs.py).

Statistics, over seeds (n = number of seeds with a value in every arm compared):
  * mean and sample standard deviation (ddof 1) of each arm;
  * the paired difference to ``class_agnostic``, ``arm - class_agnostic`` seed by seed (both arms share that
    seed's detector), its mean and standard error (std / sqrt(n));
  * the share of the oracle gap closed on set B, ``(arm - class_agnostic) / (oracle - class_agnostic)``
    of the means.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

BASELINE = "class_agnostic"
CEILING = "oracle"
# Arms in table / chart order, with the words the table uses.
ARM_TITLES = {
    "class_agnostic": "class-agnostic mask head (baseline)",
    "transfer": "Mask^X: tau (cls+box, 2-layer), no MLP",
    "transfer_mlp": "Mask^X: tau (cls+box, 2-layer) + MLP fusion",
    "random_embedding": "control: tau on fixed random class vectors",
    "oracle": "oracle: class-specific head, masks of all classes (ceiling)",
}
METRICS = ("set_b_mask_ap", "set_a_mask_ap", "set_b_box_ap")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof 1; nan for a single value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else float("nan")


def paired(arm: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the seed-by-seed difference ``arm - base`` (SE nan for one seed)."""
    d = np.asarray(arm, np.float64) - np.asarray(base, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), se


def gap_share(arm: Sequence[float], base: Sequence[float], ceiling: Sequence[float]) -> float:
    """(mean arm - mean base) / (mean ceiling - mean base); nan when the ceiling is not above the base."""
    gap = float(np.mean(ceiling) - np.mean(base))
    return float((np.mean(arm) - np.mean(base)) / gap) if gap > 0 else float("nan")


def summarize(results: Mapping) -> dict:
    """Per arm of ``results["arms"]``: mean/std of every metric, and on set-B mask AP the paired difference to
    the baseline (mean, SE, mean/SE) and the oracle-gap share. Also ``headroom``: oracle - baseline, paired."""
    arms = results["arms"]
    out: dict = {"arms": {}}
    base = arms.get(BASELINE, {}).get("set_b_mask_ap")
    ceiling = arms.get(CEILING, {}).get("set_b_mask_ap")
    for name, values in arms.items():
        row = {}
        for metric in METRICS:
            if values.get(metric):
                row[metric] = dict(zip(("mean", "std"), mean_std(values[metric])))
        ours = values.get("set_b_mask_ap")
        if ours and base and len(ours) == len(base) and name != BASELINE:
            diff, se = paired(ours, base)
            row["vs_baseline"] = {"mean": diff, "se": se, "t": diff / se if se and se > 0 else float("nan")}
            if ceiling and len(ceiling) == len(base) and name != CEILING:
                row["gap_share"] = gap_share(ours, base, ceiling)
        out["arms"][name] = row
    if base and ceiling and len(base) == len(ceiling):
        diff, se = paired(ceiling, base)
        out["headroom"] = {"mean": diff, "se": se, "t": diff / se if se and se > 0 else float("nan")}
    return out


# The target for Mask^X (transfer_mlp) against the class-agnostic head, on set-B mask AP.
TARGET_T = 2.0  # the paired difference, in standard errors
TARGET_SHARE = 0.30  # the share of the oracle gap closed (the paper closes roughly a third on COCO)


def verdict(results: Mapping, arm: str = "transfer_mlp") -> str:
    """One sentence: does ``arm`` beat the class-agnostic head on set B by the target (> 2 SE of the paired
    difference and >= 30% of the oracle gap)? Numbers from :func:`summarize`."""
    row = summarize(results)["arms"].get(arm) or {}
    diff, share = row.get("vs_baseline"), row.get("gap_share")
    if not diff or share is None:
        return f"{arm}: not enough seeds or arms for a verdict."
    t = diff["t"]
    reached = math.isfinite(t) and t > TARGET_T and share >= TARGET_SHARE
    return (f"{ARM_TITLES.get(arm, arm)} vs the class-agnostic head, set-B mask AP: {diff['mean']:+.1f} ± "
            f"{diff['se']:.1f} AP ({t:.1f} standard errors of the paired difference), {100 * share:.0f}% of the "
            f"oracle gap closed: the target (> {TARGET_T:g} standard errors and >= {100 * TARGET_SHARE:.0f}%) is "
            f"{'reached' if reached else 'not reached'}.")


def _pm(stat: Mapping | None, digits: int = 1) -> str:
    if not stat:
        return "n/a"
    if not math.isfinite(stat["std"]):  # one seed
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _diff(stat: Mapping | None) -> str:
    if not stat:
        return ""
    se = stat["se"]
    return f"{stat['mean']:+.1f} ± {se:.1f}" if math.isfinite(se) else f"{stat['mean']:+.1f}"


def _seconds(values: Sequence[float] | None) -> str:
    vals = [v for v in (values or []) if v is not None]
    return f"{np.mean(vals):.2f}" if vals else "n/a"


def markdown(results: Mapping) -> str:
    """The tables the README shows: stage-wise arms, then end-to-end runs (AP in %, mean ± std over seeds)."""
    s = summarize(results)
    n = len(results.get("seeds", []))
    lines = [
        f"Stage-wise: one box detector per seed, frozen; mask branches trained on it ({n} seed{'s' * (n != 1)}, "
        f"mean ± std; Δ = paired difference to the class-agnostic head ± its standard error):",
        "",
        "| arm | mask AP set B | Δ set B vs class-agnostic | share of oracle gap | mask AP set A | box AP set B "
        "| s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in [a for a in ARM_TITLES if a in results["arms"]] + [a for a in results["arms"] if a not in ARM_TITLES]:
        row = s["arms"][name]
        share = row.get("gap_share")
        lines.append(
            f"| {ARM_TITLES.get(name, name)} | {_pm(row.get('set_b_mask_ap'))} | {_diff(row.get('vs_baseline'))} | "
            f"{'' if share is None or not math.isfinite(share) else f'{100 * share:.0f}%'} | "
            f"{_pm(row.get('set_a_mask_ap'))} | {_pm(row.get('set_b_box_ap'))} | "
            f"{_seconds(results['arms'][name].get('seconds_per_step'))} |")
    det = results.get("detector") or {}
    if det:
        lines += ["", f"The detectors (stage 1, boxes of all classes): box AP set B {_pm(_stat(det, 'set_b_box_ap'))}, "
                  f"set A {_pm(_stat(det, 'set_a_box_ap'))}; {_seconds(det.get('seconds_per_step'))} s/step."]
    e2e = results.get("end_to_end") or {}
    if e2e:
        lines += ["", "End to end (the whole model from scratch, same seeds, the detector's schedule):", "",
                  "| arm | mask AP set B | Δ set B vs class-agnostic | mask AP set A | box AP set B | s/step |",
                  "|---|---|---|---|---|---|"]
        base = (e2e.get(BASELINE) or {}).get("set_b_mask_ap")
        for name, values in e2e.items():
            diff = ""
            if name != BASELINE and base and len(values.get("set_b_mask_ap", [])) == len(base):
                m, se = paired(values["set_b_mask_ap"], base)
                diff = _diff({"mean": m, "se": se})
            lines.append(f"| {ARM_TITLES.get(name, name)} | {_pm(_stat(values, 'set_b_mask_ap'))} | {diff} | "
                         f"{_pm(_stat(values, 'set_a_mask_ap'))} | {_pm(_stat(values, 'set_b_box_ap'))} | "
                         f"{_seconds(values.get('seconds_per_step'))} |")
    if len(results.get("seeds", [])) > 1 and "transfer_mlp" in results["arms"]:
        lines += ["", "**" + verdict(results) + "**"]
    head = s.get("headroom")
    if head:
        lines += ["", f"Headroom (oracle - class-agnostic, set-B mask AP, paired): {_diff(head)} AP "
                  f"({head['t']:.1f} standard errors)." if math.isfinite(head["t"]) else
                  f"Headroom (oracle - class-agnostic, set-B mask AP): {head['mean']:+.1f} AP (one seed)."]
    return "\n".join(lines) + "\n"


def _stat(values: Mapping, metric: str) -> dict | None:
    v = values.get(metric)
    return dict(zip(("mean", "std"), mean_std(v))) if v else None


def bar_chart(results: Mapping, path: str, *, width: int = 760, height: int = 420) -> None:
    """PNG bar chart of set-B mask AP per arm (mean over seeds, error bar = std; dots = single seeds),
    stage-wise arms first, then the end-to-end runs in a second colour."""
    from PIL import Image, ImageDraw

    bars: list[tuple[str, list[float], tuple[int, int, int]]] = []
    for name in [a for a in ARM_TITLES if a in results["arms"]]:
        bars.append((name.replace("_", " "), list(results["arms"][name]["set_b_mask_ap"]), (70, 110, 180)))
    for name, values in (results.get("end_to_end") or {}).items():
        bars.append((f"e2e {name.replace('_', ' ')}", list(values["set_b_mask_ap"]), (200, 120, 60)))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 40, 90
    top_value = max([max(v) for _, v, _ in bars if v] + [1.0]) * 1.15
    scale = (height - top - bottom) / top_value
    y0 = height - bottom
    dataset = str(results.get("dataset", "")).split(" (")[0] or "the data"
    draw.text((left, 12), f"set-B mask AP (%), {dataset}: mean over seeds, bar = std, dots = seeds", fill="black")
    draw.line([(left, top), (left, y0), (width - right, y0)], fill="black")
    step = 10 ** math.floor(math.log10(top_value)) if top_value > 0 else 1
    if top_value / step < 4:
        step /= 2
    tick = 0.0
    while tick <= top_value:
        y = y0 - tick * scale
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.line([(left + 1, y), (width - right, y)], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{tick:g}", fill="black")
        tick += step
    slot = (width - left - right) / max(len(bars), 1)
    for i, (label, values, colour) in enumerate(bars):
        if not values:
            continue
        mean, std = mean_std(values)
        std = std if math.isfinite(std) else 0.0
        cx = left + slot * (i + 0.5)
        half = slot * 0.3
        if mean > 0:
            draw.rectangle([cx - half, y0 - mean * scale, cx + half, y0], fill=colour)
        draw.line([(cx, y0 - (mean - std) * scale), (cx, y0 - (mean + std) * scale)], fill="black", width=2)
        for y in (mean - std, mean + std):
            draw.line([(cx - 6, y0 - y * scale), (cx + 6, y0 - y * scale)], fill="black", width=2)
        for v in values:
            draw.ellipse([cx + half * 0.5 - 2, y0 - v * scale - 2, cx + half * 0.5 + 2, y0 - v * scale + 2],
                         fill="black")
        draw.text((cx - half, y0 - mean * scale - 14), f"{mean:.1f}", fill="black")
        for j, part in enumerate(_wrap(label, 12)):
            draw.text((cx - slot * 0.45, y0 + 6 + 12 * j), part, fill="black")
    img.save(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def readme_block(results: Mapping, marker: str) -> str:
    """The README's block for one results file: ``<!-- transfer:MARKER -->`` ... ``<!-- /transfer:MARKER -->``."""
    return f"<!-- transfer:{marker} -->\n{markdown(results)}<!-- /transfer:{marker} -->"


def replace_block(text: str, results: Mapping, marker: str) -> str:
    """``text`` with its ``marker`` block regenerated from ``results`` (ValueError when it has none)."""
    start, end = f"<!-- transfer:{marker} -->", f"<!-- /transfer:{marker} -->"
    if start not in text or end not in text:
        raise ValueError(f"no {start} ... {end} block to replace")
    a, b = text.index(start), text.index(end) + len(end)
    return text[:a] + readme_block(results, marker) + text[b:]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m maskx_jax.transfer_report RESULTS.json [--readme README.md --marker NAME] [--chart PNG]``:
    print the tables, regenerate the README block and the chart from a committed results file."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m maskx_jax.transfer_report", description=main.__doc__.split("\n")[0])
    p.add_argument("results")
    p.add_argument("--readme", default="")
    p.add_argument("--marker", default="")
    p.add_argument("--chart", default="")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    print(markdown(results))
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_block(text, results, args.marker))
    if args.chart:
        bar_chart(results, args.chart)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
