"""Request/reply, sans I/O: the retry policy of a request, and what a reply means.

A request is ``[service, request_id, body]`` sent by a DEALER to the provider's service
ROUTER; the reply is ``[request_id, status, body]`` (see `_wire.frames`). Request ids make
any number of requests outstanding at once (no REQ lockstep); a reply whose id nobody
waits for any more (its request timed out) is dropped and counted.

`request_plan` is the whole logic of one call, shared by `Node` and `AsyncNode`: it
yields the steps it needs (wait for a provider, exchange with one) and the drivers carry
them out, blocking a thread or awaiting.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, NamedTuple

from .._mesh.directory import Directory, Provider, no_provider
from .._mesh.waiters import Until
from .._stats import Stats
from .._wire import frames as wire
from .._wire.codec import Codec
from ..errors import DecodeError, MeshTimeoutError, PeerLostError, RemoteError

__all__ = ["MAX_CHAIN", "Exchange", "RetryElsewhere", "decode_reply", "request_plan", "RequestPlan"]

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
        return wire.request_frames(self.service_b, request_id, self.body, self.meta, self.compact)


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
                 stats: Stats | None = None, avoid: frozenset[str] = frozenset()) -> RequestPlan:
    """One call of ``service`` (``only`` on that node, if given) until ``deadline``.

    Picks a provider (waiting for one), exchanges with it, and decodes the reply. A
    provider that no longer offers the service is skipped for a moment and another tried;
    one that is lost mid-request is retried elsewhere only for idempotent services. A
    provider of protocol 1 gets the request without its headers (counted in ``stats``).
    Raises `NoProviderError`, `PeerLostError`, `MeshTimeoutError`, `RemoteError`,
    `DecodeError`.
    """
    started = time.monotonic()
    observed = None if service.startswith("\x00") else stats  # (built-ins are not the user's calls)
    compactable = wire.may_compact(service_b, body, meta)
    while True:
        provider = directory.pick_provider(service, only, avoid)
        if provider is None:
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
            if observed is not None:
                observed.count_name("request", "sent", service)
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
            directory.skip_provider(service, provider.id)
