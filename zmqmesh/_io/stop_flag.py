"""A stop flag that signal handlers may raise, and that a thread waits on without polling.

``threading.Event.set()`` takes the event's lock, and ``Event.wait()`` holds that same lock
for a moment on every call: a SIGTERM handler that sets an event the main thread waits on
can land in that moment and wait for the lock forever (the handler runs on the thread that
holds it). `StopFlag.set` takes no lock: it marks the flag and writes a byte to a pipe
whose other end `StopFlag.wait` sleeps on, so a wait wakes at once and costs nothing
meanwhile (a flag polled 20 times a second kept every idle node waking up).
"""

from __future__ import annotations

import math
import os
import select
import time
import weakref

__all__ = ["StopFlag"]

_LONGEST_MS = 3_600_000  # one poll at most (an hour): poll() takes a C int of milliseconds


def _close_pipe(read_end: int, write_end: int) -> None:
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


class StopFlag:
    """A flag raised once, from a signal handler or any thread, and waited on by a thread
    of the same process: ``signal.signal(signal.SIGTERM, flag.set)``, then
    ``flag.wait()``. It holds a pipe (two file descriptors) until it is garbage collected.
    """

    def __init__(self) -> None:
        self._raised = False
        self._open_pipe()

    def _open_pipe(self) -> None:
        self._pid = os.getpid()
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._read_end, False)
        os.set_blocking(self._write_end, False)
        weakref.finalize(self, _close_pipe, self._read_end, self._write_end)
        self._poller = select.poll()  # (not select.select: a descriptor past 1023 is common with ZeroMQ)
        self._poller.register(self._read_end, select.POLLIN)

    def set(self, *_signal: object) -> None:
        """Raise the flag and wake its waiter (usable as a signal handler as it is: it takes
        no lock). Never raises."""
        self._raised = True
        if os.getpid() != self._pid:  # a forked child: the pipe is its parent's
            self._open_pipe()
        try:
            os.write(self._write_end, b"\0")
        except OSError:  # full: a wake is already waiting
            pass

    def is_set(self) -> bool:
        """Whether the flag was raised."""
        return self._raised

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once the flag is raised, or False after ``timeout`` seconds (None or
        infinity: no limit; NaN, like 0, looks once). Raises `TypeError` for a timeout that
        is not a number."""
        if timeout is not None and not timeout >= 0:  # (NaN: no wait, as threading.Event's)
            timeout = 0.0
        deadline = None if timeout is None or math.isinf(timeout) else time.monotonic() + timeout
        while not self._raised:
            if os.getpid() != self._pid:
                self._open_pipe()
            left_ms = _LONGEST_MS if deadline is None else min(math.ceil((deadline - time.monotonic()) * 1000),
                                                                _LONGEST_MS)
            if left_ms <= 0:
                return self._raised
            if self._poller.poll(left_ms):  # (a signal handler's wake ends it too: PEP 475)
                try:
                    os.read(self._read_end, 64)  # (a stray byte, e.g. from a forked child, is let go)
                except OSError:
                    pass
        return True
