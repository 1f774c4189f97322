"""Live frames of senders not known yet, waiting for their HELLO (`AwaitingHello`).

A publisher's HELLO says whether it keeps a history; a frame of it that came first,
delivered plainly at once, would come again in the replay of that history. So it waits,
bounded: for `UNKNOWN_WAIT_S` at most, for at most `MAX_UNKNOWN` senders, `MAX_HELD`
frames of one, and `UNKNOWN_MAX_BYTES` in all (`Replays.live` releases them).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection
from typing import Any

from .cursor import MAX_HELD

__all__ = ["MAX_UNKNOWN", "UNKNOWN_MAX_BYTES", "UNKNOWN_WAIT_S", "AwaitingHello", "Waiting"]

UNKNOWN_WAIT_S = 2.0
"""How long frames wait for their sender's HELLO."""
MAX_UNKNOWN = 1024
"""Senders whose frames may wait at once."""
UNKNOWN_MAX_BYTES = 64 << 20
"""Bytes of frames that wait for their senders' HELLO, in all: past it, the frames of the
sender whose frame took them past it go at once (as those of a sender waited for long
enough). A stranger that sent 1 MB frames under an id no HELLO names grew a node with a
replaying subscription by 2.2 GiB in 4 s, where the count of frames alone bounded them."""

Waiting = tuple[Any, ...]
"""A frame as `Replays.live` was given it: (topic, seq, items, origin, subscriptions, meta, size)."""


class AwaitingHello:
    """The frames of senders not known yet, per sender, in the order they came."""

    def __init__(self) -> None:
        self._frames: dict[str, tuple[float, deque[Waiting]]] = {}  # sender id -> (first seen, frames)
        self.bytes = 0
        """The bytes of the frames waiting (`UNKNOWN_MAX_BYTES`)."""

    def __bool__(self) -> bool:
        return bool(self._frames)

    def __contains__(self, sender_id: object) -> bool:
        return sender_id in self._frames

    def add(self, sender_id: str, frame: Waiting, size: int) -> bool:
        """Let ``frame`` (of ``size`` bytes) wait, behind those of its sender; True if that
        took them past a bound (`MAX_HELD` frames of the sender, `MAX_UNKNOWN` senders,
        `UNKNOWN_MAX_BYTES`): the sender's frames are then to go at once."""
        frames = self._frames.setdefault(sender_id, (time.monotonic(), deque()))[1]
        frames.append(frame)
        self.bytes += size
        return len(frames) > MAX_HELD or len(self._frames) > MAX_UNKNOWN or self.bytes > UNKNOWN_MAX_BYTES

    def release(self, known: Collection[str], now_for: str | None = None) -> list[tuple[str, deque[Waiting]]]:
        """Take out the frames of the senders now ``known``, of those waited for long enough
        (`UNKNOWN_WAIT_S`), and of ``now_for``: per sender, in order."""
        deadline = time.monotonic() - UNKNOWN_WAIT_S
        released = []
        for sender_id, (since, frames) in list(self._frames.items()):
            if sender_id == now_for or sender_id in known or since < deadline:
                del self._frames[sender_id]
                self.bytes -= sum(frame[-1] for frame in frames)
                released.append((sender_id, frames))
        return released
