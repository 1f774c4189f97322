"""Requests in: what a provider's service ROUTER received, decoded into calls of the
service handlers, on the inbox's owner thread.

A frame holds one request or a batch of them from one caller. A request that needs no
handler is answered at once: malformed (``0x03``), to no service of this node (``0x02``),
or to a built-in service (their names begin with ``\\x00``: at-least-once batches and
the keeper's intake go to `AckedIntake`, stats and history pages to `builtin_services`).
A request whose sync handler the driver lets run as it is decoded (`InPlace`), with
nothing gathered before it, is served right there (``serve_in_place``: no `Call`, no
hand-off); the rest become calls, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..._mesh.directory import Directory
from ..._mesh.registry import Registry
from ..._observe import tracing
from ..._stats import Stats
from ..._wire import frames as wire
from ..._wire.codec import Codec
from ...errors import DecodeError
from ...message import Message
from ..calls import Call, is_async
from ..intake import AckedIntake
from ..reqrep import MAX_CHAIN
from .builtin_services import HistoryPages, StatsService

if TYPE_CHECKING:
    from ..history import History

__all__ = ["MAX_KNOWN_CALLERS", "MAX_KNOWN_SERVICES", "InPlace", "ServiceIntake"]

MAX_KNOWN_SERVICES = 256
"""Service names whose handler `ServiceIntake.service_of` keeps looked up (bounded: a caller
may name any service)."""
MAX_KNOWN_CALLERS = 1024
"""Routing ids of callers whose node id `ServiceIntake` keeps read, and of those whose
`CompactCaller` it keeps made (bounded: each DEALER of a caller has one, and a stranger may
make any)."""


class _CompactCallers(dict[bytes, wire.CompactCaller]):
    """Routing id: the `CompactCaller` that stands for it in the routes of its one-frame
    requests (`wire.parse_request`), made at its first request and kept for up to
    `MAX_KNOWN_CALLERS` routing ids (past it, the table starts afresh). One made per
    request cost a copy of the routing id, and a hash of it again in the table of senders
    (`ServiceIntake.sender_of`); one kept has its hash kept with it. (A caller is bytes,
    never changed: one object may stand in any number of routes.)"""

    __slots__ = ()

    def __missing__(self, routing_id: bytes) -> wire.CompactCaller:
        if len(self) >= MAX_KNOWN_CALLERS:
            self.clear()
        caller = self[routing_id] = wire.CompactCaller(routing_id)
        return caller


class InPlace(Protocol):
    """The driver's side of serving requests as they are decoded (the dispatcher)."""

    def runs_sync_in_place(self) -> bool:
        """Whether the driver lets sync handlers run as they are decoded, now."""

    def serve_in_place(self, handler: Callable[..., Any], msg: Message, route: tuple[bytes, bytes]) -> None:
        """Run a request's sync ``handler`` right here and answer it."""


