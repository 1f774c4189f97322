"""Waiting for room in a send queue (back-pressure), one logic for both drivers:
`room_waits` says how long to wait each time; the thread driver waits on a condition,
the asyncio one on a signal of the loop's flushes."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

from .._engine.engine import Engine

__all__ = ["ROOM_SLICE_S", "room_waits"]

ROOM_SLICE_S = 0.1
"""The longest a caller waits for room before it wakes the loop's flush again."""


def room_waits(engine: Engine, full: Callable[[], bool], deadline: float) -> Generator[float, bool, bool]:
    """The waits of a caller held while ``full()`` holds: yields how many seconds to wait
    next, and is sent whether a flush woke it (True) or the time ran out; returns True
    once there is room, False at ``deadline``. Raises `NodeClosedError` if the node stops.

    It wakes the loop's flush at first, and again after each `ROOM_SLICE_S` with no flush:
    not after a flush woke it (that one just sent what it could, and a queue it could not
    empty is tried again by its own retry), or each flush would start the next, 30,000 a
    second for as long as the queue stays full."""
    flushed = False
    while full():
        engine.ensure_running()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if not flushed:
            engine.outbound.wake()  # type: ignore[union-attr]
        flushed = yield min(remaining, ROOM_SLICE_S)
    engine.ensure_running()  # (a stop empties the queues: that room is no place for a message)
    return True
