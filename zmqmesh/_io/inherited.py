"""The TCP ports this process's nodes listen on, let go in a child forked while they do.

A forked child gets a copy of every descriptor, ZeroMQ's sockets among them (though none of
ZeroMQ's threads, which alone use them): its copies of a node's listening sockets, and of
the connections peers made to them, stay open for as long as it lives. A node restarted on
a fixed port (``mailbox_port``, ``metrics_port``) could not bind it meanwhile, and peers'
connections to a node that died stayed open. So the child points its copies of the sockets
on those ports at /dev/null (not closed: their numbers stay taken, so a socket object the
child inherited closes nothing else). Linux only (the descriptors are read from
/proc/self/fd); elsewhere nothing is done.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections import Counter
from collections.abc import Iterable

__all__ = ["hold", "let_go", "point_at_null"]

_HELD: Counter[int] = Counter()  # port -> how many of this process's nodes listen on it
_HELD_LOCK = threading.Lock()  # (nodes start and stop on any thread)


def hold(ports: Iterable[int]) -> None:
    """Record ``ports`` as listened on by a node of this process, to be let go in a child
    forked while they are; `let_go` them when the node closed its sockets. Never raises."""
    with _HELD_LOCK:
        _HELD.update(ports)


def let_go(ports: Iterable[int]) -> None:
    """The node listening on ``ports`` (as given to `hold`) closed its sockets. Never raises."""
    with _HELD_LOCK:
        _HELD.subtract(ports)
        for port in [p for p, n in _HELD.items() if n <= 0]:
            del _HELD[port]


def _held_by(fd: int, ports: set[int]) -> bool:
    """Whether the descriptor ``fd`` is a TCP socket on one of ``ports``: listening on it,
    or a connection a peer made to it."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):
        return False
    try:
        return (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] in ports)
    except OSError:
        return False
    finally:
        sock.detach()  # (the descriptor is not this object's to close)


def _let_go_in_child() -> None:
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # (a parent's thread may have held it at the fork)
    if not _HELD:
        return
    ports = set(_HELD)
    _HELD.clear()
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        return
    point_at_null([fd for fd in descriptors if _held_by(fd, ports)])


def point_at_null(descriptors: Iterable[int]) -> None:
    """Point each of ``descriptors`` at /dev/null: what it referred to is let go by this
    process, but its number stays taken, so whatever object holds it closes nothing else
    later (for a child's copies of what its parent holds). Never raises."""
    descriptors = list(descriptors)
    if not descriptors:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    for fd in descriptors:
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass
    os.close(null)


os.register_at_fork(after_in_child=_let_go_in_child)
