"""Small helpers for the edge-triggered ZeroMQ descriptors the event loops watch."""

from __future__ import annotations

from typing import Any, cast

import zmq

__all__ = ["has_input"]


def has_input(sock: zmq.Socket[Any]) -> bool:
    """True if ``sock`` has a message waiting now.

    ZeroMQ's descriptor only signals changes, and sending on a socket can swallow the
    signal of a message that arrived meanwhile: callers check this after sending.
    """
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def close_watched(loop: Any, sock: zmq.Socket[Any], linger_ms: int = 0) -> None:
    """Stop watching ``sock``'s descriptor on ``loop`` and close it (idempotent)."""
    if sock.closed:
        return
    try:
        loop.remove_reader(sock.FD)
    except Exception:  # not watched, or the loop is closed
        pass
    sock.close(linger_ms)
