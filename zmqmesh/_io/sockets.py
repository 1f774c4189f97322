"""Socket helpers: options set in one place, and the edge-triggered descriptors the loops watch."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import zmq

from .._stats import LogThrottle

__all__ = ["MAX_LINGER_MS", "new_socket", "has_input", "input_probe", "with_input", "can_send", "recv_frames", "recv_routed",
           "send_frames", "send_tracked",
           "close_watched", "reconnect", "PeerConnections", "CONTROL_HWM", "LISTEN_BACKLOG"]

T = TypeVar("T")

CONTROL_HWM = 100_000
"""The high-water mark of what carries control rather than data: the membership links and
mailbox (HELLOs, a JOIN per group, WHISPERs) and the subscriptions a SUB sends its XPUBs.
ZeroMQ drops a subscription that finds its pipe full, and a peer's offers arrive all at
once (up to 2,000 each); what they carry is bounded elsewhere (offers, groups, peers).
The data directions use ``send_hwm`` / ``recv_hwm`` (``pub_hwm`` for publishing, when given;
``queue_hwm`` for push/pull)."""

LISTEN_BACKLOG = 1024
"""Connections a bound socket keeps waiting to be accepted (ZeroMQ's default is 100; the
kernel caps it at ``net.core.somaxconn``). When a node starts, every peer of the mesh
connects to its mailbox at once: past 100 waiting, the kernel dropped the rest, and TCP
tried them again only a second later (a newcomer to a mesh of 127 nodes then met its last
peers 1.1 s after its start, against 0.25 s). As many as the peers a node keeps (1,024)."""

log = logging.getLogger("zmqmesh.sockets")

# plain ints: pyzmq's flag enums cost a Python-level operation each time they are combined
_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
# the backend's own send and recv: `zmq.Socket` (pyzmq's "sugar") wraps each to accept
# routing ids, groups and copy thresholds, which the frames of a node never use
_send: Any = zmq.backend.Socket.send
_recv: Any = zmq.backend.Socket.recv
_COPY_THRESHOLD = zmq.COPY_THRESHOLD  # (pyzmq's: below it, a frame sent uncopied is copied all the same)
# ``zmq_poll`` with no wait reads ``ZMQ_EVENTS`` in C; ``Socket.get`` looks the option up in
# an enum in Python first (1.9 against 2.8 us a check here)
_poll: Any = zmq.zmq_poll


def new_socket(ctx: zmq.Context[Any], kind: int, options: Mapping[int, int | bytes] | None = None) -> zmq.Socket[Any]:
    """A socket of ``kind`` with LINGER 0 and then ``options`` applied, before any bind or connect.

    Every socket of a node is made here, so its options are set in one place. A caller
    that wants a linger at close passes it to `close_watched` or ``close``.
    """
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    return sock


def has_input(sock: zmq.Socket[Any]) -> bool:
    """True if ``sock`` has a message waiting now.

    ZeroMQ's descriptor only signals changes, and sending on a socket can swallow the
    signal of a message that arrived meanwhile: callers check this after sending.
    """
    return bool(_poll([(sock, _POLLIN)], 0))


def input_probe(sock: zmq.Socket[Any]) -> Callable[[], list[Any]]:
    """`has_input` for ``sock``, made once: a call that returns a non-empty list if a message
    waits now (the same ``zmq_poll``, its argument built once and no Python frame per look:
    for a socket looked at after every message it answers)."""
    return functools.partial(_poll, [(sock, _POLLIN)], 0)


def with_input(pairs: Sequence[tuple[zmq.Socket[Any], T]]) -> list[tuple[zmq.Socket[Any], T]]:
    """The ``(socket, tag)`` pairs whose socket has a message waiting now: one ``zmq_poll``
    for them all, where receiving from an empty socket raises `zmq.Again` (a Python
    exception each). Reading ``ZMQ_EVENTS`` rearms every socket's descriptor."""
    ready = _poll([(sock, _POLLIN) for sock, _ in pairs], 0)
    if not ready:
        return []
    found = {id(sock) for sock, _event in ready}
    return [pair for pair in pairs if id(pair[0]) in found]


def can_send(sock: zmq.Socket[Any]) -> bool:
    """True if ``sock`` takes a message now. Reading ``ZMQ_EVENTS`` also rearms its descriptor."""
    return bool(_poll([(sock, _POLLOUT)], 0))


def recv_frames(sock: zmq.Socket[Any], views_from: int = 0, wait: bool = False) -> list[bytes]:
    """Receive one whole message without blocking; raises `zmq.Again` if none is waiting.
    With ``wait``, waits for one up to the socket's ``RCVTIMEO`` (the GIL released
    meanwhile), then raises `zmq.Again`.

    ``recv_multipart(NOBLOCK)`` at about two thirds of its cost: each frame is taken as a
    `zmq.Frame`, whose ``more`` is read off the frame itself, where reading ``RCVMORE``
    from the socket costs a whole option lookup per frame. (The frames after the first
    of a message are always there: ZeroMQ delivers it whole.) With ``views_from``, a
    frame of that many bytes or more comes as a `memoryview` of ZeroMQ's own buffer instead
    of a copy (it keeps that buffer alive while referenced; callers must not write to it).

    A thread that waits for one socket's message makes fewer system calls with ``wait``
    than with a poll and then a receive (a poll reads ``ZMQ_EVENTS`` before it waits and
    after; ZeroMQ's own receive waits on the socket's mailbox alone): a blocking request's
    process, 5 ``poll`` calls a round trip instead of 8.
    """
    frame = _recv(sock, 0 if wait else _NOBLOCK, False)
    frames = [frame.buffer if views_from and len(frame) >= views_from else frame.bytes]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame.buffer if views_from and len(frame) >= views_from else frame.bytes)
    return frames


