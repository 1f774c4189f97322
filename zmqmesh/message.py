"""What handlers and callers see: `Peer` (a member of the mesh) and `Message` (a delivery)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import repeat, starmap
from types import MappingProxyType
from typing import Any

from ._ids import uuid4_hex
from ._record import frozen_record

__all__ = ["Peer", "Message", "Origin"]


@frozen_record
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
    headers: Mapping[str, str] = MappingProxyType({})
    last_seen: float = 0.0
    is_zmqmesh: bool = True

    def __post_init__(self) -> None:
        if type(self.headers) is not dict:  # (the default's empty view among them: each peer
            # keeps a dict of its own, which copies as the rest of it does)
            object.__setattr__(self, "headers", dict(self.headers))

    def __str__(self) -> str:
        return f"{self.name}({self.id[:8]})@{self.address}"


class Origin:
    """What the sender said of a whole frame of messages: the stem of their ids (None when
    it numbered them not: ids are then made here), the number of the first, its wall clock, and each message's headers (shared by the
    `Message` objects of the frame, so a delivery costs no more than before)."""

    __slots__ = ("stem", "first", "timestamp", "headers")

    def __init__(self, stem: str | None, first: int, timestamp: float | None,
                 headers: list[dict[str, str] | None] | None = None) -> None:
        self.stem = stem
        self.first = first
        self.timestamp = timestamp
        self.headers = headers


class Message:
    """One delivery to a handler.

    Attributes:
        pattern: ``"pubsub"``, ``"pipeline"``, ``"request"``, ``"whisper"`` or ``"shout"``.
        topic: the topic (pub/sub), queue (pipeline), service (request) or group (shout).
        data: the decoded payload; for whisper and shout, the list of raw frames.
        sender: the sending `Peer`, or ``None`` when the sender is not a known member
            (a bare ZeroMQ client, or a peer that already left).
        sender_id: the sender's id (hex) when the wire carried one, else ``None``.
        id: unique, and the same on every delivery of the message: durable messages keep
            theirs across restarts too; a pub/sub message is named by its publisher and
            sequence, an at-least-once one without headers by its pusher and batch; a
            fire-and-forget push without headers (never delivered twice) and anything a
            bare ZeroMQ client sends get one made here.
        timestamp: the sender's wall-clock time (``time.time()``) when it sent the message,
            or ``None`` when the wire did not carry it: a publication, push or request sent
            without headers (a durable message always carries it), or anything a bare
            client sends; ``None`` too for a clock that is no finite number.
        headers: string headers the sender attached (``headers=`` of `publish`, `push`,
            `request`), empty by default; a dead letter carries ``x-original-queue``,
            ``x-attempts`` and ``x-last-error``.
        redelivered: on an at-least-once queue, True when an earlier delivery of this
            message may have been seen by another puller (it died, or did not acknowledge
            in time), or by this one (its handler raised).
        attempts: on a durable queue, how many deliveries of this message failed before
            this one (its handler raised, or did not return within ``ack_timeout_s``).
        gap: on a replaying subscription, how many messages of the topic were missed
            just before this one (see `Node.subscribe`).
        sequence: pub/sub: the message's number in its publisher's topic, if known.
    """

    # A delivery is made per message on the hot paths: __init__ sets only what every
    # message of its kind has; the rest is set when known, and read with a default
    # otherwise. (`frame_deliveries` and `durable_delivery` make messages too: a field
    # every message needs is set there as well.)
    __slots__ = ("pattern", "topic", "data", "sender_id", "_lookup", "redelivered", "_origin", "_index", "_id",
                 "_timestamp", "_headers", "_attempts", "_gap", "_sequence", "_via", "_route")

    def __init__(
        self,
        pattern: str,
        topic: str,
        data: Any,
        sender_id: str | None,
        lookup: Callable[[str], Peer | None] | None = None,
        origin: Origin | None = None,
        index: int = 0,
        route: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.pattern = pattern
        self.topic = topic
        self.data = data
        self.sender_id = sender_id
        self._lookup = lookup
        self.redelivered = False
        if origin is not None:  # message ``index`` of a frame whose sender said ``origin``
            self._origin = origin
            self._index = index
        if route is not None:  # a request: its requester and request id name it
            self._route = route
            self._via: tuple[str, ...] = ()  # (read for every request served: set, it reads at a third of the cost)

    @property
    def id(self) -> str:
        """The message's unique id (see the class attributes)."""
        found: str | None = getattr(self, "_id", None)
        if found is None:
            origin: Origin | None = getattr(self, "_origin", None)
            route: tuple[bytes, bytes] | None = getattr(self, "_route", None)
            if route is not None:
                found = f"{route[0].hex()}/{route[1].hex()}"
            elif origin is not None and origin.stem is not None:
                found = f"{origin.stem}{origin.first + self._index}"
            else:
                found = uuid4_hex()
            self._id = found
        return found

    @id.setter
    def id(self, value: str) -> None:
        self._id = value

    @property
    def timestamp(self) -> float | None:
        """The sender's wall clock when it sent the message, if the wire carried it."""
        found: float | None = getattr(self, "_timestamp", None)
        if found is None:
            origin: Origin | None = getattr(self, "_origin", None)
            return origin.timestamp if origin is not None else None
        return found

    @timestamp.setter
    def timestamp(self, value: float | None) -> None:
        self._timestamp = value

    @property
    def headers(self) -> dict[str, str]:
        """The headers the sender attached (empty by default)."""
        found: dict[str, str] | None = getattr(self, "_headers", None)
        if found is None:
            origin: Origin | None = getattr(self, "_origin", None)
            listed = origin.headers[self._index] if origin is not None and origin.headers is not None else None
            found = self._headers = listed if listed is not None else {}
        return found

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._headers = value

    @property
    def attempts(self) -> int:
        """Failed deliveries before this one (durable queues)."""
        return getattr(self, "_attempts", 0)

    @attempts.setter
    def attempts(self, value: int) -> None:
        self._attempts = value

    @property
    def gap(self) -> int:
        """pub/sub with a replaying subscription: how many messages of this topic and
        publisher were missed just before this one (they fell out of the publisher's
        history before they could be replayed, or it keeps none); 0 when none."""
        return getattr(self, "_gap", 0)

    @gap.setter
    def gap(self, value: int) -> None:
        self._gap = value

    @property
    def sequence(self) -> int | None:
        """pub/sub: the message's number in its publisher's topic, when the wire carried
        one (kept topics number their messages for good, across restarts)."""
        found: int | None = getattr(self, "_sequence", None)
        if found is None:
            origin: Origin | None = getattr(self, "_origin", None)
            if origin is not None and origin.stem is not None and self.pattern == "pubsub":
                return origin.first + self._index
        return found

    @sequence.setter
    def sequence(self, value: int | None) -> None:
        self._sequence = value

    @property
    def via(self) -> tuple[str, ...]:
        """A request: the ids of the nodes whose handlers wait for it, up the chain of
        requests made from handlers (empty by default; see `Node.request`)."""
        return getattr(self, "_via", ())

    @via.setter
    def via(self, value: tuple[str, ...]) -> None:
        self._via = value

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


