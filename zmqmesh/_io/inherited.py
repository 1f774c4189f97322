"""The TCP ports this process's nodes listen on, let go in a child forked while they do.

A forked child gets a copy of every descriptor, ZeroMQ's sockets among them (though none of
ZeroMQ's threads, which alone use them): its copies of a node's listening sockets, and of
the connections peers made to them, stay open for as long as it lives. A node restarted on
a fixed port (``mailbox_port``, ``metrics_port``) could not bind it meanwhile, and peers'
connections to a node that died stayed open. So the child points its copies of the sockets
at those addresses and ports at /dev/null (not closed: their numbers stay taken, so a
socket object the child inherited closes nothing else). A socket of the program's own on
such a port number at another address (a listener, an outbound connection's local port)
is kept. Linux only (the descriptors are read from /proc/self/fd); elsewhere nothing is
done.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections import Counter
from collections.abc import Iterable

__all__ = ["hold", "let_go", "point_at_null"]

_ANY = ""  # (the address of a socket listening on every address: `_address`)
_MAPPED = bytes(10) + b"\xff\xff"  # (the first 12 bytes of an IPv4-mapped IPv6 address)
_HELD: Counter[tuple[str, int]] = Counter()  # (address, port) -> how many of this process's nodes listen there
_HELD_LOCK = threading.Lock()  # (nodes start and stop on any thread)


def _address(host: str) -> str:
    """``host`` (an address as a socket or ZeroMQ names it) in one form: IPv4 for an
    IPv4-mapped IPv6 address, `_ANY` for every address (``0.0.0.0``, ``::``); as it is if
    it is not an address. (``socket``'s own parsers: ``ipaddress`` would cost every node's
    start its import.)"""
    text = host.strip("[]").split("%", 1)[0]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, text)
        except (OSError, ValueError):
            continue
        if family == socket.AF_INET6 and packed[:12] == _MAPPED:
            family, packed = socket.AF_INET, packed[12:]
        return _ANY if not any(packed) else socket.inet_ntop(family, packed)
    return host


def hold(listening: Iterable[tuple[str, int]]) -> None:
    """Record ``listening`` (address, port pairs) as listened on by a node of this process,
    to be let go in a child forked while they are; `let_go` them when the node closed its
    sockets. Never raises."""
    _change([(_address(host), port) for host, port in listening], +1)


def let_go(listening: Iterable[tuple[str, int]]) -> None:
    """The node listening at ``listening`` (as given to `hold`) closed its sockets. Never raises."""
    _change([(_address(host), port) for host, port in listening], -1)


def _change(places: list[tuple[str, int]], by: int) -> None:
    global _HELD
    with _HELD_LOCK:
        held = _HELD.copy()
        for place in places:
            held[place] += by
            if held[place] <= 0:
                del held[place]
        _HELD = held  # (whole: a child forked by another thread meanwhile sees the record before or after)


def _held_by(fd: int, held: set[tuple[str, int]]) -> bool:
    """Whether the descriptor ``fd`` is a TCP socket at one of ``held`` (address, port;
    `_ANY` for every address): listening there, or a connection a peer made to it."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):
        return False
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return False
        host, port = sock.getsockname()[:2]
        return (_address(host), port) in held or (_ANY, port) in held
    except OSError:
        return False
    finally:
        sock.detach()  # (the descriptor is not this object's to close)


def _let_go_in_child() -> None:
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # (a parent's thread may have held it at the fork)
    if not _HELD:
        return
    held = set(_HELD)
    _HELD.clear()
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        return
    point_at_null([fd for fd in descriptors if _held_by(fd, held)])


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
