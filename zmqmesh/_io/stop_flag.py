"""A stop flag that signal handlers may raise, and that threads wait on without polling.

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

from ..errors import ArgumentTypeError

__all__ = ["StopFlag"]

_LONGEST_MS = 3_600_000  # one poll at most (an hour): poll() takes a C int of milliseconds

_LIVE: weakref.WeakSet[StopFlag] = weakref.WeakSet()


def _close_pipe(read_end: int, write_end: int) -> None:
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def _reopen_after_fork() -> None:
    # (in the child, while it has one thread: the inherited pipes are the parent's)
    for flag in list(_LIVE):
        flag._reopen()


os.register_at_fork(after_in_child=_reopen_after_fork)


class StopFlag:
    """A flag raised once, from a signal handler or any thread, and waited on by any
    number of threads of the same process: ``signal.signal(signal.SIGTERM, flag.set)``,
    then ``flag.wait()``. A child process made by ``fork`` gets a flag of its own, in
    the state it was in. It holds a pipe (two file descriptors) until it is garbage
    collected.
    """

    def __init__(self) -> None:
        self._raised = False
        self._open()
        _LIVE.add(self)

    def _open(self) -> None:
        self._pid = os.getpid()
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._read_end, False)
        os.set_blocking(self._write_end, False)
        # (not at exit: a signal handler may still raise the flag then, and a descriptor
        # closed early could by then be another file's)
        self._finalizer = weakref.finalize(self, _close_pipe, self._read_end, self._write_end)
        self._finalizer.atexit = False

    def _reopen(self) -> None:
        self._finalizer.detach()  # (its descriptors' numbers may be the new pipe's)
        _close_pipe(self._read_end, self._write_end)
        self._open()
        if self._raised:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._write_end, b"\0")
        except OSError:  # full: a wake is already waiting
            pass

    def set(self, *_signal: object) -> None:
        """Raise the flag and wake its waiters (usable as a signal handler as it is: it
        takes no lock). Never raises."""
        if not self._raised:
            self._raised = True
            if os.getpid() == self._pid:  # (in a child not yet past its fork hook, the pipe is
                self._wake()              # the parent's: the hook wakes the child's own instead)

    def is_set(self) -> bool:
        """Whether the flag was raised."""
        return self._raised

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once the flag is raised, or False after ``timeout`` seconds (None or
        infinity: no limit; NaN, like 0, looks once). Raises `ArgumentTypeError` (a
        ``TypeError``) for a timeout that is not a number."""
        if self._raised:
            return True
        try:
            negative = timeout is not None and not timeout >= 0  # (NaN: no wait, as threading.Event's)
        except TypeError as exc:
            raise ArgumentTypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}") \
                from exc
        if negative:
            timeout = 0.0
        deadline = None if timeout is None or math.isinf(timeout) else time.monotonic() + timeout
        # a poll object per call (one serves one thread at a time); poll, not select: beside
        # ZeroMQ, descriptors past 1023 are common
        poller = select.poll()
        poller.register(self._read_end, select.POLLIN)
        while not self._raised:
            left_ms = _LONGEST_MS if deadline is None else \
                math.ceil(min((deadline - time.monotonic()) * 1000, _LONGEST_MS))
            if left_ms <= 0:
                return self._raised
            # the byte `set` wrote stays in the pipe, so that every waiter wakes (a signal
            # handler's wake ends the poll too: PEP 475)
            if poller.poll(left_ms) and not self._raised:
                try:  # a byte without the flag raised (none is written so): never spin on it
                    os.read(self._read_end, 64)
                except OSError:
                    pass
        return True
