"""Waking a thread that sleeps in a poll, from any thread."""

from __future__ import annotations

import os
import threading

__all__ = ["Waker"]


class Waker:
    """A pipe: any thread calls `wake`; the owner polls `fd` (ZeroMQ's poll takes it as a
    plain descriptor) and, once it saw it readable, calls `clear`. Wakes that come before
    `clear` are one.

    A pipe rather than a pair of ZeroMQ sockets: a ZeroMQ poll reads the events of every
    ZeroMQ socket it is given, before it sleeps and again after (two system calls each),
    and a plain descriptor costs it none of that.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._woken = False
        self._closed = False

    @property
    def fd(self) -> int:
        """The descriptor to poll for reading (-1 once closed)."""
        return self._read

    def wake(self) -> None:
        """Make `fd` readable, unless it already is or the waker is closed."""
        with self._lock:
            if self._woken or self._closed:
                return
            self._woken = True
            try:
                os.write(self._write, b"\0")
            except OSError:  # (full: it is readable anyway)
                pass

    def clear(self) -> None:
        """Take the wake (owner's thread): the next `wake` signals again."""
        with self._lock:
            self._woken = False
            try:
                while os.read(self._read, 4096):
                    pass
            except OSError:  # (BlockingIOError: emptied)
                pass

    def close_sender(self) -> None:
        """Stop taking wakes (any thread)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._write)

    def close(self) -> None:
        """Close the pipe (the owner, once it no longer polls)."""
        self.close_sender()
        with self._lock:
            if self._read >= 0:
                os.close(self._read)
                self._read = -1