class ServiceIntake:
    """Decodes the requests a provider received into calls (`decode`), answering at once
    those that need no handler, through ``reply`` ``(route, status, body)``; ``driver``
    says whether sync handlers may run as they are decoded, now, and runs one and answers
    it (`InPlace`: an object, not two bound methods kept as attributes, which CPython 3.11
    looks up anew at every call)."""

    def __init__(self, *, registry: Registry, directory: Directory, codec: Codec, stats: Stats,
                 acked: AckedIntake, describe: Callable[[], dict[str, Any]], history: History | None,
                 reply: Callable[[tuple[bytes, bytes], bytes, bytes], None],
                 driver: InPlace) -> None:
        self.registry = registry
        self.directory = directory
        self.codec = codec
        self.stats = stats
        self.acked = acked
        self.send_reply = reply
        self.driver = driver
        self._received_names = stats.names("service", "received")  # (its one writer: the inbox's owner thread)
        self._counters = stats.pattern["service"]  # (the same dict for the node's life)
        self._services: dict[str, Callable[..., Any]] = {}  # the registry's table `_known` was looked up in
        self._known: dict[bytes, tuple[str, Callable[..., Any] | None, bool]] = {}  # (`service_of`)
        self._senders: dict[bytes, str | None] = {}  # routing id: its node id (`sender_of`)
        self._callers = _CompactCallers()  # (`decode_request`)
        self._lookup_peer = directory.lookup_peer  # (bound once: each request's message holds it)
        self.stats_service = StatsService(describe=describe, codec=codec, directory=directory, reply=reply)
        self.history_pages = HistoryPages(history=history, codec=codec, stats=stats, reply=reply)

    def decode(self, frames: list[bytes], calls: list[Call]) -> None:
        """Decode what the router received from a caller (``frames``: a request, or a batch
        of them) into ``calls``, serving in place or answering at once what it may (see the
        class). Raises `DecodeError` (or whatever the wire's parsers raise) for a frame
        that is no request at all: the caller of this counts it as malformed."""
        if not self.decode_request(frames, calls):
            self._decode_batch(wire.BatchCaller(frames[0]), wire.parse_request_batch(frames[1]), calls)


    def _decode_batch(self, caller: wire.BatchCaller, requests: list[tuple[bytes, bytes, bytes]],
                      calls: list[Call]) -> None:
        """The requests of a batch, from one caller: what `decode_request` does for each,
        with what they share (their sender, their service's handler) looked up once. A
        request that is not plainly one to a handler of this node takes the long way (as
        the frames of a request on its own)."""
        sender_id = wire.sender_of_requester(caller)
        decode, lookup, serve = self.codec.decode, self.directory.lookup_peer, self.driver.serve_in_place
        names = self._received_names
        last_b, service, handler, here = b"", "", None, False
        taken = taken_before = 0  # (the requests taken for one service in a row are counted at once)
        # the hot path, as for streams: with nothing gathered before them (the order holds),
        # the handler is called right here as each request is decoded, no Call, no hand-off
        # (and no spans: with traces on, each run goes through serve_as like any other)
        in_place = tracing.active is None  # (the driver holds the replies meanwhile: `replies_held`)
        for service_b, request_id, body in requests:
            if service_b != last_b:
                if taken > taken_before:
                    names.add(last_b, taken - taken_before)
                    taken_before = taken
                last_b = service_b
                service, handler, sync = self.service_of(service_b)
                here = in_place and sync and self.driver.runs_sync_in_place()
            if handler is None or len(request_id) > wire.MAX_REQUEST_ID_BYTES:
                self.decode_request([caller, service_b, request_id, body], calls)
                continue
            try:
                data = decode(body)
            except DecodeError:
                self.decode_request([caller, service_b, request_id, body], calls)
                continue
            route = (caller, request_id)
            msg = Message("request", service, data, sender_id, lookup, None, 0, route)  # (positional: no dict of keywords)
            taken += 1
            if here and not calls:
                serve(handler, msg, route)
            else:
                calls.append(Call(handler, msg, route, "service"))
        if taken > taken_before:
            names.add(last_b, taken - taken_before)
        self._counters["received"] += taken
        if taken and sender_id in self.directory.alive_ids:  # (still: it may have left while its handlers ran)
            self.stats.peer_received[sender_id] += taken

    def decode_request(self, frames: list[bytes], calls: list[Call]) -> bool:
        """`decode` for one request: False, with nothing done, if ``frames`` are a batch of
        them. Raises what `decode` raises."""
        request = wire.parse_request(frames, self._callers)
        if request is None:
            if len(frames) == 2 and wire.is_batch(frames[1]):
                return False
            raise DecodeError("malformed request envelope")
        route, service_b, body, meta = request
        if len(route[1]) > wire.MAX_REQUEST_ID_BYTES:  # refused, and said: the caller never waits
            self._refuse(route)
            return True
        service, handler, sync = self.service_of(service_b)
        try:
            sender_id = self._senders[route[0]]
        except KeyError:
            sender_id = self.sender_of(route[0])
        if handler is None and service[:1] == "\x00":
            try:
                if self._serve_builtin(service, route, body, sender_id, calls):
                    return True
            except DecodeError:  # a batch of messages that is none: refused, and said, as an undecodable body
                self._refuse(route)
                return True
        self._counters["received"] += 1
        if handler is not None:
            self._received_names.add(service_b, 1)
        if sender_id is not None and sender_id in self.directory.alive_ids:  # (members only, as for streams)
            self.stats.peer_received[sender_id] += 1
        if handler is None:
            self.send_reply(route, wire.STATUS_NO_SERVICE, b"")
            return True
        try:
            data = self.codec.decode(body)
        except DecodeError:
            self._refuse(route)
            return True
        msg = Message("request", service, data, sender_id, self._lookup_peer, None, 0, route)  # (positional)
        if meta is not None:
            try:
                info = self.codec.decode(meta)
                msg.headers = wire.check_headers(info.get("h") or {})
                msg.timestamp = wire.sent_at(info.get("t"))
                via = info.get("v") or []
                if not isinstance(via, list) or len(via) > MAX_CHAIN or \
                        not all(isinstance(v, str) and len(v) <= 64 for v in via):
                    raise DecodeError("a bad chain of waiting nodes")
                msg.via = tuple(via)
            except Exception:
                self._refuse(route)
                return True
        if meta is None and not calls and sync and tracing.active is None and self.driver.runs_sync_in_place():
            self.driver.serve_in_place(handler, msg, route)
            return True
        calls.append(Call(handler, msg, route, "service"))
        return True

    def service_of(self, service_b: bytes) -> tuple[str, Callable[..., Any] | None, bool]:
        """The name a request's ``service_b`` gives (UTF-8, errors replaced), this node's
        handler for it (None: no service of this node's, or a built-in one: the name begins
        with ``\\x00``) and whether that is a sync one (not `is_async`); looked up once per
        name for each table of the registry's services (a table is replaced, never changed: a
        new one empties what was looked up), for up to `MAX_KNOWN_SERVICES` names (callers may
        send any: then looked up afresh)."""
        services = self.registry.services
        known = self._known
        if self._services is not services:
            self._services = services
            known.clear()
        found = known.get(service_b)
        if found is None:
            service = service_b.decode("utf-8", "replace")
            handler = services.get(service) if service[:1] != "\x00" else None
            found = (service, handler, handler is not None and not is_async(handler))
            if len(known) < MAX_KNOWN_SERVICES:
                known[service_b] = found
        return found

    def sender_of(self, caller: bytes) -> str | None:
        """The node id in ``caller``'s routing id (`wire.sender_of_requester`), kept for up to
        `MAX_KNOWN_CALLERS` routing ids (past it, the table starts afresh): a request read it
        anew each time (a slice and a hex string per request)."""
        sender_id = wire.sender_of_requester(caller)
        senders = self._senders
        if len(senders) >= MAX_KNOWN_CALLERS:
            senders.clear()
        senders[bytes(caller)] = sender_id
        return sender_id

    def _refuse(self, route: tuple[bytes, bytes]) -> None:
        """Answer a request that cannot be read 0x03 (its caller never waits for it), and
        count it malformed."""
        self.stats.pattern["service"]["errors"] += 1
        self.stats.reject("service_malformed")
        self.send_reply(route, wire.STATUS_BAD_REQUEST, b"")

    def _serve_builtin(self, service: str, route: tuple[bytes, bytes], body: bytes, sender_id: str | None,
                       calls: list[Call]) -> bool:
        """Serve a request to a built-in service (their names begin with ``\\x00``); False
        if ``service`` names none of them. Raises `DecodeError` for a body that is no batch of
        at-least-once or durable items (``\\x00queue/``, ``\\x00keep/``), before any is taken."""
        if service.startswith(wire.QUEUE_SERVICE_PREFIX):
            self.acked.decode(service[len(wire.QUEUE_SERVICE_PREFIX):], route, body, sender_id, calls)
            return True
        if service.startswith(wire.KEEP_SERVICE_PREFIX):
            self.acked.keep(service[len(wire.KEEP_SERVICE_PREFIX):], route, body)
            return True
        if service == wire.HISTORY_SERVICE:
            self.history_pages.serve(route, body)
            return True
        if service == wire.STATS_SERVICE:  # built in: every node reports its counters
            self.stats_service.serve(route)
            return True
        return False