def frame_deliveries(pattern: str, topic: str, items: list[Any], sender_id: str | None,
                     lookup: Callable[[str], Peer | None] | None, origin: Origin | None) -> list[Message]:
    """The `Message` of each of ``items``, the messages of one frame whose sender said
    ``origin``: what ``Message(pattern, topic, data, sender_id, lookup, origin, index)``
    makes for each, made in one call (a stream makes one per message: 0.46 against 0.74 us
    a message, handler call included, on the machine of benchmarks/bench.py). Raises
    nothing.

    The objects are made first, at C speed: ``starmap`` hands ``Message.__new__`` one
    argument tuple for them all, where a call from Python builds one per message; then
    what every message has is set in one tight loop, and the origin, where there is one,
    in another. (70 against 93 ns a message without an origin, 83 against 98 with.) The
    one message of a frame (a large payload pushed as it is) comes from the constructor
    (245 ns, where that setup took 650)."""
    if len(items) == 1:
        return [Message(pattern, topic, items[0], sender_id, lookup, origin)]
    made: list[Message] = list(starmap(Message.__new__, repeat((Message,), len(items))))
    for msg, data in zip(made, items):
        msg.pattern = pattern
        msg.topic = topic
        msg.data = data
        msg.sender_id = sender_id
        msg._lookup = lookup
        msg.redelivered = False
    if origin is not None:
        for index, msg in enumerate(made):
            msg._origin = origin
            msg._index = index
    return made


def durable_deliveries(queue: str, datas: Sequence[Any], sender_id: str | None,
                       lookup: Callable[[str], Peer | None] | None, ids: Sequence[str], stamps: Sequence[float],
                       headers: Sequence[dict[str, str] | None], attempts: Sequence[int],
                       redelivered: Sequence[bool]) -> list[Message]:
    """The `Message` of each durable queue message of one batch, given as columns (a
    message's fields at one index): what `durable_delivery` makes for each, made in one
    call, as `frame_deliveries` makes them (the objects at C speed, then one tight loop
    setting their fields, with no call per message). Raises nothing."""
    made: list[Message] = list(starmap(Message.__new__, repeat((Message,), len(ids))))
    for msg, data, msg_id, stamp, head, tries, again in zip(made, datas, ids, stamps, headers, attempts, redelivered):
        msg.pattern = "pipeline"
        msg.topic = queue
        msg.data = data
        msg.sender_id = sender_id
        msg._lookup = lookup
        msg.redelivered = again
        msg._id = msg_id
        msg._timestamp = stamp
        if head is not None:
            msg._headers = head
        msg._attempts = tries
    return made


def durable_delivery(queue: str, data: Any, sender_id: str | None, lookup: Callable[[str], Peer | None] | None,
                     msg_id: str, timestamp: float | None, headers: dict[str, str] | None, attempts: int,
                     redelivered: bool) -> Message:
    """A `Message` delivering a durable queue's message, with the id, clock, headers and
    failed deliveries its pusher stored: made in one step, where setting each field would
    cost a call each (a puller makes one per message). ``headers`` None: none (the
    empty dict `Message.headers` gives is made when it is read). Raises nothing."""
    msg = Message.__new__(Message)
    msg.pattern = "pipeline"
    msg.topic = queue
    msg.data = data
    msg.sender_id = sender_id
    msg._lookup = lookup
    msg.redelivered = redelivered
    msg._id = msg_id
    msg._timestamp = timestamp
    if headers is not None:
        msg._headers = headers
    msg._attempts = attempts
    return msg
