"""Request/reply, sans I/O: the retry policy of a request, and what a reply means.

A request is ``[service, request_id, body]`` sent by a DEALER to the provider's service
ROUTER; the reply is ``[request_id, status, body]`` (see `_wire.frames`). Request ids make
any number of requests outstanding at once (no REQ lockstep); a reply whose id nobody
waits for any more (its request timed out) is dropped and counted.

`request_plan` is the whole logic of one call, shared by `Node` and `AsyncNode`: it
yields the steps it needs (wait for a provider, exchange with one) and the drivers carry
them out, blocking a thread or awaiting.

`QuickRequest` carries out the common case of that plan without it, for every driver: a
plan is a generator, resumed twice per call through a few layers, and with many requests
in flight that bookkeeping cost several times what sending, receiving and decoding did
(`benchmarks/bench.py`, ``req_inflight``). At the first thing the quick way does not
cover, the call becomes its plan, picked up where the quick way left it. Its steps are
`Calling`'s (`choose`, `exchange`, `result`): a blocking thread, which waits for its
one request itself, takes them without a `QuickRequest` (`BlockingRunner.request`), and
so does a coroutine awaiting its one request (`AsyncRunner.request`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from .._mesh.directory import Directory, Provider, no_provider
from .._mesh.waiters import Until
from .._stats import RequestTally, Stats
from .._wire import frames as wire
from .._wire.codec import Codec
from ..errors import (
    DecodeError,
    MeshTimeoutError,
    MessageTooLargeError,
    PeerLostError,
    RemoteError,
)

__all__ = ["MAX_CHAIN", "Calling", "Exchange", "QuickRequest", "RetryElsewhere", "decode_reply", "request_plan",
           "RequestPlan"]

MAX_CHAIN = 32
"""Nodes a request's chain names at most: the nodes whose handlers wait for it (they run
one at a time), up the chain of requests made from handlers. A caller never picks one of
them as the provider (it could not serve before the call returns), and fails at once if
every provider is one of them: a call cycle."""


class Exchange(NamedTuple):
    """Send ``body`` to ``provider`` as a request to ``service`` and wait for the reply
    until ``deadline``: the driver answers ``(status, body)``, or raises `PeerLostError`,
    `MeshTimeoutError` or `NodeClosedError` into the plan."""

    provider: Provider
    service: str
    service_b: bytes
    body: bytes
    deadline: float
    meta: bytes | None = None
    compact: bool = False  # in one frame (`wire.request_frames`): the provider speaks protocol 3

    def frames(self, request_id: bytes) -> list[bytes]:
        """The frames of this request under ``request_id``."""
        _provider, _service, service_b, body, _deadline, meta, compact = self  # (one read: a field's costs a generic lookup)
        return wire.request_frames(service_b, request_id, body, meta, compact)


_exchange: Callable[[tuple[Provider, str, bytes, bytes, float, bytes | None, bool]], Exchange] = \
    functools.partial(tuple.__new__, Exchange)
"""An `Exchange` of all seven fields, made as a tuple: half the cost of the named tuple's
own constructor, on the path of every request that goes the quick way."""

RequestPlan = Generator["Until | Exchange", Any, Any]


class RetryElsewhere(Exception):
    """The provider no longer offers the service: try another one."""


def decode_reply(codec: Codec, status: bytes, body: bytes) -> Any:
    """The result a reply carries, or the error it reports (raised): `RemoteError`,
    `DecodeError`, or `RetryElsewhere` when the provider no longer offers the service."""
    if status == wire.STATUS_OK:
        return codec.decode(body)
    if status == wire.STATUS_ERROR:
        try:
            info = codec.decode(body)
            return_error = RemoteError(
                str(info.get("type", "Exception")),
                str(info.get("message", "")),
                str(info.get("traceback", "")),
            )
        except (DecodeError, AttributeError):
            return_error = RemoteError("Exception", "remote failure (undecodable details)")
        raise return_error
    if status == wire.STATUS_NO_SERVICE:
        raise RetryElsewhere()
    if status == wire.STATUS_BAD_REQUEST:
        raise DecodeError("the provider could not decode the request")
    raise DecodeError(f"reply with unknown status {status!r}")


def request_plan(directory: Directory, codec: Codec, service: str, service_b: bytes, body: bytes,
                 deadline: float, only: str | None = None, meta: bytes | None = None,
                 stats: Stats | None = None, avoid: frozenset[str] = frozenset(),
                 first: Provider | None = None, sent: bool = False, started: float | None = None) -> RequestPlan:
    """One call of ``service`` (``only`` on that node, if given) until ``deadline``.

    Picks a provider (waiting for one), exchanges with it, and decodes the reply. A
    provider that no longer offers the service is skipped for a moment and another tried;
    one that is lost mid-request is retried elsewhere only for idempotent services. One
    that announced a ``max_message_bytes`` below the body's size is never picked (the
    frame would end the connection, and the requests in flight on it with it). A
    provider of protocol 1 gets the request without its headers (counted in ``stats``).
    Raises `NoProviderError`, `PeerLostError`, `MeshTimeoutError`, `RemoteError`,
    `DecodeError`, `MessageTooLargeError` (every provider refuses a body that large).

    ``first``: the provider already picked (the round robin moved on); ``sent``: its
    request went already, counted as sent, and the driver gives the outcome of the plan's
    first step, that exchange. ``started``: when the call began, if before the plan.
    """
    started = time.monotonic() if started is None else started
    observed = None if service.startswith("\x00") else stats  # (built-ins are not the user's calls)
    compactable = wire.may_compact(service_b, body, meta)
    counted = sent
    while True:
        refusing = directory.refusing(len(body))  # (looked at again each time: nodes come and go)
        if first is None or first.id in refusing:
            provider = directory.pick_provider(service, only, avoid | refusing if refusing else avoid)
        else:
            provider = first
        first = None
        if provider is None:
            if refusing and directory.pick_provider(service, only, avoid) is not None:
                raise MessageTooLargeError(f"the request is {len(body)} bytes, more than any provider of "
                                           f"{service!r} takes (the max_message_bytes it announced)")
            try:
                yield Until(lambda: directory.pick_provider(service, only, avoid) is not None, deadline,
                            f"a provider of {service!r}")
            except MeshTimeoutError:
                raise no_provider(service, only) from None
            continue
        try:
            carried = meta if meta is None or provider.protocol >= 2 else None  # protocol 1: no meta
            if carried is None and meta is not None and stats is not None:
                stats.reject("headers_not_carried")  # the provider would not understand them
            if observed is not None and not counted:
                observed.count_name("request", "sent", service)
            counted = False
            status, reply = yield Exchange(provider, service, service_b, body, deadline, carried,
                                           compactable and provider.protocol >= 3)
        except PeerLostError:
            if not directory.may_retry(service, provider.id, deadline):
                raise
            continue
        if observed is not None and status != wire.STATUS_NO_SERVICE:  # answered: how long the caller waited
            observed.observe_request(service, time.monotonic() - started)
        try:
            return decode_reply(codec, status, reply)
        except RetryElsewhere:
            refused = provider.id
            rest = directory.skip_provider(service, refused)

            def another(refused: str = refused) -> bool:
                found = directory.pick_provider(service, only, avoid)
                return found is not None and found.id != refused and bool(directory.unskipped(service, [found.id]))

            if not another():  # every provider refused it a moment ago: ask again after a rest, never in a loop
                try:
                    yield Until(another, min(deadline, time.monotonic() + rest), f"another provider of {service!r}")
                except MeshTimeoutError:
                    if time.monotonic() >= deadline:
                        raise no_provider(service, only) from None


class Calling:
    """What the calls of one service share when they may go the quick way (`QuickRequest`):
    no headers, no chain of waiting nodes, not a built-in service; and, while the offer
    tables stay as they are, the one provider those calls go to when there is only one
    (`sole`)."""

    __slots__ = ("directory", "codec", "stats", "service", "service_b", "only", "sole")

    def __init__(self, directory: Directory, codec: Codec, stats: Stats, service: str, service_b: bytes,
                 only: str | None) -> None:
        self.directory = directory
        self.codec = codec
        self.stats = stats
        self.service = service
        self.service_b = service_b
        self.only = only  # the provider asked for, if any
        self.sole: tuple[int, Provider | None] = (-1, None)
        """``(the directory's epoch, the provider)``: the provider `choose` takes
        for these calls without asking the directory, while its epoch is that one: the
        only one offering the service (so the round robin and the skips cannot choose
        another), of protocol 4 or later, that takes any body this node sends. None: there
        is no such one in that epoch (several providers, or none): each call asks."""

    def sole_provider(self) -> tuple[int, Provider | None]:
        """`sole` as of now (the epoch read first: the tables changing meanwhile leave it
        out of date, to be looked at again by the next call)."""
        directory = self.directory
        epoch = directory.epoch
        provider = directory.sole_provider(self.service, self.only)
        if provider is None or provider.protocol < wire.BATCH_PROTOCOL or provider.id in directory.narrower:
            provider = None
        return epoch, provider

    def choose(self, body: bytes, tally: RequestTally) -> tuple[Provider | None, bool]:
        """The provider a call of these with ``body`` goes to the quick way, and whether it
        may: ``(provider, True)``, counted as sent in its driver's ``tally``: the sole one
        (`sole`, looked at again when the directory's epoch moved on), or the one the round
        robin and the skips choose. ``(provider, False)``, nothing counted: the one they
        chose is of a protocol before 4, or takes less than the body (the call's plan goes
        on with it: the round robin moved on); ``(None, False)``: no provider, or a body of
        `wire.LARGE_FRAME` or more (the plan chooses)."""
        size = len(body)
        if size >= wire.LARGE_FRAME:
            return None, False
        directory = self.directory
        sole = self.sole
        if sole[0] != directory.epoch:  # (the tables changed: a provider came, went or changed its offers)
            sole = self.sole = self.sole_provider()
        provider = sole[1]
        if provider is None:  # several providers (or none): the round robin and the skips choose
            provider = directory.pick_provider(self.service, self.only)
            if provider is None or provider.protocol < wire.BATCH_PROTOCOL:
                return provider, False
            narrower = directory.narrower  # (a provider that takes less than the body: the plan picks another)
            if narrower and narrower.get(provider.id, size) < size:
                return provider, False
        tally.sent[self.service] += 1
        return provider, True

    def exchange(self, provider: Provider, body: bytes, deadline: float) -> Exchange:
        """The exchange that sends a call of these with ``body`` alone to ``provider`` (one
        `choose` gave), waiting until ``deadline``."""
        return _exchange((provider, self.service, self.service_b, body, deadline, None, True))

    def result(self, body: bytes, tally: RequestTally, started: float, now: float | None = None) -> Any:
        """The result of a quick call's OK reply ``body``, and how long its caller waited
        for it, from ``started`` until ``now`` (default: the monotonic clock now), into
        ``tally``. Raises `DecodeError` when it cannot be decoded."""
        tally.waited[self.service].append((time.monotonic() if now is None else now) - started)
        return self.codec.decode(body)


class QuickRequest:
    """One call of `request_plan`'s common case, carried out without the plan while all
    goes well: a provider of protocol 4 or later at hand that takes the body, a body small
    enough to batch, and an OK reply.

    The driver calls `begin` (or `advance` with None; or `pick`, then sends the request
    itself: gathered into a batch, or alone as `Calling.exchange`), then `advance` with the reply
    ``(status, body)``. When it answers None or ``(False, None)``, or when the send or the
    wait fails, the quick way ends: `plan` makes the call's plan, picked up where the
    quick way left it, and the driver goes on with that, giving it the same reply or
    failure. The plan is the definition; this is its shortest path, taken step for step.
    """

    __slots__ = ("calling", "body", "deadline", "started", "provider", "sent")

    def __init__(self, calling: Calling, body: bytes, deadline: float, started: float,
                 provider: Provider | None = None, sent: bool = False) -> None:
        self.calling = calling
        self.body = body
        self.deadline = deadline
        self.started = started
        self.provider = provider  # (picked: the plan goes on with it)
        self.sent = sent  # (to it, counted as sent: `plan` waits for its outcome first)

    def begin(self, tally: RequestTally) -> Exchange | None:
        """The exchange to send, counted as sent in the driver's ``tally``; None when the
        quick way ends before it (no provider of protocol 4 at hand, or a large body): go
        on with `plan`."""
        provider = self.pick(tally)
        return None if provider is None else self.calling.exchange(provider, self.body, self.deadline)

    def pick(self, tally: RequestTally) -> Provider | None:
        """`begin` for a driver that sends the request itself (gathered into a batch, or
        alone as `Calling.exchange`): the provider to send it to (the request goes as
        ``calling.service_b``, `body`, `deadline`), counted as sent in ``tally``; None when
        the quick way ends before it: go on with `plan` (`Calling.choose`)."""
        provider, self.sent = self.calling.choose(self.body, tally)
        self.provider = provider  # (picked: the plan goes on with it)
        return provider if self.sent else None

    def advance(self, reply: tuple[bytes, bytes] | None, tally: RequestTally) -> tuple[bool, Any]:
        """Begin (``reply`` None): ``(False, the exchange to send)`` (`begin`). Given the
        reply: ``(True, its result)`` when it is OK (how long the caller waited goes to
        ``tally``; raises `DecodeError` when it cannot be decoded). ``(False, None)`` when
        the quick way ends here: go on with `plan`."""
        if reply is None:
            return False, self.begin(tally)
        if reply[0] != wire.STATUS_OK:
            return False, None
        return True, self.calling.result(reply[1], tally, self.started)

    def plan(self) -> RequestPlan:
        """The call's plan, where the quick way left it: from its beginning (with the
        provider picked, if one was), or waiting for the outcome of the exchange that was
        sent (its first step, taken here)."""
        c = self.calling
        plan = request_plan(c.directory, c.codec, c.service, c.service_b, self.body, self.deadline, c.only, None,
                            c.stats, frozenset(), self.provider, self.sent, self.started)
        if self.sent:
            next(plan)
        return plan

    def close(self) -> None:
        """Nothing to release (a plan's `close`, for drivers that close what they forget)."""
