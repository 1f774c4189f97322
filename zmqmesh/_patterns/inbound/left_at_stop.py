"""What a node's stop left unhandled: counted as dropped where it happens, tallied by
kind, and said in one log line when the stop reports.

A stop gives the inbox a timeout to handle what has arrived. What it could not handle
(calls reached after the deadline, handlers cut short, a handler refused by its stopping
node) and what peers sent after the last drain (read from the PULL and SUB sockets as
they close: `LeftAtStop.count_unread`) is counted in its pattern's ``dropped`` and named
in the stop's warning, by what becomes of it (dropped, delivered again, its caller told).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..._io.sockets import recv_frames
from ..._stats import Stats
from ..._wire.codec import Codec
from ..calls import BatchAck, CursorMark

__all__ = ["LeftAtStop"]

log = logging.getLogger("zmqmesh.inbox")

_UNREAD_FRAMES_MAX = 65_536
"""Frames a stopping node reads from its PULL and SUB sockets to count what it leaves
unhandled (bounded: a peer may still be sending)."""
_UNREAD_COUNT_S = 0.1  # ... whose messages it counts one by one for this long (decoding each frame)
_LATE_REPORT_S = 10.0
"""Least time between two lines for what handlers that outlived a stop left, while others
still run (the last to return reports at once; what one returning sooner left is
reported when that time is up, whether or not another returns by then)."""
_LEFT_AT_STOP = {
    "pushed": "pushed message(s) not handled, dropped",
    "at-least-once": "at-least-once message(s) not handled (delivered again, here or elsewhere)",
    "published": "publication(s) not handled, dropped",
    "durable-subscription": "publication(s) of durable subscriptions not handled (delivered again after a restart)",
    "requests": "request(s) not answered (their callers are told the provider left)",
    "requests cut short": "request(s) whose handler was cut short (their callers got NodeClosedError)",
}


def _left_kind(pattern: str, route: Any) -> str:
    """Under which of `_LEFT_AT_STOP`'s kinds a message of ``pattern`` with ``route`` a stop
    left unhandled is named."""
    if pattern == "service":
        return "requests"
    if pattern == "pubsub":
        return "durable-subscription" if isinstance(route, CursorMark) else "published"
    return "at-least-once" if isinstance(route, BatchAck) else "pushed"


def _items_in(codec: Codec, frames: list[bytes]) -> int:
    """How many messages a frame of a stream carries (one, if it cannot be read)."""
    if len(frames) not in (3, 4) or (not frames[2] and len(frames) == 4):
        return 1
    try:
        return len(codec.decode_batch(frames[2]))
    except Exception:
        return 1


class LeftAtStop:
    """The tally of what a stop left unhandled, by kind, and its log line (the inbox's
    owner thread, or once the owner is done). ``abandoned`` says whether the stop's
    deadline passed (then the line is a warning, whatever was left)."""

    def __init__(self, stats: Stats, abandoned: Callable[[], bool]) -> None:
        self.stats = stats
        self.abandoned = abandoned
        self._counts: dict[str, int] = {}  # by `_LEFT_AT_STOP`'s kinds, since the last report
        self.reported_as: str | None = None
        """The node's name, once `report` was called."""
        self._late_reported_at = float("-inf")
        self._late_lock = threading.Lock()  # (late reports come from the handlers' threads and a timer's)
        self._late_timer: threading.Timer | None = None  # the report due when `_LATE_REPORT_S` is up

    def count(self, pattern: str, route: Any, count: int, kind: str | None = None) -> None:
        """Count ``count`` messages of ``pattern`` a stop left unhandled: in the pattern's
        ``dropped``, and for the stop's line under ``kind`` (a key of `_LEFT_AT_STOP`; by
        default told from the pattern and ``route``: a `BatchAck` is at-least-once, a
        `CursorMark` a durable subscription's)."""
        self.stats.pattern[pattern]["dropped"] += count
        kind = kind or _left_kind(pattern, route)
        self._counts[kind] = self._counts.get(kind, 0) + count

    def report(self, name: str) -> None:
        """Log what the stop of node ``name`` left unhandled since the last report, if
        anything: a warning, or a line of information when all of it is publications that
        came after the last drain of a stop on time (a subscriber that leaves misses what
        is published as it goes)."""
        self.reported_as = name
        self._late_reported_at = time.monotonic()
        if self._counts:
            left, self._counts = self._counts, {}
            level = logging.WARNING if self.abandoned() or left.keys() - {"published"} else logging.INFO
            log.log(level, "node %s: the stop's timeout passed, or messages came after the last drain: %s", name,
                    "; ".join(f"{count} {_LEFT_AT_STOP[kind]}" for kind, count in left.items()))

    def report_late(self, last: bool = True) -> None:
        """If the stop already reported, log what was left since (by handlers that outlived
        it): now if this is the ``last`` of them, else at most once every `_LATE_REPORT_S`
        (one line for many, not one each; what is held back is logged when that time is
        up, even if no other handler returns by then); if the stop has not reported,
        nothing: its own report says it."""
        if self.reported_as is None:
            return
        with self._late_lock:
            due = self._late_reported_at + _LATE_REPORT_S
            now = time.monotonic()
            if not last and now < due:
                if self._late_timer is None:
                    self._late_timer = threading.Timer(due - now, self._report_due)
                    self._late_timer.daemon = True
                    self._late_timer.name = "zmqmesh-late-report"
                    self._late_timer.start()
                return
            if self._late_timer is not None:
                self._late_timer.cancel()
                self._late_timer = None
            self.report(self.reported_as)  # (which begins the next `_LATE_REPORT_S`)

    def _report_due(self) -> None:
        """The late report `report_late` held back, now that its time is up."""
        with self._late_lock:
            self._late_timer = None
            self.report(self.reported_as)  # type: ignore[arg-type]  # (set before a timer starts)

    def count_unread(self, pull: zmq.Socket[Any], sub: zmq.Socket[Any], codec: Codec,
                     durable_only: Callable[[list[bytes]], bool]) -> None:
        """Read what is still unread in the ``pull`` and ``sub`` sockets (peers sent it after
        the last drain, or the stop's timeout passed first) and count it as left: the
        messages of the frames read within `_UNREAD_COUNT_S` (decoded with ``codec``), then
        a frame as one (a lower bound); at most `_UNREAD_FRAMES_MAX` frames a socket. A
        publication whose topic only durable subscriptions take (``durable_only``) is named
        as theirs: it comes again after a restart. A socket that cannot be read (closed
        already) ends its count."""
        counting_until = time.monotonic() + _UNREAD_COUNT_S
        one_by_one = True
        for sock, pattern in ((pull, "pipeline"), (sub, "pubsub")):
            for i in range(_UNREAD_FRAMES_MAX):
                try:
                    frames = recv_frames(sock)
                except zmq.ZMQError:
                    break
                if one_by_one and i % 64 == 0 and time.monotonic() >= counting_until:
                    one_by_one = False
                self.count(pattern, None, _items_in(codec, frames) if one_by_one else 1,
                           "durable-subscription" if pattern == "pubsub" and durable_only(frames) else None)
