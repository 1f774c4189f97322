"""Waking a thread that sleeps in a ZeroMQ poll, from any thread."""

from __future__ import annotations

import threading
from typing import Any

import zmq

from .sockets import new_socket

__all__ = ["Waker"]


class Waker:
    """A pair of inproc sockets: any thread calls `wake`; the owner polls `socket` and,
    once it saw it readable, calls `clear`. Wakes that come before `clear` are one."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.socket = new_socket(ctx, zmq.PAIR)
        self.socket.bind(endpoint)
        self._send = new_socket(ctx, zmq.PAIR)
        self._send.connect(endpoint)
        self._lock = threading.Lock()
        self._woken = False

    def wake(self) -> None:
        """Make `socket` readable, unless it already is or the waker is closed."""
        with self._lock:
            if self._woken or self._send.closed:
                return
            self._woken = True
            try:
                self._send.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def clear(self) -> None:
        """Take the wake (owner's thread): the next `wake` signals again."""
        with self._lock:
            self._woken = False
            while True:
                try:
                    self.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break

    def close_sender(self) -> None:
        """Stop taking wakes (any thread)."""
        with self._lock:
            self._send.close(0)

    def close(self) -> None:
        """Close both sockets (the owner, once it no longer polls)."""
        self.close_sender()
        self.socket.close(0)
