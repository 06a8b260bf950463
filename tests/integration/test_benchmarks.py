"""The benchmark drivers run end to end at toy size (their real runs take 10-30 min: ``make bench``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.resources import ROOT


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_bench_driver_measures_both_frameworks_and_writes_tables(tmp_path):
    proc = _run(["benchmarks/run.py", "--smoke"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["case"], r.get("framework")): r for r in result["rows"]}
    assert set(rows) == {("matmul_peak", None), ("kernels", "jax"), ("kernels", "torch"), ("roi_align", "jax"),
                         ("roi_align", "torch")}
    assert rows[("matmul_peak", None)]["gflops"] > 0
    for fw in ("jax", "torch"):
        r = rows[("roi_align", fw)]
        assert r["forward"]["median_s"] > 0 and r["forward_backward"]["median_s"] > 0 and r["peak_rss_mib"] > 0
        ops = rows[("kernels", fw)]["kernels"]
        assert [(k["name"], k["stride"]) for k in ops] == [("conv3x3", 1), ("conv3x3", 2), ("conv1x1", 1),
                                                           ("matmul", 1)]
        assert all(k[m]["median_s"] > 0 for k in ops for m in ("forward", "input_grad", "filter_grad"))
    assert rows[("roi_align", "jax")]["xla"]["flops"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| 7x7 |" in table and "| conv3x3 -> 8 | 2x6x6x8 |" in table and "GFLOP/s" in table
    assert "| conv3x3 -> 8, stride 2 |" in table
    assert "error" not in table and "Kept from an earlier run" not in table

    # --only re-measures one case and keeps the other cases' rows (marked with their date) and tables.
    proc = _run(["benchmarks/run.py", "--smoke", "--only", "matmul_peak"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert sorted((r["case"], r.get("framework"), "measured" in r) for r in again) == [
        ("kernels", "jax", True), ("kernels", "torch", True), ("matmul_peak", None, False),
        ("roi_align", "jax", True), ("roi_align", "torch", True)]
    table = (tmp_path / "bench.md").read_text()
    assert "| 7x7 |" in table and "Kept from an earlier run" in table and "kernels (" in table


def test_pod_memory_reports_per_device_figures_from_xla(tmp_path):
    proc = _run(["benchmarks/pod_memory.py", "--devices", "2", "--per-device-batch", "1", "--size", "64",
                 "--depths", "18", "--dtypes", "bfloat16", "--classes", "3", "--shard-params", "none,mask_mlp",
                 # No slot buckets (training's mask head runs in chunks whatever they are; inference's are unused).
                 "--mask-slot-buckets", ""], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "pod_memory.json").read_text())
    assert [(r["dtype"], r["devices"], r["global_batch"], r["shard_params"]) for r in rows] == [
        ("bfloat16", 2, 2, ""), ("bfloat16", 2, 2, "mask_mlp")]
    # the MLP-fusion FC (256*28*28 x 784, float32) and its momentum, ~1.2 GiB replicated: half of it per device
    # when split over the 2 devices
    saved = rows[0]["argument_gib"] - rows[1]["argument_gib"]
    assert 0.5 < saved < 0.65, saved
    for r in rows:
        assert r["mask_slot_buckets"] == [] and r["mask_chunk_slots"] == 8
        assert r["argument_gib"] > 0 and r["temp_gib"] > 0
        assert r["total_gib"] >= r["argument_gib"] + r["temp_gib"] - 1e-9
    assert "R-18-FPN" in (tmp_path / "pod_memory.md").read_text()


def test_conv_layers_lists_the_steps_convolutions_and_times_both_frameworks(tmp_path):
    from benchmarks.conv_layers import step_convolutions

    shapes = step_convolutions(800, 1333)
    # layer2-4: 13 + 19 + 10 convolutions (3 per bottleneck + a downsample each), FPN 4 lateral + 4 output,
    # RPN 3x3 and 1x1 on P2-P6
    assert sum(shapes.values()) == 42 + 8 + 10
    assert sum(n for (h, w, ci, co, k, s, _), n in shapes.items() if s == 2) == 6
    # at P2 of the 800x1344 batch: the FPN output conv (differentiated) and the RPN conv (forward only)
    assert shapes[(200, 336, 256, 256, 3, 1, True)] == shapes[(200, 336, 256, 256, 3, 1, False)] == 1
    assert sum(n for key, n in shapes.items() if not key[6]) == 10  # the RPN head's, P2-P6
    proc = _run(["benchmarks/conv_layers.py", "--sizes", "64x64", "--repeats", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "conv_layers.json").read_text())
    (size,) = result["sizes"]
    assert sum(r["count"] for r in size["rows"]) == 60
    assert all(r["jax_s"] > 0 and r["torch_s"] > 0 for r in size["rows"])
    assert size["total_jax_s"] == pytest.approx(sum(r["count"] * r["jax_s"] for r in size["rows"]))
    table = (tmp_path / "conv_layers.md").read_text()
    assert "**64x64, batch 2**" in table and "| 3x3/2 128->128 at 16x16 | 1 |" in table
    assert "| 3x3 256->256 at 16x16 (RPN) | 1 |" in table


def test_input_pipeline_benchmark_writes_its_rows(tmp_path):
    """One minicoco batch with one worker: the row has the fields issue 20's table needs."""
    from tests import resources

    resources.minicoco()  # the shared photos (a clear skip, or a failure under CI, when absent)
    proc = _run(["benchmarks/input_pipeline.py", "--datasets", "minicoco", "--workers", "1", "--batches", "1"],
                tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "input_pipeline.json").read_text())["rows"]
    assert (row["dataset"], row["workers"]) == ("minicoco", 1)
    assert row["images_per_s"] > 0 and row["cpu_s_per_image"] > 0 and row["rss_mib"] > 100
    assert "| minicoco | 1 |" in (tmp_path / "input_pipeline.md").read_text()


def test_train_memory_benchmark_splits_the_peak(tmp_path):
    """One small case: the compile's and the step's peaks are recorded with XLA's buffer sizes."""
    # (conv_impl=auto: XLA:CPU's own convolution gradients inside the mask branch's switch take minutes here)
    # R-18 with narrow heads (--toy): the driver is the same at any size, and compiling and running the paper's
    # heads was most of this test's time
    proc = _run(["benchmarks/train_memory.py", "--size", "64", "--depth", "18", "--toy", "--cases",
                 "auto:class_specific"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "train_memory.json").read_text())["rows"]
    assert (row["conv_impl"], row["mask_mode"], row["size"], row["depth"]) == ("auto", "class_specific", 64, 18)
    assert 0 < row["rss_before_compile_mib"] <= row["rss_after_compile_mib"] <= row["rss_after_steps_mib"]
    assert 0 < row["rss_released_mib"] <= row["rss_after_compile_mib"] + 1  # resident after the trim
    assert row["temp_mib"] > 0 and row["argument_mib"] > 50  # R18's parameters and momentum (~90 MiB)
    assert "| auto | class_specific |" in (tmp_path / "train_memory.md").read_text()