def recv_routed(sock: zmq.Socket[Any]) -> list[bytes]:
    """`recv_frames` for a ROUTER socket (without blocking, no views): the routing id ZeroMQ
    puts before every message it hands a ROUTER is never the message's last frame, so it
    is taken as ``bytes`` at once, without a `zmq.Frame` made to ask (a compact request's
    two frames: one `zmq.Frame` instead of two, 5,300 instructions less of a provider's
    72,700 per request). Raises `zmq.Again` if no message is waiting."""
    frames = [_recv(sock, _NOBLOCK, True)]
    frame = _recv(sock, _NOBLOCK, False)  # (there: ZeroMQ delivers a message whole)
    frames.append(frame.bytes)
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame.bytes)
    return frames


def send_frames(sock: zmq.Socket[Any], frames: list[bytes], copy: bool = True) -> None:
    """Send ``frames`` as one message without blocking; raises `zmq.Again` if it cannot go now.

    What ``send_multipart(frames, NOBLOCK)`` does, at under half the cost: pyzmq combines
    its flag enums in Python on every frame, and its ``send`` looks for options that plain
    ``bytes`` never use, which a request's round trip pays for every frame; this calls
    the backend's ``send`` with plain ints. ZeroMQ takes a multipart message whole or
    not at all, so only the first frame can fail.

    With ``copy=False`` the frames of pyzmq's copy threshold (64 KiB) or more go uncopied
    (ZeroMQ keeps a reference until they are sent: the caller must not change them
    meanwhile), and the smaller ones beside them are copied: pyzmq would copy them
    anyway, after looking at their size, at about half as much again as a copy costs.
    """
    sent = 0  # (counted before each send: an exception raised as one returns finds it counted)
    try:
        if copy:
            if len(frames) == 1:  # (a request in one frame: nothing to finish)
                _send(sock, frames[0], _NOBLOCK, True)
                return
            if len(frames) == 2:  # (a routed reply, a request: no slice of the list, no loop)
                sent = 1
                _send(sock, frames[0], _MORE_NOBLOCK, True)
                sent = 2
                _send(sock, frames[1], _NOBLOCK, True)
                return
            for frame in frames[:-1]:
                sent += 1
                _send(sock, frame, _MORE_NOBLOCK, True)
            sent += 1
            _send(sock, frames[-1], _NOBLOCK, True)
            return
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            sent += 1
            _send(sock, frame, _MORE_NOBLOCK if i < last else _NOBLOCK, len(frame) < _COPY_THRESHOLD)
    except zmq.ZMQError:  # (the first frame's: nothing went)
        raise
    except BaseException:
        # raised between two frames (a signal's KeyboardInterrupt, in the main thread): the
        # message is finished, or the socket's next one would be sent onto its end
        if 0 < sent < len(frames):
            for frame in frames[sent:-1]:
                _send(sock, frame, _MORE_NOBLOCK, True)
            _send(sock, frames[-1], _NOBLOCK, True)
        raise


def send_tracked(sock: zmq.Socket[Any], frames: list[bytes]) -> zmq.MessageTracker:
    """Send ``frames`` as one message without blocking, the last one uncopied (the caller
    must not change it), and return the tracker that tells when ZeroMQ let go of it:
    written out, or dropped with its connection. Raises `zmq.Again` if it cannot go now."""
    for frame in frames[:-1]:
        _send(sock, frame, _MORE_NOBLOCK, True)
    tracker: zmq.MessageTracker = _send(sock, frames[-1], _NOBLOCK, False, True)
    return tracker


MAX_LINGER_MS = 2**31 - 1
"""The longest linger ZeroMQ takes (a C ``int`` of milliseconds: some 24.8 days; ``linger_s``
may be longer)."""


def close_watched(loop: Any, sock: zmq.Socket[Any], linger_ms: int = 0) -> None:
    """Stop watching ``sock``'s descriptor on ``loop`` and close it (idempotent); what it
    holds may go out for ``linger_ms`` (at most `MAX_LINGER_MS`)."""
    if sock.closed:
        return
    try:
        loop.remove_reader(sock.FD)
    except Exception:  # not watched, or the loop is closed
        pass
    sock.close(min(linger_ms, MAX_LINGER_MS))


