"""Batch streams built ahead of the consumer by grain, in this process or in worker processes.

A stream evaluates a picklable ``build(k)`` for k = start, start + 1, ... (up to ``stop``, or
forever) and yields the results strictly in that order, ``prefetch`` of them computed ahead:

* ``num_workers = 0``: ``build`` runs on one background thread of this process. No process
  start-up, breakpoints and profilers work, and the GIL-bound decoding still overlaps the
  device step; tests and debugging use it.
* ``num_workers = n > 0``: grain's ``mp_prefetch`` runs ``build`` in n spawned worker
  processes, worker i computing k = start + i, start + i + n, ...; NumPy arrays come back
  through shared memory (grain's ``SharedMemoryArray``, an ``np.ndarray``; ``build`` allocates
  them there with :func:`zeros`, so a batch is never copied), and the streams of the workers
  are interleaved back into order. Decoding then scales with the host's cores. Each worker runs
  BLAS single-threaded (see :class:`_WorkerSetup`); in this process that is left to the user
  (``OPENBLAS_NUM_THREADS=1`` halves the CPU per image of the in-process path).

Since every element is a pure function of k, the output does not depend on the number of
workers, and starting at ``start = s`` resumes exactly. Failures: an exception inside ``build``
is raised again in the consumer; a worker that dies (killed, out of memory) makes the read
that waits for it raise :class:`WorkerDied` (a ``RuntimeError``) naming the exit code, never a hang;
and workers end by themselves within a second when the consuming process is killed.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable, Iterator

import grain
import numpy as np
import threadpoolctl
from grain.multiprocessing import SharedMemoryArray

# Long enough to never end in practice; grain's ranges need a stop below sys.maxsize.
FOREVER = 2**60


def _absl_flags_parsed() -> None:
    """grain reads absl flags (its profiler's) from the worker set-up; a program that never parsed
    absl flags (a script, pytest) gets their defaults instead of an UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# Set in worker processes by _WorkerSetup: zeros() then allocates batch arrays in shared memory.
_IN_WORKER = False
# Arrays at least this large are allocated in shared memory in a worker; smaller ones travel pickled.
SHARED_MIN_BYTES = 1 << 16


def zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.zeros``, except inside a worker process, where a large array is allocated in shared memory
    (grain's ``SharedMemoryArray``) so the finished batch reaches the consumer without a copy."""
    if _IN_WORKER and math.prod(shape) * np.dtype(dtype).itemsize >= SHARED_MIN_BYTES:
        return SharedMemoryArray(shape, dtype)  # new pages are zero
    return np.zeros(shape, dtype)


class _WorkerSetup:
    """Runs first in every grain worker process.

    * a daemon thread ends the worker when the process that started it is gone (checked every
      second): without it, a trainer killed with SIGKILL (the out-of-memory killer, a pre-empted
      job) leaves its workers running forever, waiting on a queue nobody reads;
    * BLAS and OpenMP use one thread: the workers are the parallelism, and OpenBLAS's own threads
      only spin in the small matrix products of the mask crops (measured: twice the CPU per image);
    * :func:`zeros` allocates in shared memory.
    """

    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def __call__(self, worker_index: int, worker_count: int) -> None:
        del worker_index, worker_count
        global _IN_WORKER
        _IN_WORKER = True
        threading.Thread(target=self._watch, name="maskx-exit-with-parent", daemon=True).start()
        threadpoolctl.threadpool_limits(1)

    def _watch(self) -> None:
        while os.getppid() == self.parent_pid:
            time.sleep(1.0)
        os._exit(1)


class WorkerDied(RuntimeError):
    """A decoding worker process ended while the stream still needed it."""


class BatchStream:
    """Iterator over ``build(k)`` for k in ``[start, stop)`` (module docstring). Close it (or use it
    as a context manager) to stop the thread or the worker processes."""

    def __init__(self, build: Callable[[int], Any], *, start: int = 0, stop: int | None = None,
                 num_workers: int = 0, prefetch: int = 2):
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = decode in this process), got {num_workers}")
        stop = start + FOREVER if stop is None else stop
        ds = grain.MapDataset.range(start, stop).map(build)
        prefetch = max(int(prefetch), 1)
        if num_workers == 0:
            it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
        else:
            _absl_flags_parsed()
            # Inside a worker: no extra threads (the process is the unit of parallelism); its queue of
            # finished batches is the prefetch buffer.
            it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=int(num_workers),
                                             per_worker_buffer_size=math.ceil(prefetch / num_workers)),
                worker_init_fn=_WorkerSetup(os.getpid()))
        self.num_workers = int(num_workers)
        self._it: Any = iter(it_ds)
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            return next(self._it)
        except RuntimeError as e:
            if "terminated unexpectedly" not in str(e):
                raise
            raise WorkerDied(
                f"a data worker process died ({e}) Batches cannot go on in order, so this stops here; resume "
                f"from the last checkpoint (the batches are a function of the step, so a resumed run sees the "
                f"same ones). Exit code -9 is SIGKILL, often the out-of-memory killer: lower data.num_workers "
                f"or data.prefetch.") from e

    def close(self) -> None:
        """Stops the background thread (it ends after the batch it is building) or the worker processes.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: grain's modules may be gone already
            pass
