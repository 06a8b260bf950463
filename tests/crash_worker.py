"""``python tests/crash_worker.py <train.py flags>``: ``train.py`` with an optional pause point or fault.

Used by ``test_crash_resume.py`` to SIGKILL a real training run at a chosen moment, and by
``test_nonfinite.py`` to corrupt one batch. The command line is exactly ``train.py``'s; only the
environment differs between runs:

  MASKX_CRASH_AT      where to stop, ``POINT`` or ``POINT:STEP`` (unset: a normal ``train.py`` run)
  MASKX_CRASH_MARKER  file written (atomically) once the process has reached that point
  MASKX_NAN_AT        a step whose training batch gets NaN pixels (a non-finite loss at that step)

On reaching the point the process writes the marker and then sleeps forever, so the parent can
kill it there with SIGKILL: the process dies with everything exactly as it was at that moment
(open files, half-written directories, background threads mid-work). Points:

  generate            writing the synthetic dataset (first run: the validation split is being written)
  data:S              the main loop waits for the batch of step S (0-based; S steps completed) while
                      a decoding worker (process or thread) holds it
  save_tmp:S          orbax created checkpoint S's temporary directory, nothing written into it yet
  save_finalize:S     checkpoint S fully written to the temporary directory, not yet renamed into place
  after_save:S        checkpoint S complete (renamed into place), before the next step starts
  eval                evaluation of the final state: the first batch has been predicted
"""
from __future__ import annotations

import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]


from maskx_jax.data import pipeline as _pipeline  # after the sys.path set-up above


class StuckBuilder(_pipeline.TrainBatchBuilder):
    """Builds every batch but that of step S (``MASKX_CRASH_AT=data:S``), whose decoding never ends: a
    decoding worker (a process, or the thread with data.num_workers=0) holds it open."""

    def __call__(self, step: int) -> dict:
        if step == int(os.environ["MASKX_CRASH_AT"].partition(":")[2]):
            while True:
                time.sleep(3600)
        return super().__call__(step)


def _pause(what: str) -> None:
    marker = os.environ["MASKX_CRASH_MARKER"]
    with open(marker + ".tmp", "w") as f:
        f.write(f"{what} (thread {threading.current_thread().name})\n")
    os.replace(marker + ".tmp", marker)
    while True:  # the parent SIGKILLs us here
        time.sleep(3600)


def _install(spec: str) -> None:
    point, _, arg = spec.partition(":")
    target = int(arg) if arg else None

    if point == "generate":
        from maskx_jax.data import synthetic

        write_split = synthetic._write_split

        def paused_write_split(root, split, *a, **kw):
            if split == "val":
                _pause(f"generating the synthetic dataset in {root}")
            return write_split(root, split, *a, **kw)

        synthetic._write_split = paused_write_split

    elif point == "data":
        from maskx_jax.data import pipeline

        next_ = pipeline.TrainIterator.__next__

        def paused_next(self):
            if self.step == target:
                threading.Timer(0.5, _pause, (f"waiting for the batch of step {target}",)).start()
            return next_(self)

        # The iterator builds its batches with this class, in worker processes too (pickled by name).
        pipeline.TrainBatchBuilder = StuckBuilder
        pipeline.TrainIterator.__next__ = paused_next

    elif point in ("save_tmp", "save_finalize"):
        from orbax.checkpoint._src.path import atomicity

        cls = atomicity.AtomicRenameTemporaryPath
        create, finalize = cls.create, cls.finalize

        async def paused_create(self):
            out = await create(self)
            if point == "save_tmp" and self.get_final().name == str(target):
                _pause(f"orbax created {self.get()}")
            return out

        async def paused_finalize(self):
            if point == "save_finalize" and self.get_final().name == str(target):
                _pause(f"orbax about to finalize {self.get()}")
            return await finalize(self)

        cls.create, cls.finalize = paused_create, paused_finalize

    elif point == "after_save":
        from maskx_jax.train import checkpointing

        save = checkpointing.save_state

        def paused_save(manager, state, step):
            save(manager, state, step)
            if step == target:
                manager.wait_until_finished()
                _pause(f"checkpoint {step} saved")

        checkpointing.save_state = paused_save  # the loop calls it through the module

    elif point == "eval":
        from maskx_jax import train_lib

        make = train_lib.Trainer.make_predict_fn

        def paused_make(self, state):
            predict = make(self, state)

            def wrapped(images, image_sizes):
                out = predict(images, image_sizes)
                _pause("evaluation: first batch predicted")
                return out

            return wrapped

        train_lib.Trainer.make_predict_fn = paused_make

    else:
        raise SystemExit(f"unknown MASKX_CRASH_AT point {spec!r}")


def _install_nan(step: int) -> None:
    import numpy as np

    from maskx_jax.data import pipeline

    next_ = pipeline.TrainIterator.__next__

    def nan_next(self):
        s = self.step
        batch = next_(self)
        if s == step:
            batch = batch.replace(images=np.full_like(batch.images, np.nan))
        return batch

    pipeline.TrainIterator.__next__ = nan_next


if __name__ == "__main__":
    if os.environ.get("MASKX_CRASH_AT"):
        _install(os.environ["MASKX_CRASH_AT"])
    if os.environ.get("MASKX_NAN_AT"):
        _install_nan(int(os.environ["MASKX_NAN_AT"]))
    from absl import app

    import train

    app.run(train.main, flags_parser=train.parse_flags)
