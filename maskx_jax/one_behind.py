"""Reading device results one step late, so the host never waits for the device while it could dispatch.

JAX dispatches a compiled call and returns at once; reading its result (``jax.device_get``) blocks until the
device is done. The training loop (metrics), evaluation and ``predict`` (detections to convert) therefore
dispatch step *i + 1* before they read step *i*: the host's conversion of one result overlaps the device's
work on the next. :class:`OneBehind` is that pattern, written once.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class OneBehind(Generic[T]):
    """Holds at most one dispatched result; ``finish`` is called on each, in order, one push late.

    ``push(result)`` (right after dispatching the call that makes ``result``) finishes the previous result
    and holds this one; ``flush()`` finishes the held result now (before a checkpoint, at the end).
    """

    def __init__(self, finish: Callable[[T], None]):
        self._finish = finish
        self._held: list[T] = []  # zero or one result

    def push(self, result: T) -> None:
        previous = self._held[:]
        self._held = [result]
        for value in previous:
            self._finish(value)

    def flush(self) -> None:
        held, self._held = self._held, []
        for value in held:
            self._finish(value)
