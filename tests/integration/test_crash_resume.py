"""Crash-safe, exact resume: ``train.py`` SIGKILLed at many moments, re-run with the same command.

The real detector at toy size (``tests/tiny_train_config.py``: ResNet-18-FPN, GroupNorm, 64x64
synthetic images) trains 6 steps with a checkpoint every 2 (keeping 2) and evaluates. One run goes
through uninterrupted. A second work directory is driven by the *same command* again and again; each
time but the last, ``tests/crash_worker.py`` stops the process at a chosen moment and the test kills
it with SIGKILL (no handler, no cleanup, no flush):

  1. while the synthetic dataset is being generated (first run, nothing exists yet)
  2. inside orbax's save of checkpoint 2 (the first): its temporary directory exists, nothing in it yet
  3. inside orbax's save of checkpoint 4: fully written, not yet renamed into place
  4. right after checkpoint 4 completed
  5. while the batch of step 5 (0-based) is being decoded: data loading, between checkpoints 4 and 6
  6. during the final evaluation (checkpoint 6 is complete)

After every kill the test checks what is on disk (which checkpoints orbax sees; a half-written one
is never among them) and the next run's log says where it resumed. At the end the final train state
(parameters, optimiser state, step counters) is bitwise equal to the uninterrupted run's, and so are
the evaluation metrics.

The processes share a persistent XLA compilation cache (``train_subprocess.XLA_CACHE``), so at most
the first run compiles.

Two in-process tests with the stand-in model add what the chain cannot reach: a temporary checkpoint
directory orphaned at a step that is never saved again is ignored, then removed by the next training
run (not by evaluation); a half-deleted *older* checkpoint (orbax's garbage collection killed midway)
is never resumed from.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest

import train_subprocess as TS

CKPT_TMP = ".orbax-checkpoint-tmp"
STEPS, EVERY, KEEP = 6, 2, 2


def _command(workdir: str, data: str) -> list[str]:
    return TS.command(workdir, f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
                      f"--config.train.keep_checkpoints={KEEP}", "--config.eval.max_images=4",
                      "--config.eval.batch_size=2", "--config.data.num_workers=2", data_dir=data, worker=True)


def _run_to_end(cmd, log_path) -> str:
    proc = TS.run(cmd)
    log_path.write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def _run_and_kill(cmd, point, marker, log_path) -> str:
    """Start the command, wait until it reports reaching ``point``, SIGKILL it."""
    env = TS.env(MASKX_CRASH_AT=point, MASKX_CRASH_MARKER=marker)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=TS.ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not os.path.exists(marker):
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc={proc.returncode}) before reaching {point}:\n"
                                + open(log_path).read()[-5000:])
                assert time.monotonic() < deadline, "timed out waiting for the pause point"
                time.sleep(0.05)
            workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            # its decoding worker processes end with it (they would otherwise wait forever)
            assert not psutil.wait_procs(workers, timeout=15)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    what = open(marker).read().strip()
    os.remove(marker)
    return what


def _tmp_dirs(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(n for n in os.listdir(d) if CKPT_TMP in n) if os.path.isdir(d) else []


def _resumed_from(log: str) -> int | None:
    m = re.search(r"resumed from \S+ at step (\d+)", log)
    return int(m.group(1)) if m else None


def test_sigkill_at_six_moments_then_resume_equals_uninterrupted(tmp_path):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    data_root = tmp_path / "data_crashed"
    marker = str(tmp_path / "paused")
    cmd = _command(crashed, str(data_root))
    logs = tmp_path / "logs"
    logs.mkdir()

    def kill_at(point: str) -> tuple[str, str]:
        """The same command, SIGKILLed at ``point``: (its log, where it was)."""
        log_path = logs / f"{point.replace(':', '_')}.log"
        where = _run_and_kill(cmd, point, marker, log_path)
        return log_path.read_text(), where

    t0 = time.monotonic()
    # 1. killed while the dataset is being generated: nothing trained, no dataset in place.
    _, where = kill_at("generate")
    assert "generating the synthetic dataset" in where
    assert not (data_root / "synthetic").exists()
    assert [n for n in os.listdir(data_root) if n.startswith(".synthetic.tmp-")]  # the half-written copy
    assert TS.checkpoint_steps(crashed) == []

    # The uninterrupted reference run (it also fills the compilation cache if it was empty).
    log = _run_to_end(_command(straight, str(tmp_path / "data_straight")), logs / "straight.log")
    assert _resumed_from(log) is None
    assert TS.checkpoint_steps(straight) == [4, 6] and not _tmp_dirs(straight)
    t1 = time.monotonic()

    # 2. killed inside the save of checkpoint 2, its temporary directory just created.
    log, where = kill_at("save_tmp:2")
    assert "orbax created" in where and "2" + CKPT_TMP in where
    assert _resumed_from(log) is None, "nothing complete to resume from"
    assert (data_root / "synthetic" / "meta.json").is_file()  # the dataset was regenerated, completely
    assert TS.checkpoint_steps(crashed) == [], "a half-written checkpoint must not count"
    assert _tmp_dirs(crashed) == ["2" + CKPT_TMP]

    # 3. killed inside the save of checkpoint 4: everything written, not yet renamed into place.
    log, where = kill_at("save_finalize:4")
    assert "about to finalize" in where
    assert _resumed_from(log) is None  # the temporary directory of attempt 2 was not picked up
    assert TS.checkpoint_steps(crashed) == [2]
    assert _tmp_dirs(crashed) == ["4" + CKPT_TMP]
    tmp4 = os.path.join(crashed, "checkpoints", "4" + CKPT_TMP)
    assert any(files for _, _, files in os.walk(tmp4)), "the save had written its data"

    # 4. killed right after checkpoint 4 completed.
    log, _ = kill_at("after_save:4")
    assert _resumed_from(log) == 2
    assert TS.checkpoint_steps(crashed) == [2, 4] and _tmp_dirs(crashed) == []

    # 5. killed while step 5's batch is decoded (between checkpoints).
    log, where = kill_at("data:5")
    assert "waiting for the batch of step 5" in where
    assert _resumed_from(log) == 4
    assert TS.checkpoint_steps(crashed) == [2, 4]

    # 6. killed during the final evaluation: the last checkpoint is complete, no metrics yet.
    log, where = kill_at("eval")
    assert "evaluation" in where
    assert _resumed_from(log) == 4
    assert TS.checkpoint_steps(crashed) == [4, 6]
    assert not os.path.exists(os.path.join(crashed, "metrics.json"))

    # The same command once more: nothing left to train, evaluates, exits cleanly.
    log = _run_to_end(cmd, logs / "final.log")
    assert _resumed_from(log) == 6
    assert not re.search(r"step \d+: loss/", log), "no training step should run again"
    t2 = time.monotonic()

    assert TS.checkpoint_steps(crashed) == TS.checkpoint_steps(straight) == [4, 6]
    for step in (4, 6):
        a, b = TS.read_checkpoint(straight, step), TS.read_checkpoint(crashed, step)
        assert a.keys() == b.keys() and any("/params/" in k for k in a)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"checkpoint {step}: {k}")
    assert int(TS.read_checkpoint(crashed, 6)["/step"]) == STEPS
    crashed_metrics = json.load(open(os.path.join(crashed, "metrics.json")))
    assert crashed_metrics == json.load(open(os.path.join(straight, "metrics.json")))
    assert _tmp_dirs(crashed) == []
    print(f"first kill + uninterrupted run {t1 - t0:.1f}s, 5 more kills + final run {t2 - t1:.1f}s")


def test_orphaned_temporary_checkpoint_is_ignored_then_removed(tmp_path):
    """A save killed at a step that is never saved again (e.g. the off-grid SIGTERM checkpoint) leaves
    ``N.orbax-checkpoint-tmp``: never listed as a step; training deletes it, evaluation leaves it alone."""
    import train_fixtures as F
    from maskx_jax import train_lib

    cfg = F.stand_in_config(steps=2)
    orphan = tmp_path / "checkpoints" / ("3" + CKPT_TMP)
    (orphan / "default").mkdir(parents=True)
    (orphan / "default" / "_METADATA").write_text("{half written")
    manager = train_lib.make_checkpoint_manager(str(tmp_path), cfg)  # as evaluate() opens it
    assert manager.latest_step() is None and manager.all_steps() == []
    manager.close()
    assert orphan.exists()
    res = train_lib.train(cfg, str(tmp_path), model_fn=F.tiny_model_fn, num_classes=F.NUM_CLASSES,
                          train_iter_fn=F.make_synthetic_iter(), evaluate_at_end=False, progress=False)
    assert res.step == 2
    assert not orphan.exists()
    assert TS.checkpoint_steps(str(tmp_path)) == [2] and _tmp_dirs(str(tmp_path)) == []


def test_half_deleted_old_checkpoint_is_never_resumed_from(tmp_path):
    """Orbax deletes checkpoints beyond ``keep_checkpoints`` in place, oldest first and only after a newer one
    is complete: a kill in the middle leaves a broken *older* step, which resume never picks (it takes the
    latest) and the next garbage collection removes."""
    import shutil

    import train_fixtures as F
    from maskx_jax import train_lib

    run = lambda cfg: train_lib.train(cfg, str(tmp_path), model_fn=F.tiny_model_fn,
                                      num_classes=F.NUM_CLASSES, train_iter_fn=F.make_synthetic_iter(),
                                      evaluate_at_end=False, progress=False)
    run(F.stand_in_config(steps=4, keep_checkpoints=5))
    assert TS.checkpoint_steps(str(tmp_path)) == [2, 4]
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "default")  # half deleted: the step directory survives
    res = run(F.stand_in_config(steps=6, keep_checkpoints=2))
    assert res.step == 6
    assert TS.checkpoint_steps(str(tmp_path)) == [4, 6]
