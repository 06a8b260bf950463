"""Decoding in worker processes (``data.num_workers > 0``, grain): the same batches as in-process, exact resume,
process slices, bad records counted from the workers, and no hang or orphan when a process is killed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from maskx_jax.config import base_config
from maskx_jax.data import loader, pipeline
from maskx_jax.data.synthetic import generate_synthetic
from tests.resources import ROOT, TESTS_DIR

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FIELDS = ("images", "image_sizes", "gt_boxes", "gt_classes", "gt_valid", "gt_crowd", "gt_has_mask", "gt_masks",
          "image_ids", "original_sizes")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Synthetic data with one truncated training image (image_unreadable) and 3 slots (too_many_instances)."""
    root = tmp_path_factory.mktemp("workers") / "syn"
    shutil.copytree(generate_synthetic(str(root) + "_src", 20, 6, 96, seed=2).root, root)
    victim = root / "images" / "train" / "000003.png"
    victim.write_bytes(victim.read_bytes()[:200])
    return str(root)


def _config(root, workers, **data):
    c = base_config()
    d = c.data
    d.synthetic_dir, d.cache_dir = root, os.path.join(root, "..", "cache")
    d.synthetic_num_train, d.synthetic_num_val, d.synthetic_image_size, d.synthetic_seed = 20, 6, 96, 2
    d.min_size, d.max_size, d.pad_height, d.pad_width = 96, 96, 96, 96
    d.max_instances, d.mask_crop_size, d.num_workers, d.prefetch = 3, 14, workers, 3
    for k, v in data.items():
        setattr(d, k, v)
    c.train.batch_size, c.train.seed, c.eval.batch_size = 4, 3, 4
    return c


def _train(root, workers, steps, **kw):
    c = _config(root, workers)
    info = pipeline.load_datasets(c)
    with pipeline.make_train_iterator(c, info=info, **kw) as it:
        batches = [next(it) for _ in range(steps)]
        assert it.step == kw.get("start_step", 0) + steps
    return batches, info


def _same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f


def test_workers_give_the_in_process_batches_bitwise(data_root):
    ref, ref_info = _train(data_root, 0, 8)  # 32 samples: the epoch boundary (20 records) inside
    two, two_info = _train(data_root, 2, 8)
    for a, b in zip(ref, two):
        _same(a, b)
    # Bad records found in the workers reach the consuming process's counter, each counted once.
    assert two_info.summary() == ref_info.summary()
    assert two_info.summary()["image_unreadable"] == 1 and two_info.summary()["too_many_instances"] >= 1
    assert "image_unreadable" in two_info.report()
    # Exact resume with workers: starting at step 5 gives steps 5, 6, 7 of the uninterrupted run.
    resumed, _ = _train(data_root, 1, 3, start_step=5)
    for a, b in zip(ref[5:], resumed):
        _same(a, b)
    # Two hosts with a worker each: their local batches concatenate into the global batch.
    halves = [_train(data_root, 1, 2, start_step=6, process_index=p, process_count=2)[0] for p in (0, 1)]
    for step, (h0, h1) in enumerate(zip(*halves)):
        for f in FIELDS:
            assert np.array_equal(np.concatenate([getattr(h0, f), getattr(h1, f)]), getattr(ref[6 + step], f)), f


def test_eval_batches_from_workers_equal_in_process(data_root):
    def run(workers):
        c = _config(data_root, workers)
        info = pipeline.load_datasets(c)
        return list(pipeline.make_eval_batches(c, info=info))

    ref, two = run(0), run(2)
    assert [len(r) for _, r in two] == [4, 2]
    for (a, ra), (b, rb) in zip(ref, two):
        _same(a, b)
        key = lambda r: (r.image_id, r.name, r.path, r.height, r.width, len(r.instances))
        assert [key(r) for r in ra] == [key(r) for r in rb]


def test_error_inside_a_worker_is_raised_in_the_consumer(data_root, tmp_path):
    root = tmp_path / "syn"
    shutil.copytree(data_root, root)
    for png in (root / "images" / "train").iterdir():
        png.write_bytes(b"not an image")
    c = _config(str(root), 1)
    info = pipeline.load_datasets(c)
    with pipeline.make_train_iterator(c, info=info) as it:
        with pytest.raises(RuntimeError, match="no image of the dataset can be decoded"):
            next(it)


def _workers_of(pid):
    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


def test_killed_worker_raises_instead_of_hanging(data_root):
    c = _config(data_root, 2)
    info = pipeline.load_datasets(c)
    it = pipeline.make_train_iterator(c, info=info)
    next(it)
    workers = _workers_of(os.getpid())
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(loader.WorkerDied, match="exit code -9") as err:
        for _ in range(50):  # at most 3 batches were made ahead: the dead worker's turn comes
            next(it)
    assert "resume from the last checkpoint" in str(err.value)
    assert time.monotonic() - start < 60
    it.close()
    psutil.wait_procs(workers, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_workers_end_when_the_trainer_is_killed(data_root, tmp_path):
    """A trainer killed with SIGKILL (no clean-up runs) must not leave its workers behind."""
    script = tmp_path / "consumer.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path[:0] = [{os.path.dirname(os.path.abspath(__file__))!r}, {TESTS_DIR!r}, {ROOT!r}]
        from test_data_workers import _config
        from maskx_jax.data import pipeline
        if __name__ == "__main__":
            c = _config({data_root!r}, 2)
            it = pipeline.make_train_iterator(c)
            next(it)
            print("ready", flush=True)
            time.sleep(300)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        proc.kill()


def test_num_workers_must_not_be_negative(data_root):
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader.BatchStream(lambda k: k, num_workers=-1)
    assert json.dumps(list(loader.BatchStream(lambda k: k, start=2, stop=5))) == "[2, 3, 4]"
