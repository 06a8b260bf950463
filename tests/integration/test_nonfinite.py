"""A non-finite loss in a real ``train.py`` run (toy real model): stop naming the step, checkpoint intact.

``tests/crash_worker.py`` (``train.py`` plus test hooks) fills step 3's batch with NaN pixels. The
run must stop with exit status 1 and one message naming step 3 and the last good checkpoint; that
checkpoint (step 2) must be bitwise what it was before, and nothing may be saved after it. The
same command without the fault then resumes from step 2 and completes. (``on_nonfinite='skip'``,
the update being dropped inside the step, and the halted state are covered with the stand-in
model in ``test_train_lib.py``.)
"""
from __future__ import annotations

import os
import re

import numpy as np

import train_subprocess as TS


def _command(workdir, data, steps):
    return TS.command(str(workdir), f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
                      "--config.eval.max_images=4", "--config.eval.batch_size=2", data_dir=str(data), worker=True)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    wd, data = tmp_path / "run", tmp_path / "data"
    first = TS.run(_command(wd, data, 2))
    assert first.returncode == 0, first.stdout[-4000:]
    assert TS.checkpoint_steps(wd) == [2]
    before = TS.read_checkpoint(wd, 2)
    stamp = {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, fs in os.walk(wd / "checkpoints") for p in fs}

    proc = TS.run(_command(wd, data, 6), MASKX_NAN_AT="3")
    out = proc.stdout
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("E") and "train_cli.py" in line]
    assert len(errors) == 1, errors
    assert re.search(r"non-finite loss at step 3 \(the step after 3 completed steps; total=nan", errors[0]), errors[0]
    assert "the latest checkpoint is step 2" in errors[0] and "train.on_nonfinite='skip'" in errors[0]
    assert "resumed from" in out and "metrics written" not in out  # no evaluation of a failed run

    assert TS.checkpoint_steps(wd) == [2]  # nothing saved after the bad step
    after = TS.read_checkpoint(wd, 2)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert stamp == {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, fs in os.walk(wd / "checkpoints") for p in fs}
    assert not [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]

    again = TS.run(_command(wd, data, 6))  # the fault gone (e.g. the bad record fixed): resumes and completes
    assert again.returncode == 0, again.stdout[-4000:]
    assert re.search(r"resumed from \S+/checkpoints/2 at step 2", again.stdout)
    assert TS.checkpoint_steps(wd) == [2, 4, 6] and (wd / "metrics.json").is_file()
    final = TS.read_checkpoint(wd, 6)
    assert all(np.isfinite(v).all() for k, v in final.items() if v.dtype.kind == "f")
    assert int(final["/halted_at"]) == -1 and int(final["/skipped"]) == 0
