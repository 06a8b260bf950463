"""docs/configuration.md documents every config key; the README shows both commands and its results come from
the committed files."""
import os

import pytest

from maskx_jax.config import base_config
from tests.resources import ROOT

README = os.path.join(ROOT, "README.md")


def _keys(cfg, prefix=""):
    for k, v in cfg.items():
        if hasattr(v, "items"):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_config_key_is_documented():
    reference = os.path.join(os.path.dirname(README), "docs", "configuration.md")
    with open(reference) as f:
        text = f.read()
    missing = [k for k in _keys(base_config()) if f"| `{k}` |" not in text]
    assert not missing, f"config keys missing from docs/configuration.md: {missing}"
    with open(README) as f:
        assert "(docs/configuration.md)" in f.read(), "the README should link the configuration reference"


def test_readme_shows_the_two_commands():
    text = open(README).read()
    assert "make demo" in text and "make test" in text


def test_readme_transfer_results_are_the_committed_files():
    """The README's tables of the transfer experiment are regenerated from the committed results files
    (``python -m maskx_jax.transfer_report FILE --readme README.md --marker NAME``), so they cannot drift."""
    import json

    from maskx_jax import transfer_report

    text = open(README).read()
    results_dir = os.path.join(os.path.dirname(README), "benchmarks", "results")
    shown = 0
    for marker, name in (("shapes10", "transfer.json"), ("shapes24", "transfer_shapes24.json")):
        path = os.path.join(results_dir, name)
        has_block = f"<!-- transfer:{marker} -->" in text
        assert has_block == os.path.isfile(path), (marker, "README block and results file must come together")
        if has_block:
            results = json.load(open(path))
            assert transfer_report.readme_block(results, marker) in text, f"README {marker} block is stale"
            shown += 1
    assert shown >= 1  # the primary result is always shown


def test_readme_exact_canvas_cost_is_the_committed_measurement():
    """The README's cost of ``model.exact_canvas`` is the one in benchmarks/results/exact_canvas.json."""
    import json
    import statistics

    with open(os.path.join(os.path.dirname(README), "benchmarks", "results", "exact_canvas.json")) as f:
        rows = [r for r in json.load(f)["rows"] if "error" not in r and (r["height"], r["width"]) == (512, 512)]

    def cost(case: str) -> int:
        speed = {exact: statistics.median(r["images_per_s"] for r in rows if r["case"] == case
                                          and r["exact_canvas"] == exact) for exact in (True, False)}
        return round(100 * (1 - speed[True] / speed[False]))

    claim = f"{cost('inference')}% of inference and {cost('train')}% of a training step at 512x512"
    with open(README) as f:
        text = " ".join(f.read().split())
    assert claim in text, f"README should say: {claim}"


def test_relative_links_in_the_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file of the checkout (moved files break links)."""
    import glob
    import re

    root = os.path.dirname(os.path.abspath(README))
    broken = []
    for doc in [os.path.join(root, "README.md")] + glob.glob(os.path.join(root, "docs", "*.md")):
        with open(doc) as f:
            for target in re.findall(r"\]\(([^)\s]+)\)", f.read()):
                path = target.split("#")[0]
                if not path or re.match(r"[a-z]+:", path):
                    continue
                if not os.path.exists(os.path.join(os.path.dirname(doc), path)):
                    broken.append(f"{os.path.relpath(doc, root)}: {target}")
    assert not broken, broken


@pytest.mark.parametrize("name", ["pod_memory", "pod_memory_fsdp"])
def test_scaling_doc_quotes_the_committed_pod_measurements(name):
    """docs/scaling.md's per-device tables (1024x1024 R-50 / R-101; train.shard_params=mask_mlp) are
    benchmarks/results/pod_memory.md and pod_memory_fsdp.md."""
    with open(os.path.join(ROOT, "benchmarks", "results", f"{name}.md")) as f:
        table = [line for line in f.read().strip().splitlines() if line.startswith("|")]
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        text = f.read()
    assert table and all(line in text for line in table), f"docs/scaling.md is stale ({name}.md)"


def test_train_memory_figures_are_the_committed_measurement():
    """docs/performance.md's train-memory table is benchmarks/results/train_memory.md, and the README's peak-memory
    ratios are those of train_memory.json (the default step and Mask^X over torchvision's, same run)."""
    import json

    results = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(results, "train_memory.md")) as f:
        table = [line for line in f.read().splitlines() if line.startswith("|")]
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        doc = f.read()
    assert table and all(line in doc for line in table), "docs/performance.md's train-memory table is stale"
    with open(os.path.join(results, "train_memory.json")) as f:
        rows = [r for r in json.load(f)["rows"] if "error" not in r]
    peak = {(r["conv_impl"], r["mask_mode"]): r["rss_after_steps_mib"] for r in rows if not r.get("all_slots")}
    torch = peak[("torch", "class_specific")]
    claim = (f"**{peak[('auto', 'class_specific')] / torch:.2f}x** torchvision's "
             f"({peak[('auto', 'transfer')] / torch:.2f}x with Mask^X's MLP fusion")
    with open(README) as f:
        assert claim in " ".join(f.read().split()), f"README should say: {claim}"


def test_readme_speed_rows_are_the_committed_full_run():
    """The README's speed-ups are ``benchmarks/report.readme_rows`` of the committed benchmarks/results/bench.json."""
    import json

    from benchmarks.report import readme_rows

    with open(os.path.join(ROOT, "benchmarks", "results", "bench.json")) as f:
        rows = readme_rows(json.load(f))
    with open(README) as f:
        text = f.read()
    missing = [row for row in rows if row not in text]
    assert not missing, f"README's performance table should read: {missing}"
