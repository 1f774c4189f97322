"""The timers membership sets on the loop, cancelled together when it closes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._io.reactor import EventLoop, TimerLike

__all__ = ["Timers"]

_MAX_TIMERS = 64


class Timers:
    """Sets membership's timers on ``loop`` and cancels every one at `close`.

    ``closed`` is True from `close` on: `later` sets no timer then, and a callback that
    runs on (or one that outlived the close) checks it before it does anything.
    """

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.closed = False
        self._timers: list[TimerLike] = []
        self._bound = _MAX_TIMERS

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop in ``delay`` seconds; nothing once closed. Raises nothing."""
        if not self.closed:
            self._timers.append(self.loop.call_later(delay, fn, *args))
            if len(self._timers) > self._bound:  # (pruned when it doubled: a look per timer at most)
                self._timers = [t for t in self._timers if not t.cancelled() and t.when() > self.loop.time()]
                self._bound = max(_MAX_TIMERS, 2 * len(self._timers))

    def close(self) -> None:
        """Cancel every timer set, and set none from now on (idempotent)."""
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
