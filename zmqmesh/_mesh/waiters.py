"""Waiting on the mesh: the conditions callers wait for, and the loop side that completes them.

A wait is a *step* (`Until`, `Room`) that shared, sans-I/O logic yields; a driver carries
it out in its own way (blocking a thread, or awaiting). The loop side is `Waiters`: it
re-checks every pending condition after each change of the mesh and completes the
waiter whose condition holds. `Space` tells callers blocked on a full send queue that
the loop made room.
"""

from __future__ import annotations

import threading
from collections import deque
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
    """Wait until the send queue ``q`` has room, or ``deadline`` (monotonic) passes."""

    q: deque[Any]
    deadline: float


class Waiter(Protocol):
    """What waits on a condition: an asyncio or a concurrent.futures future."""

    def done(self) -> bool: ...
    def set_result(self, result: None) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class Waiters:
    """Pending conditions and their waiters; every method runs on the loop (only the loop
    completes a waiter)."""

    def __init__(self) -> None:
        self._entries: list[tuple[Callable[[], bool], Waiter]] = []
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
        if len(self._entries) >= _COMPACT_AT:
            self._entries = [entry for entry in self._entries if not entry[1].done()]
        self._entries.append((predicate, waiter))

    def remove(self, waiter: Waiter) -> None:
        """Forget ``waiter`` (after it completed or its caller gave up)."""
        self._entries = [entry for entry in self._entries if entry[1] is not waiter]

    def check(self) -> None:
        """Re-check every condition after a change; complete the waiters whose condition holds."""
        done = False
        for predicate, waiter in list(self._entries):
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
            self._entries = [entry for entry in self._entries if not entry[1].done()]

    def close(self) -> None:
        """Fail every pending waiter with `NodeClosedError`; later ones fail at once."""
        self.closed = True
        for _predicate, waiter in self._entries:
            if not waiter.done():
                waiter.set_exception(NodeClosedError("the node stopped"))
        self._entries = []


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
