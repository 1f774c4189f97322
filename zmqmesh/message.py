"""What handlers and callers see: `Peer` (a member of the mesh) and `Message` (a delivery)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Peer", "Message"]


@dataclass(frozen=True)
class Peer:
    """A snapshot of one member of the mesh, as this node knows it.

    Attributes:
        id: the peer's ZRE UUID as 32 hex characters.
        name: the name the peer gave itself (not necessarily unique).
        address: the IP address the peer is reached at.
        endpoint: its ZRE mailbox endpoint (``tcp://address:port``).
        groups: the ZRE groups it is in (zmqmesh's own offers included).
        services / queues / topics: what it offers: services it answers, queues it
            pulls, topic prefixes it subscribes to (empty for plain ZRE peers).
        headers: the headers of its HELLO.
        last_seen: wall-clock time (``time.time()``) of the last traffic from it.
        is_zmqmesh: false for plain ZRE peers (pyre, zyre) that only whisper and shout.
    """

    id: str
    name: str
    address: str
    endpoint: str
    groups: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()
    queues: frozenset[str] = frozenset()
    topics: frozenset[str] = frozenset()
    headers: Mapping[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    is_zmqmesh: bool = True

    def __str__(self) -> str:
        return f"{self.name}({self.id[:8]})@{self.address}"


class Message:
    """One delivery to a handler.

    Attributes:
        pattern: ``"pubsub"``, ``"pipeline"``, ``"request"``, ``"whisper"`` or ``"shout"``.
        topic: the topic (pub/sub), queue (pipeline), service (request) or group (shout).
        data: the decoded payload; for whisper and shout, the list of raw frames.
        sender: the sending `Peer`, or ``None`` when the sender is not a known member
            (a bare ZeroMQ client, or a peer that already left).
        sender_id: the sender's id (hex) when the wire carried one, else ``None``.
        redelivered: on an at-least-once queue, True when an earlier delivery of this
            message may have been seen by another puller (it died, or did not acknowledge
            in time), or by this one (its handler raised).
        timestamp: the sender's wall-clock time (``time.time()``) when it sent the message,
            or ``None`` when the wire did not carry it.
        headers: string headers the sender attached (``headers=`` of `push`), empty by
            default; a dead letter carries ``x-original-queue``, ``x-attempts`` and
            ``x-last-error``.
        attempts: on a durable queue, how many deliveries of this message failed before
            this one (its handler raised, or did not return within ``ack_timeout_s``).
    """

    __slots__ = ("pattern", "topic", "data", "sender_id", "_lookup", "redelivered", "_id", "timestamp",
                 "headers", "attempts")

    def __init__(
        self,
        pattern: str,
        topic: str,
        data: Any,
        sender_id: str | None,
        lookup: Callable[[str], Peer | None] | None = None,
    ) -> None:
        self.pattern = pattern
        self.topic = topic
        self.data = data
        self.sender_id = sender_id
        self._lookup = lookup
        self.redelivered = False
        self._id: str | None = None
        self.timestamp: float | None = None
        self.headers: dict[str, str] = {}
        self.attempts = 0

    @property
    def id(self) -> str:
        """A unique id: on a durable queue, the one the pusher gave the message, the same on
        every delivery and across restarts; elsewhere one made here on first use."""
        if self._id is None:
            self._id = uuid.uuid4().hex
        return self._id

    @id.setter
    def id(self, value: str) -> None:
        self._id = value

    @property
    def sender(self) -> Peer | None:
        """The sending peer, looked up when first asked for."""
        if self.sender_id is None or self._lookup is None:
            return None
        return self._lookup(self.sender_id)

    @property
    def queue(self) -> str:
        """Alias of `topic` for pipeline messages."""
        return self.topic

    @property
    def service(self) -> str:
        """Alias of `topic` for requests."""
        return self.topic

    @property
    def group(self) -> str:
        """Alias of `topic` for shouts."""
        return self.topic

    def __repr__(self) -> str:
        return f"Message({self.pattern}, {self.topic!r}, {self.data!r}, sender={self.sender_id})"
