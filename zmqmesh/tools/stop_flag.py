"""A stop flag that signal handlers may raise.

``threading.Event.set()`` takes the event's lock, and ``Event.wait()`` holds that same lock
for a moment on every call: a SIGTERM handler that sets an event the main thread waits on
can land in that moment and wait for the lock forever (the handler runs on the thread that
holds it). `StopFlag` is raised by a plain assignment and waited on by polling.
"""

from __future__ import annotations

import time

__all__ = ["StopFlag"]

_SLICE_S = 0.05


class StopFlag:
    """Raised once, from a signal handler or any thread; waited on by the main thread."""

    def __init__(self) -> None:
        self._raised = False

    def set(self, *_signal: object) -> None:
        """Raise the flag (usable as a signal handler as it is: it takes no lock)."""
        self._raised = True

    def is_set(self) -> bool:
        """Whether the flag was raised."""
        return self._raised

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once the flag is raised (checked every 50 ms), or False after
        ``timeout`` seconds (None: no limit; NaN, like 0, looks once)."""
        if timeout is not None and not timeout >= 0:  # (NaN: no wait, as threading.Event's)
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._raised:
            left = _SLICE_S if deadline is None else min(_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True