def reconnect(sock: zmq.Socket[Any], connected: dict[str, str | None], wanted: Mapping[str, str | None],
              connect: Callable[[zmq.Socket[Any], str, str | None], None],
              linger_ms: Callable[[str], int] | None = None) -> None:
    """Make ``sock`` connected to exactly the ``wanted`` endpoints, each with its CURVE key
    (endpoint -> key).

    ``connected`` is the caller's record of what ``sock`` is connected to, and with which
    key; it is updated. An endpoint connected with another key than the one wanted (a node
    restarted there with new keys while the record of the one before lasted) is connected
    anew: kept, the connection would fail its handshake with the node there for good.
    An endpoint that cannot be connected is logged and left out (tried again next time).
    A connection let go drops what ZeroMQ still holds for it, unless ``linger_ms`` gives
    its endpoint a linger (not one connected anew): it then sends that on for up to so many
    milliseconds (the linger a disconnect takes is the socket's at that moment; at most
    `MAX_LINGER_MS`).
    """
    for endpoint in [e for e, key in connected.items() if e not in wanted or wanted[e] != key]:
        linger = min(linger_ms(endpoint), MAX_LINGER_MS) if linger_ms is not None and endpoint not in wanted else 0
        try:
            if linger:
                sock.setsockopt(zmq.LINGER, linger)
            try:
                sock.disconnect(endpoint)
            finally:
                if linger:
                    sock.setsockopt(zmq.LINGER, 0)
        except zmq.ZMQError:
            pass
        del connected[endpoint]
    for endpoint, key in wanted.items():
        if endpoint in connected:
            continue
        try:
            connect(sock, endpoint, key)
            connected[endpoint] = key
        except zmq.ZMQError as exc:
            log.warning("cannot connect to %s: %s", endpoint, exc)


class PeerConnections:
    """One socket's connections to some peers' endpoints, kept in step peer by peer: `update`
    is told of the peers whose target (endpoint and CURVE key) may have changed, and
    connects or disconnects only what their change asks (see `reconnect`; ``linger_ms`` as
    there). An endpoint two peers announce (a node restarted at its ghost's port) is
    connected with the key of the one that came to it last: the caller tells of the peers
    in the order they joined (`Directory.in_joined_order`).

    ``reached``: peer id -> its endpoint and key, as last told (connected, or `unreached`);
    ``connected``: endpoint -> the key it is connected with; ``unreached``: the ids whose
    endpoint could not be connected (the caller tells of them again, at its next update).
    """

    def __init__(self, sock: zmq.Socket[Any], connect: Callable[[zmq.Socket[Any], str, str | None], None],
                 linger_ms: Callable[[str], int] | None = None) -> None:
        self.sock = sock
        self.connect = connect
        self.linger_ms = linger_ms
        self.connected: dict[str, str | None] = {}
        self.reached: dict[str, tuple[str, str | None]] = {}
        self.unreached: set[str] = set()
        self._users: dict[str, dict[str, None]] = {}  # endpoint -> the ids of `reached` there, as they came
        self._failed_log = LogThrottle(10.0)  # (`update_from`: peers whose target could not be worked out)

    def update_from(self, ids: Iterable[str], target_of: Callable[[str], tuple[str, str | None] | None]) -> None:
        """`update` with the peers ``ids`` (in the order they joined), each at its target
        ``target_of(id)``. A peer whose target cannot be worked out (``target_of`` raised: a
        bug, logged at most every 10 s) stays as it was and is counted `unreached`, told of
        again at the next update; the others are connected meanwhile."""
        targets: dict[str, tuple[str, str | None] | None] = {}
        failed: list[str] = []
        for node_id in ids:
            try:
                targets[node_id] = target_of(node_id)
            except Exception:
                failed.append(node_id)
                said = self._failed_log.due()
                if said:
                    log.error("cannot work out where to connect peer %s (%d such since the last line): left as it "
                              "was, tried again at the next change", node_id[:8], said, exc_info=True)
        self.update(targets)
        self.unreached.update(failed)

    def update(self, targets: Mapping[str, tuple[str, str | None] | None]) -> None:
        """Connect to each peer of ``targets`` (id -> its endpoint and key now, None: not to be
        reached), and no longer to what those of them were reached at before; the peers not
        in ``targets`` stay as they are."""
        concerned: set[str] = set()  # the endpoints of those peers, before and now
        for node_id, target in targets.items():
            old = self.reached.pop(node_id, None)
            if old is not None:
                concerned.add(old[0])
                if target is None or target[0] != old[0]:
                    users = self._users[old[0]]
                    del users[node_id]
                    if not users:
                        del self._users[old[0]]
            if target is not None:
                concerned.add(target[0])
                self.reached[node_id] = target
                self._users.setdefault(target[0], {})[node_id] = None  # (one there already keeps its place)
        wanted = {e: self.reached[next(reversed(self._users[e]))][1] for e in concerned if e in self._users}
        connected = {e: self.connected.pop(e) for e in concerned if e in self.connected}
        reconnect(self.sock, connected, wanted, self.connect, self.linger_ms)
        self.connected.update(connected)
        self.unreached = {i for e in wanted if e not in connected for i in self._users[e]} | \
            (self.unreached - targets.keys())
