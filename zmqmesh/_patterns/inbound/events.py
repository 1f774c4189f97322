"""The event callbacks a node's loop hands its inbox (a peer joined or left, a WHISPER or
a SHOUT came), waiting to run in order with its messages; bounded where a peer can make
them grow.

A peer makes only one join and one leave at a time: those are never dropped. WHISPERs and
SHOUTs come at a peer's rate: past a backlog of ``recv_hwm`` callbacks or about
`_EVENT_BYTES` of frames (twice ``max_message_bytes`` if larger), they are dropped,
counted in ``zre.dropped`` and logged at most every `_LOST_LOG_S`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from ..._stats import LogThrottle, Stats
from ...config import NodeConfig
from ...message import Message
from ..calls import Call

__all__ = ["EventCallbacks"]

log = logging.getLogger("zmqmesh.inbox")

_EVENT_BYTES = 64 * 1024 * 1024
_LOST_LOG_S = 10.0  # WHISPERs and SHOUTs dropped past the bounds are logged at most this often


class EventCallbacks:
    """Event callbacks posted (the loop's thread) and not yet taken (the inbox's owner
    thread), in order; ``events`` holds them."""

    def __init__(self, config: NodeConfig, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self.events: deque[Call] = deque()
        self.event_bytes = 0
        """The bytes of the WHISPER and SHOUT frames waiting in ``events``."""
        self._lock = threading.Lock()  # (``event_bytes``: posted on the loop's thread, taken on the owner's)
        self._lost_log = LogThrottle(_LOST_LOG_S)  # (`post`: the loop's thread)

    def post(self, calls: list[Call]) -> bool:
        """Queue the callbacks of one event (``calls``: one per handler); False if it was
        a WHISPER or SHOUT past the bounds, dropped, counted and logged instead."""
        if calls and isinstance(calls[0].arg, Message) and calls[0].arg.pattern in ("whisper", "shout"):
            size = sum(len(f) for f in calls[0].arg.data)
            most_bytes = max(_EVENT_BYTES, 2 * self.config.max_message_bytes)
            if len(self.events) >= self.config.recv_hwm or self.event_bytes + size > most_bytes:
                self.stats.add("zre", "dropped", len(calls))
                said = self._lost_log.due(len(calls))
                if said:
                    log.warning("%d WHISPER or SHOUT callback(s) dropped since the last such line: their handlers "
                                "fell behind (recv_hwm=%d events or %d bytes waiting); counted in zre.dropped; "
                                "said again at most every %g s", said, self.config.recv_hwm, most_bytes, _LOST_LOG_S)
                return False
            with self._lock:
                self.event_bytes += size * len(calls)
        self.events.extend(calls)
        return True

    def take(self, calls: list[Call]) -> None:
        """Move every callback waiting into ``calls``, in order."""
        events = self.events
        while events:
            call = events.popleft()
            if isinstance(call.arg, Message) and call.arg.pattern in ("whisper", "shout"):
                with self._lock:
                    self.event_bytes -= sum(len(f) for f in call.arg.data)
            calls.append(call)
