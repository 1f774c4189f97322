"""The large replies a provider has handed to ZeroMQ and ZeroMQ has not yet written out,
per caller: a caller that asks and never reads its replies must not make its provider
hold them without a bound.

ZeroMQ bounds the replies waiting for one caller in frames (``send_hwm``), not bytes: a
caller sending a thousand requests of a few bytes to a service answering 1 MiB each, and
reading nothing, made its provider hold 1 GiB (10 GiB at the default mark). A reply of
`LARGE_FRAME` bytes or more goes uncopied, and ZeroMQ tells when it let go of it (a
`zmq.MessageTracker`): that is when it left for the kernel, or was dropped with its
connection. Smaller replies are not counted: they are copied into ZeroMQ, which cannot
tell when it sent them, and their pipe holds at most ``send_hwm`` frames of 64 KiB.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["UnsentReplies", "MAX_CALLERS"]

MAX_CALLERS = 1024
"""Callers tracked at once: past it, those whose replies all went are forgotten first,
and a caller that would make one more gets no large reply until there is room."""


class UnsentReplies:
    """Large replies not yet written out, per caller (the owner thread of the router only).

    `room` says whether one more of ``size`` bytes may go to ``caller``: within
    ``per_caller`` bytes for that caller (one reply at least, however large), and within
    ``total`` for all callers together."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self._callers: dict[bytes, deque[tuple[Any, int]]] = {}  # caller -> (tracker, bytes) in order sent
        self._held: dict[bytes, int] = {}
        self.held = 0
        """The bytes of every caller's large replies not yet written out, as last looked at."""

    def room(self, caller: bytes, size: int) -> bool:
        """Whether a reply of ``size`` bytes may go to ``caller`` now."""
        held = self._let_go(caller)
        if held and held + size > self.per_caller:
            return False
        if self.held and self.held + size > self.total:
            self._sweep()
            if self.held and self.held + size > self.total:
                return False
        return caller in self._callers or len(self._callers) < MAX_CALLERS or self._sweep() < MAX_CALLERS

    def sent(self, caller: bytes, tracker: Any, size: int) -> None:
        """Note a reply of ``size`` bytes handed to ZeroMQ for ``caller``, with its tracker."""
        if tracker.done:
            return
        self._callers.setdefault(caller, deque()).append((tracker, size))
        self._held[caller] = self._held.get(caller, 0) + size
        self.held += size

    def _let_go(self, caller: bytes) -> int:
        """Forget ``caller``'s replies that ZeroMQ let go of, in order; the bytes still held."""
        pending = self._callers.get(caller)
        if pending is None:
            return 0
        let_go = 0
        while pending and pending[0][0].done:
            let_go += pending.popleft()[1]
        held = self._held[caller] - let_go
        self.held -= let_go
        if pending:
            self._held[caller] = held
        else:
            del self._callers[caller], self._held[caller]
        return held

    def _sweep(self) -> int:
        """Let go of what every caller's replies ZeroMQ let go of; the callers still tracked."""
        for caller in list(self._callers):
            self._let_go(caller)
        return len(self._callers)
