"""The event callbacks a node's loop hands its inbox (a peer joined or left, a WHISPER or
a SHOUT came), waiting to run in order with its messages; bounded where a peer can make
them grow.

A join or a leave is never dropped alone, but a stranger can come and go again and
again (a HELLO and a GOODBYE, over one connection or fresh ones), each time with up to a
MiB of groups: a peer's leave withdraws its join still waiting, and neither is called
(counted in ``zre.unseen_peers``). So the joins waiting are at most the peers present,
and the leaves those of peers whose joins were taken. WHISPERs and SHOUTs come at a
peer's rate: past a backlog of ``recv_hwm`` callbacks or about `_EVENT_BYTES` of frames
(twice ``max_message_bytes`` if larger), they are dropped, counted in ``zre.dropped``
and logged at most every `_LOST_LOG_S`.
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
        self._lock = threading.Lock()  # (``event_bytes``, the joins waiting: posted on the loop's thread, taken on the owner's)
        self._lost_log = LogThrottle(_LOST_LOG_S)  # (`post`: the loop's thread)
        self._joins_waiting: dict[str, list[Call]] = {}  # peer id -> its join's callbacks in ``events``

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

    def post_peer_event(self, joined: bool, peer_id: str, calls: list[Call]) -> bool:
        """Queue the callbacks of a peer's join (``joined``) or leave (``calls``: one per
        handler, none if there are none); False if nothing was queued: no handler, or a
        leave that withdrew the join of the same peer still waiting (neither is called
        then; counted in ``zre.unseen_peers``)."""
        with self._lock:  # (`take`, on the owner's thread, must not run between the look and the change)
            if joined:
                if calls:
                    self._joins_waiting[peer_id] = calls
            else:
                waiting = self._joins_waiting.pop(peer_id, None)
                if waiting is not None:
                    self._withdraw(waiting)
                    self.stats.add("zre", "unseen_peers")
                    return False
            if not calls:
                return False
            self.events.extend(calls)
            return True

    def _withdraw(self, calls: list[Call]) -> None:
        """Take ``calls``, queued together, out of ``events``: looked for from the newest
        end, where a peer that came and went at once has its join. (With ``_lock`` held.)"""
        events = self.events
        for at_end, call in enumerate(reversed(events)):
            if call is calls[-1]:
                first = len(events) - at_end - len(calls)
                for _ in calls:
                    del events[first]
                return

    def take(self, calls: list[Call]) -> None:
        """Move every callback waiting into ``calls``, in order."""
        # (under the lock: a join taken here is no longer waiting, so that its peer's leave,
        # posted meanwhile on the loop's thread, is queued, not taken for one withdrawing it)
        with self._lock:
            self._joins_waiting.clear()
            events = self.events
            while events:
                call = events.popleft()
                if isinstance(call.arg, Message) and call.arg.pattern in ("whisper", "shout"):
                    self.event_bytes -= sum(len(f) for f in call.arg.data)
                calls.append(call)
