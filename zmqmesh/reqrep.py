"""Request/reply: the request and reply envelopes, and the two ways of waiting for a reply.

A request is ``[service, request_id, body]`` sent by a DEALER to the provider's service
ROUTER; the reply is ``[request_id, status, body]``. Request ids make any number of
requests outstanding at once (no REQ lockstep); a reply whose id nobody waits for any
more (its request timed out) is dropped and counted.

`ThreadRequester` serves the sync `Node`: one per calling thread, each with its own
DEALER per provider, so a blocking call waits on its own socket with no hand-off to
another thread. ``LoopRequester`` (in `aio`) serves `AsyncNode`: DEALERs owned by the
event loop and a future per request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import wire
from .errors import (
    DecodeError,
    MeshTimeoutError,
    NodeClosedError,
    PeerLostError,
    RemoteError,
)
from .sockets import recv_frames, send_frames

if TYPE_CHECKING:
    from .core import MeshCore, Provider

__all__ = ["ThreadRequester", "RetryElsewhere", "decode_reply", "new_dealer"]

log = logging.getLogger("zmqmesh.reqrep")

_POLL_SLICE_S = 0.05
_socket_serial = itertools.count(1)



class RetryElsewhere(Exception):
    """The provider no longer offers the service: try another one."""


def decode_reply(core: MeshCore, status: bytes, body: bytes) -> Any:
    """The result a reply carries, or the error it reports (raised)."""
    if status == wire.STATUS_OK:
        return core.codec.decode(body)
    if status == wire.STATUS_ERROR:
        try:
            info = core.codec.decode(body)
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


def new_dealer(core: MeshCore, provider: Provider) -> zmq.Socket[Any]:
    sock = core.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, core.uuid + next(_socket_serial).to_bytes(4, "big"))
    sock.setsockopt(zmq.MAXMSGSIZE, core.config.max_message_bytes + 4096)
    sock.setsockopt(zmq.SNDHWM, core.config.send_hwm)
    sock.setsockopt(zmq.RCVHWM, core.config.recv_hwm)
    core.connect(sock, provider.endpoint, provider.key)
    return sock


class ThreadRequester:
    """Blocking requests from one thread (never shared between threads)."""

    def __init__(self, core: MeshCore) -> None:
        self.core = core
        self.thread = threading.get_ident()
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self._ids = itertools.count(1)
        self._membership_epoch = -1
        self._poller_cache: dict[str, zmq.Poller] = {}

    def request(self, service: str, service_b: bytes, body: bytes, timeout: float, only: str | None = None) -> Any:
        """Send ``body`` to one provider of ``service`` (``service_b``: its name, checked and
        encoded by the node) and wait for the reply; ``only``: that node's."""
        core = self.core
        deadline = time.monotonic() + timeout
        while True:
            provider = core.wait_for_provider_sync(service, deadline, only)
            self._prune()
            sock = self._socket(provider)
            request_id = next(self._ids).to_bytes(8, "big")
            try:
                send_frames(sock, [service_b, request_id, body], copy=len(body) < 65536)
            except zmq.Again as exc:
                raise MeshTimeoutError(f"provider {provider.id[:8]} of {service!r} is not accepting requests") from exc
            core.stats.pattern["request"]["sent"] += 1
            try:
                return self._wait(sock, request_id, provider, service, deadline)
            except RetryElsewhere:
                core.skip_provider(service, provider.id)
                continue
            except PeerLostError:
                if not core.may_retry(service, provider.id, deadline):
                    raise

    def _wait(self, sock: zmq.Socket[Any], request_id: bytes, provider: Provider, service: str, deadline: float) -> Any:
        core = self.core
        poller = self._poller_cache.get(provider.id)
        if poller is None:
            poller = self._poller_cache[provider.id] = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                core.stats.pattern["request"]["errors"] += 1
                raise MeshTimeoutError(f"request to {service!r} timed out")
            if poller.poll(int(min(remaining, _POLL_SLICE_S) * 1000) + 1):
                while True:
                    try:
                        frames = recv_frames(sock)
                    except zmq.Again:
                        break
                    if len(frames) != 3 or frames[0] != request_id:
                        core.stats.pattern["request"]["dropped"] += 1  # a late reply
                        continue
                    core.stats.pattern["request"]["received"] += 1
                    return decode_reply(core, frames[1], frames[2])
            if core.closed:
                raise NodeClosedError("the node stopped while a request was outstanding")
            if provider.id not in core.alive_ids:
                core.stats.pattern["request"]["errors"] += 1
                raise PeerLostError(f"provider {provider.id[:8]} of {service!r} left before replying", provider.id)

    def _socket(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self.sockets.get(provider.id)
        if sock is None:
            sock = self.sockets[provider.id] = new_dealer(self.core, provider)
        return sock

    def _prune(self) -> None:
        """Close sockets to providers that left (only when membership changed)."""
        epoch = self.core.membership_epoch
        if epoch == self._membership_epoch:
            return
        self._membership_epoch = epoch
        alive = self.core.alive_ids
        for pid in [p for p in self.sockets if p not in alive]:
            self._poller_cache.pop(pid, None)
            self.sockets.pop(pid).close(0)

    def close(self) -> None:
        """Close every socket of this requester."""
        self._poller_cache.clear()
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()
