"""Which service handlers are quick: the replies a provider holds to send back in one
frame may wait for a handler that returned within `HOLD_LIMIT_S` on each of its last
`QUICK_RUNS` runs, and go out before any other (`Dispatcher.replies_held`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["HOLD_LIMIT_S", "QUICK_RUNS", "HandlerTimes"]

HOLD_LIMIT_S = 0.0005
"""A handler that returns sooner is quick: replies may wait for it (`Dispatcher.replies_held`)."""
QUICK_RUNS = 8
"""Runs in a row a handler must have been quick in before replies wait for it."""
_MAX_TIMED_HANDLERS = 4096  # bounded: callables made per call would grow it


class HandlerTimes:
    """How many of each timed handler's last runs in a row were quick (the inbox's owner
    thread only); ``quick`` holds those quick in all of their last `QUICK_RUNS`. An
    unhashable callable is never timed, nor quick."""

    def __init__(self) -> None:
        self._runs: dict[Any, int] = {}  # handler: how many of its last runs in a row were quick
        self.quick: set[Any] = set()
        """The handlers quick on each of their last `QUICK_RUNS` runs (look with ``in``,
        which raises `TypeError` for an unhashable callable)."""

    def finished(self, handler: Callable[..., Any], started: float, ended: float | None = None) -> None:
        """``handler``, started at ``started`` (`time.monotonic`; 0.0: not timed), returned
        at ``ended`` (default: now)."""
        if not started:
            return
        quick = (time.monotonic() if ended is None else ended) - started < HOLD_LIMIT_S
        try:
            if quick and handler in self.quick:  # (quick again: nothing changes, a service's usual run)
                return
            runs = self._runs
            if len(runs) >= _MAX_TIMED_HANDLERS:
                runs.clear()
                self.quick.clear()
            if quick:
                count = runs.get(handler, 0)
                if count < QUICK_RUNS:
                    runs[handler] = count + 1
                    if count + 1 == QUICK_RUNS:
                        self.quick.add(handler)
            else:
                runs[handler] = 0
                self.quick.discard(handler)
        except TypeError:  # an unhashable callable: never held for
            pass
