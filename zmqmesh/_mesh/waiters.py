"""Waiting on the mesh: the conditions callers wait for, and the loop side that completes them.

A wait is a *step* (`Until`, `Room`) that shared, sans-I/O logic yields; a driver carries
it out in its own way (blocking a thread, or awaiting). The loop side is `Waiters`: it
re-checks every pending condition after each change of the mesh and completes the
waiter whose condition holds. `Space` tells callers blocked on a full send queue that
the loop made room.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ..errors import NodeClosedError

__all__ = ["Until", "Room", "Waiter", "Waiters", "Space"]

_COMPACT_AT = 64


class Until(NamedTuple):
    """Wait until ``predicate()`` holds on the loop, or ``deadline`` (monotonic) passes.

    The driver raises `MeshTimeoutError` into the waiting logic at the deadline, with
    ``what`` saying what was awaited.
    """

    predicate: Callable[[], bool]
    deadline: float | None
    what: str = "condition"


class Room(NamedTuple):
    """Wait while ``full()`` holds (a send queue, or all of them together, hold what they
    may: back-pressure), or until ``deadline`` (monotonic) passes.

    The step's value is True once there is room, False if the deadline came first: the
    waiting logic decides what that means (the driver only waits, wakes the loop's flush,
    and raises `NodeClosedError` if the node stops).
    """

    full: Callable[[], bool]
    deadline: float


class Waiter(Protocol):
    """What waits on a condition: an asyncio or a concurrent.futures future."""

    def done(self) -> bool: ...
    def set_result(self, result: None) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class Waiters:
    """Pending conditions and their waiters; every method runs on the loop (only the loop
    completes a waiter). Adding and removing a waiter take constant time, however many
    wait; `check` looks at every condition."""

    def __init__(self) -> None:
        self._entries: dict[Waiter, Callable[[], bool]] = {}  # (in the order they came)
        self._compact_at = _COMPACT_AT
        self.closed = False

    def add(self, predicate: Callable[[], bool], waiter: Waiter) -> None:
        """Complete ``waiter`` once ``predicate()`` holds (checked now and on every `check`).

        A waiter its caller gave up on is removed with `remove`; an asyncio future
        cancelled on the loop counts as done and is skipped.
        """
        if waiter.done():
            return
        if self.closed:
            waiter.set_exception(NodeClosedError("the node is not running"))
            return
        try:
            if predicate():
                waiter.set_result(None)
                return
        except Exception as exc:
            waiter.set_exception(exc)
            return
        if len(self._entries) >= self._compact_at:  # (each time they doubled: constant time per add)
            self._drop_done()
            self._compact_at = max(_COMPACT_AT, 2 * len(self._entries))
        self._entries[waiter] = predicate

    def remove(self, waiter: Waiter) -> None:
        """Forget ``waiter`` (after it completed or its caller gave up)."""
        self._entries.pop(waiter, None)

    def check(self) -> None:
        """Re-check every condition after a change; complete the waiters whose condition holds."""
        done = False
        for waiter, predicate in list(self._entries.items()):
            if waiter.done():
                done = True
                continue
            try:
                if predicate():
                    waiter.set_result(None)
                    done = True
            except Exception as exc:
                waiter.set_exception(exc)
                done = True
        if done:
            self._drop_done()

    def _drop_done(self) -> None:
        self._entries = {waiter: predicate for waiter, predicate in self._entries.items() if not waiter.done()}

    def close(self) -> None:
        """Fail every pending waiter with `NodeClosedError`; later ones fail at once."""
        self.closed = True
        for waiter in list(self._entries):  # (a waiter's callbacks may remove waiters meanwhile)
            if not waiter.done():
                waiter.set_exception(NodeClosedError("the node stopped"))
        self._entries = {}


class Space:
    """Tells callers waiting for room in a send queue that the loop sent something.

    Threads wait on `condition`; an asyncio driver installs an ``event`` (any object with
    ``set()``) that the loop sets. `waiting` counts the threads waiting, so the loop takes
    the lock only when someone waits.
    """

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.waiting = 0
        self.event: Any = None

    def notify(self) -> None:
        """Wake every waiter (loop side)."""
        if self.waiting:
            with self.condition:
                self.condition.notify_all()
        if self.event is not None:
            self.event.set()
