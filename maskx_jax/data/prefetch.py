"""An ordered, bounded, threaded batch producer.

Each batch k is described by ``plan(k) -> (buffer, [job, ...])``; the jobs (one per image)
run on a thread pool and fill disjoint parts of the buffer; ``finish(k, buffer, results)``
turns a completed buffer into the yielded value. Up to ``depth`` batches are in flight,
so image decoding overlaps with whatever the consumer (the device step) is doing, and
batches come out strictly in order k = start, start + 1, ... whatever order the jobs finish
in. NumPy, PIL and pycocotools release the GIL in their heavy loops, so threads scale.

Shut down with :meth:`close` (or use it as a context manager): pending jobs are cancelled
and running ones are waited for, so no thread outlives the iterator.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable


class OrderedPrefetcher:
    """Iterator over ``finish(k, ...)`` for k in [start, stop) (forever if stop is None)."""

    def __init__(
        self,
        plan: Callable[[int], tuple[Any, list[Callable[[], Any]]]],
        finish: Callable[[int, Any, list[Any]], Any],
        *,
        start: int = 0,
        stop: int | None = None,
        num_workers: int = 2,
        depth: int = 4,
        name: str = "maskx-data",
    ):
        self._plan = plan
        self._finish = finish
        self._next_planned = start
        self._stop = stop
        self._depth = max(int(depth), 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(int(num_workers), 1),
                                                           thread_name_prefix=name)
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._closed = False

    def _top_up(self) -> None:
        while len(self._pending) < self._depth and (self._stop is None or self._next_planned < self._stop):
            k = self._next_planned
            buffer, jobs = self._plan(k)
            futures = [self._pool.submit(job) for job in jobs]
            self._pending.append((k, buffer, futures))
            self._next_planned += 1

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._closed:
                raise StopIteration
            self._top_up()
            if not self._pending:
                raise StopIteration
            k, buffer, futures = self._pending.popleft()
            self._top_up()  # keep `depth` batches in flight while this one is finished
        results = [f.result() for f in futures]  # re-raises a job's exception here, in order
        return self._finish(k, buffer, results)

    def close(self) -> None:
        """Cancels pending work and joins the worker threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
