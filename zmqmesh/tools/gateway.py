"""`zmqmesh gateway`: an HTTP door into the mesh, and a live dashboard.

The gateway is a mesh node (an `AsyncNode`) serving, with aiohttp (the optional
``zmqmesh[gateway]`` extra):

    POST /request/{service}   JSON body in, the reply as JSON out
    POST /publish/{topic}     JSON body; 202 once handed to the mesh
    POST /push/{queue}        JSON body; 202 once handed to the mesh
    GET  /peers               the membership as JSON
    GET  /events              Server-Sent Events: joins, leaves, per-node counters, edges, latencies
    GET  /metrics             every node's counters for Prometheus (the ``metrics`` extra), and the gateway's own
    GET  /                    the dashboard (one self-contained page, no CDN)

Errors are JSON ``{"error": type, "message": ..., ...}`` with a status per kind:
400 bad JSON (``NaN`` and ``Infinity`` included, or nested past Python's recursion limit), a
body that cannot be decoded (its ``Content-Encoding``), or a bad ``?timeout=``, 401 missing
or wrong token, 403 a foreign ``Host`` or ``Origin``, 404 unknown route, 405 wrong method,
408 a body slower than 10 s, 413 body too large, 415 a POST that is not
``application/json``, 500 the remote handler raised (its type and message; the traceback
only with ``tracebacks=True``), 502 the provider was lost mid-request, or its reply has no
JSON form, 503 nobody offers it (at once), too many requests or body bytes in flight (or
answer bytes waiting for their readers: the answer dropped), the
node cannot take it now, or the gateway stopped with the call in flight (`STOP_GRACE_S`
after it began to stop), 504 timeout (a reply, or room in a full send queue).

A reply goes back as JSON: bytes as text, map keys that are not text as their text,
``NaN`` and infinities as ``null`` (JSON has no form for them).

It listens on loopback by default; on any other address a bearer token is required.
Without a token it answers only the ``Host`` names it serves (against DNS rebinding), and
with or without one it refuses cross-site requests: a POST must say ``application/json``
(which a page on another site cannot send without a CORS preflight, never granted here),
a request whose ``Origin`` is another origin (scheme, host and port) is refused, and so is
one a browser marks as made by another site (``Sec-Fetch-Site``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Coroutine
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from zmqmesh import (
    AsyncNode,
    ConfigError,
    DecodeError,
    MeshTimeoutError,
    NoProviderError,
    Peer,
    PeerLostError,
    RemoteError,
    ZmqMeshError,
    metrics_text,
)

from .jsonview import dumps, peer_dict, shown

try:
    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("the gateway needs aiohttp: pip install 'zmqmesh[gateway]'") from exc

__all__ = ["create_app", "run_gateway", "GatewayError", "GatewayArgumentError"]

log = logging.getLogger("zmqmesh.gateway")

_STATS_INTERVAL_S = 1.0
STATS_MAX_AGE_S = 1.0
"""How long the nodes' counters, once collected, serve ``/metrics`` and the dashboard: a
collection that began less than this long ago (done or still in flight) is shared, so
the mesh is asked at most once a second whatever the scrapes, and what a scrape shows
was read at most this long before it began."""
MAX_STATS_BYTES = 64 * 1024 * 1024
"""Bytes the gateway holds of the nodes' answers to one collection of their counters,
together, about (sized as `_held_bytes`): the smallest go in first, and while they pass it
the largest is let go, counted and logged as unreadable (``unreadable_stats``). Each
answer may be up to ``max_message_bytes`` (16 MiB) from each of up to 1,024 peers: the
answers of 32 strangers at a node's bounds were 275 MB held, 728 MB resident, and grew
with every one more."""
MAX_NODE_STATS_BYTES = 4 * 1024 * 1024
"""Bytes of one node's answer the gateway holds, about (`_held_bytes`); a larger one is
refused as it arrives, counted and logged as unreadable (a node of this version answers
some 2.2 MiB at most: 257 names of 255 bytes per pattern and direction, 1,024 peers, 257
services timed, 512 queues)."""
STATS_ASKS_AT_ONCE = 8
"""Nodes a collection of the counters asks at once (each answers within a second, or is
left out): every answer in flight is held whole, in ZeroMQ's buffers then decoded, before
it can be sized; asked all at once, 32 strangers' answers of 8 MB took the gateway to
395 MB resident, though it kept none of them (171 MB 8 at a time)."""
STATS_COLLECTION_S = 1.0
"""The longest a collection of the counters asks for: a node not asked by then is left
out of it, as one that does not answer in time is (`Gateway._collect`). Nodes that never
answer (busy in a handler, stopped) each held one of the `STATS_ASKS_AT_ONCE` turns a
whole second: 24 of them made each scrape 3 s, 1,024 would make it 128 s."""
MAX_TIMEOUT_S = 300.0
"""The longest ``?timeout=`` a request may ask for."""
MAX_IN_FLIGHT = 256
"""Requests served at once (event streams and scrapes of ``/metrics`` aside); past it,
503 at once. A call into the mesh whose caller hung up holds its place (and its body's
bytes) until the call ends: its reply, its timeout (`MAX_TIMEOUT_S` at most), or its
provider lost."""
MAX_BODY_BYTES_READING = 64 * 1024 * 1024
"""Bytes the bodies being read declare (their ``Content-Length``, or the body limit when
sent in chunks), with their requests' heads, at most; past it, a request whose head and
body are larger than `SMALL_BODY_BYTES` is answered 503 before its body is read. (A body
is read before its request takes a place among those in flight, so that a slow one holds
none; its head, up to `MAX_HEADERS` lines of 8 KiB, is held meanwhile.)"""
SMALL_BODY_BYTES = 64 * 1024
"""A body this small, with its head, is always read (1,024 connections at most: 64 MiB)."""
MAX_BODY_BYTES_IN_FLIGHT = 16 * 1024 * 1024
"""Bytes of request bodies served at once (one body of any size allowed alone); past it,
503 at once. (Parsed, a JSON body takes up to some 25 times its size while its call waits.)"""
MAX_LISTENERS = 64
"""Event streams (``/events``) open at once; past it, 503."""
MAX_STREAM_BYTES = 1024 * 1024
"""Bytes of events an ``/events`` stream may have waiting to be written; past them, the
stream loses events (counted, and logged when it ends)."""
STREAM_WRITE_TIMEOUT_S = 10.0
"""How long a write to an ``/events`` stream may wait for its reader; past it, the stream is closed."""
REPLY_TIMEOUT_S = 30.0
"""How long an answer may wait for its client to take it; past it, the connection is closed."""
MAX_ANSWER_BYTES_WAITING = 64 * 1024 * 1024
"""Bytes of the answers being written, together; one answer alone goes whatever its size,
and one of up to `SMALL_BODY_BYTES` always goes. An answer that would pass it is dropped
and answered 503 in its place, counted (``answer_bytes_waiting``) and logged. (A request's
place among those in flight is freed before its answer is written, and a reply's JSON may
be six times the reply: 8 callers of a service answering 15 MB, that read nothing, held
1.4 GB for `REPLY_TIMEOUT_S`, and each more held 170 MB more.)"""
MAX_CONNECTIONS = 1024
"""HTTP connections open at once; past it, a new one is closed at once (logged)."""
BODY_TIMEOUT_S = 10.0
"""How long a client may take to send a request's body; past it, 408."""
MAX_HEADERS = 32
"""Header lines a request may have (aiohttp's default: 128); past it, aiohttp answers 400.
Each may hold 8,190 bytes, so a request's head takes up to 256 KiB, and some twice that
parsed while its request is served: 1,024 connections whose bodies never come held
1.9 GB for the body timeout with aiohttp's default (120 lines of 8 KB each)."""
IDLE_TIMEOUT_S = 15.0
"""How long a connection may sit idle, or take to send a request's head, before it is closed."""
LINGER_S = 1.0
"""How long, after an answer sent before its request's body was read in full (a 413, a
refusal), the rest of the body may take to arrive (read and dropped: a client that sends
it all before it reads still gets the answer); past it, the connection is closed
(aiohttp's lingering time, 10 s by default)."""
STOP_GRACE_S = 5.0
"""How long the calls in flight when the gateway stops may take to end; past it, each
still running is answered 503 ``Stopping``."""
_STOP_WRITE_S = 0.5
"""How long aiohttp then waits for those answers to be written (twice: its shutdown timeout)."""
_DISCOVERY_GRACE_S = 3.0
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
EVENTS = ("hung_up", "slow_reader", "stream_stalled", "stream_event_lost", "unreadable_stats", "internal_error")
"""What the gateway counts as it befalls (`Gateway.event_counts`): a caller that hung up while its
call into the mesh ran on, a connection closed as its client took no reply within
`REPLY_TIMEOUT_S`, an ``/events`` stream closed as its reader took no event within
`STREAM_WRITE_TIMEOUT_S`, an event a lagging stream lost, a node's counters the dashboard
or ``/metrics`` could not read (each time), a 500 ``InternalError`` (a bug of the gateway's)."""
REFUSALS = ("requests_in_flight", "body_bytes_in_flight", "body_bytes_arriving", "event_streams",
            "answer_bytes_waiting", "connections", "body_too_large", "body_timeout", "unauthorized", "forbidden",
            "unsupported_media_type")
"""Why the gateway refuses (`Gateway.refusals`): 503 ``Busy`` as `MAX_IN_FLIGHT`,
`MAX_BODY_BYTES_IN_FLIGHT`, `MAX_BODY_BYTES_READING`, `MAX_LISTENERS` or
`MAX_ANSWER_BYTES_WAITING` is reached (the last in place of an answer, dropped); a
connection closed at once past ``max_connections``; 413; 408; 401; 403; 415."""


class GatewayError(ValueError):
    """The gateway cannot start as asked (e.g. a public address without a token)."""


class GatewayArgumentError(GatewayError):
    """The gateway's arguments are refused before anything starts: a ``listen`` that is
    not ``host:port``, or one off loopback without a token (``zmqmesh gateway``: status 2)."""


def _error(status: int, kind: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": kind, "message": message, **extra}, status=status)


def peer_json(peer: Peer, gateway: bool = False) -> dict[str, Any]:
    """A peer as the gateway shows it: `peer_dict`, and whether it is this gateway."""
    return {**peer_dict(peer), "gateway": gateway}


class Gateway:
    """The routes, bound to one running `AsyncNode`."""

    def __init__(self, node: AsyncNode, token: str | None, request_timeout_s: float, max_body_bytes: int,
                 hosts: frozenset[str] = LOOPBACK_HOSTS, tracebacks: bool = False,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.node = node
        self.body_timeout_s = body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.request_timeout_s = request_timeout_s
        self.hosts = frozenset(h.lower() for h in hosts)
        self.tracebacks = tracebacks
        self.listeners: set[_Stream] = set()
        self.in_flight = 0
        self.body_bytes = 0  # of the requests in flight
        self.reading_bytes = 0  # declared by the bodies being read
        self.answer_bytes = 0  # of the answers being written (`_send`)
        self.event_counts: dict[str, int] = dict.fromkeys(EVENTS, 0)  # since the start (`counters`)
        self.refusals: dict[str, int] = dict.fromkeys(REFUSALS, 0)  # by reason, since the start (`counters`)
        self.server: web.Server | None = None  # (set by `run_gateway`: its connections are counted)
        self._warned: set[str] = set()  # nodes whose unreadable counters were logged (bounded)
        self._stats: list[dict[str, Any]] | None = None  # the last collection's (`mesh_stats`)
        self._stats_bytes = 0  # what the last collection's answers hold, about (`MAX_STATS_BYTES`)
        self._unanswered: set[str] = set()  # ids of the nodes asked in vain, since they last answered (`_collect`)
        self._stats_began = 0.0  # when the last collection began
        self._collecting: asyncio.Future[list[dict[str, Any]]] | None = None  # the one in flight
        # the text of the last collection's counters (`metrics`), and the snapshots it could not read
        self._metrics: tuple[list[dict[str, Any]], bytes, list[tuple[Any, Exception]]] | None = None
        self._serving: set[asyncio.Task[Any]] = set()  # the requests being served (streams aside)
        self._cut: set[asyncio.Task[Any]] = set()  # those the stop cut off (`finish`)
        self._orphans: set[asyncio.Future[Any]] = set()  # calls into the mesh whose callers hung up
        self._stopping = False  # (`finish` began: a call whose caller goes is dropped, not kept)
        self.started_at = time.monotonic()  # an unknown service is answered at once after a grace

    # middleware --------------------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Turn every failure into a JSON error; refuse foreign hosts and cross-site
        requests; check the token; bound the requests in flight, and their bodies' bytes;
        then send the answer within `REPLY_TIMEOUT_S` (`_send`). A request the gateway's
        stop cuts off (`finish`) is answered 503 ``Stopping``."""
        if request.path == "/events":  # (a stream is ended by the stop: `end_streams`)
            return await self._send(request, await self._answer(request, handler))
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            try:
                response = await self._answer(request, handler)
            except asyncio.CancelledError:
                if task not in self._cut:
                    raise
                if sys.version_info >= (3, 11):
                    task.uncancel()  # (the cancel was the stop's, answered here: the task goes on)
                response = _error(503, "Stopping", f"the gateway stopped; the call did not end within {STOP_GRACE_S:g} s")
            response = self._within_answer_budget(response)  # (one dropped is let go here, before the wait)
            return await self._send(request, response)  # (cut off meanwhile: its connection is closed)
        finally:
            self._serving.discard(task)
            self._cut.discard(task)

    def _within_answer_budget(self, response: web.StreamResponse) -> web.StreamResponse:
        """``response``, or 503 ``Busy`` in its place if its body, over `SMALL_BODY_BYTES`,
        would take the answers being written (`_send`) past `MAX_ANSWER_BYTES_WAITING`
        (the answer dropped: counted, ``answer_bytes_waiting``, and logged)."""
        size = _body_bytes(response)
        if size <= SMALL_BODY_BYTES or not self.answer_bytes or self.answer_bytes + size <= MAX_ANSWER_BYTES_WAITING:
            return response
        _count_event(self.refusals, "answer_bytes_waiting", logging.WARNING,
                     f"dropped an answer of {size} bytes: {self.answer_bytes} bytes of answers wait for their readers")
        return _error(503, "Busy", f"the answer ({size} bytes) was dropped: {MAX_ANSWER_BYTES_WAITING} bytes of "
                                   "answers are waiting for their readers; try again")

    async def _send(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Write ``response`` out, its slot freed, its body's bytes counted meanwhile among
        the answers being written (`MAX_ANSWER_BYTES_WAITING`), and return it: a client that
        has not taken it within `REPLY_TIMEOUT_S` (it does not read) has its connection
        closed, counted (``slow_reader``) and logged (the first and every 1,000th), so that
        no reply waits for its reader forever, holding a connection."""
        size = _body_bytes(response)
        self.answer_bytes += size
        try:
            await asyncio.wait_for(self._write(request, response), REPLY_TIMEOUT_S)
        except ConnectionError:  # (the client hung up: nobody to answer)
            pass
        except asyncio.TimeoutError:
            _count_event(self.event_counts, "slow_reader", logging.WARNING,
                         f"closed a connection whose client took no reply for {REPLY_TIMEOUT_S:g} s")
            if request.transport is not None:
                request.transport.abort()
        finally:
            self.answer_bytes -= size
        return response

    @staticmethod
    async def _write(request: web.Request, response: web.StreamResponse) -> None:
        await response.prepare(request)
        await response.write_eof()

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The answer to ``request``, every failure as a JSON error (see `errors`)."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.token is not None and request.path != "/":
            supplied = request.headers.get("Authorization", "")
            # (the scheme's name is case-insensitive, RFC 9110: "bearer x" is "Bearer x")
            supplied = supplied[7:] if supplied[:7].lower() == "bearer " else request.query.get("token", "")
            # (a header's bytes that are not UTF-8 come as surrogates: they compare as they came)
            if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"),
                                       self.token.encode("utf-8", "surrogateescape")):
                return self._refuse("unauthorized", 401, "Unauthorized", "a valid bearer token is required")
        # streams have their own bound (MAX_LISTENERS); a scrape asks the nodes nothing of its
        # own (`mesh_stats`: one collection at a time, shared), and must be answered when the
        # gateway is busiest, which is when it is wanted most
        uncounted = request.path == "/events" or (request.path == "/metrics" and request.method in ("GET", "HEAD"))
        try:
            # the body first, then a slot: a slow body holds its connection alone (bounded in
            # number, MAX_CONNECTIONS, and in time, the body timeout), never a slot of those in flight
            size = len(await self._read_within_budget(request)) if request.method == "POST" else 0
            if not uncounted and self.in_flight >= MAX_IN_FLIGHT:
                return self._refuse("requests_in_flight", 503, "Busy", f"{MAX_IN_FLIGHT} requests are in flight; try again")
            if self.body_bytes and self.body_bytes + size > MAX_BODY_BYTES_IN_FLIGHT:
                return self._refuse("body_bytes_in_flight", 503, "Busy",
                                    f"{MAX_BODY_BYTES_IN_FLIGHT} bytes of requests are in flight; try again")
            self.in_flight += not uncounted
            self.body_bytes += size
            try:
                response: web.StreamResponse = await handler(request)
                return response
            finally:
                self.in_flight -= not uncounted
                self.body_bytes -= size
        except _Busy as exc:  # (the bodies arriving: `_read_within_budget`)
            return self._refuse("body_bytes_arriving", 503, "Busy", str(exc))
        except web.HTTPRequestTimeout as exc:
            return self._refuse("body_timeout", 408, "RequestTimeout", exc.text or "")
        except web.HTTPRequestEntityTooLarge:
            too_large = self._refuse("body_too_large", 413, "PayloadTooLarge", f"the body exceeds {self.max_body_bytes} bytes")
            too_large.force_close()  # (Connection: close: none other on it, even if the body does come)
            return too_large
        except web.HTTPNotFound:
            return _error(404, "NotFound", f"no route {request.method} {request.path}")
        except web.HTTPMethodNotAllowed as exc:
            return _error(405, "MethodNotAllowed", f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}")
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason or "HTTPError", exc.text or exc.reason or "")
        except asyncio.CancelledError:
            raise
        except ConnectionError:  # (the client hung up, e.g. mid-body: its answer goes nowhere, and nothing is logged)
            return _error(400, "BadRequest", "the connection was lost")
        except web.RequestPayloadError as exc:  # (a body aiohttp cannot decode: the client's, not a bug of ours)
            unreadable = _error(400, "BadRequest", f"the body cannot be read: {_said(exc)}")
            unreadable.force_close()  # (what follows it on the connection cannot be told apart)
            return unreadable
        except Exception as exc:  # a bug of ours: logged here, never a traceback to the client
            log.exception("error serving %s %s", request.method, request.path)
            self.event_counts["internal_error"] += 1
            return _error(500, "InternalError", f"{type(exc).__name__}: {exc}")

    def _refuse(self, reason: str, status: int, kind: str, message: str) -> web.Response:
        """The JSON error of a refusal, counted by its ``reason`` (one of `REFUSALS`)."""
        self.refusals[reason] += 1
        return _error(status, kind, message)

    def _refused(self, request: web.Request) -> web.Response | None:
        """A 403 or 415 for a request from where it must not come (counted), else None."""
        if self.token is None and _host_of(request.host) not in self.hosts:
            return self._refuse("forbidden", 403, "Forbidden", f"this gateway does not serve the host {request.host!r}")
        origin = request.headers.get("Origin")
        if origin is not None and not self._served_origin(origin, request):
            return self._refuse("forbidden", 403, "Forbidden", f"cross-site request from {origin!r} refused")
        site = request.headers.get("Sec-Fetch-Site")  # (a browser's word: the page's origin, or a typed address)
        link = request.path == "/" and request.method == "GET" and \
            request.headers.get("Sec-Fetch-Mode") == "navigate" and request.headers.get("Sec-Fetch-Dest") == "document"
        if site is not None and site not in ("same-origin", "none") and not link:  # (a link may open the dashboard)
            return self._refuse("forbidden", 403, "Forbidden", f"a request made by another site ({site}) refused")
        if request.method == "POST" and request.content_type != "application/json" and (
                request.body_exists or "Content-Type" in request.headers):  # (an empty form is still a form)
            return self._refuse("unsupported_media_type", 415, "UnsupportedMediaType",
                                "a POST body must be JSON, sent as 'application/json'")
        return None

    def _served_origin(self, origin: str, request: web.Request) -> bool:
        """Whether ``origin`` is this gateway's own: the request's scheme and port, and a host
        it serves ("null", a sandboxed page or a file, never is)."""
        try:
            parts = urlsplit(origin)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
            own_port = request.url.port
        except ValueError:  # (a port that is not a number, or past 65535: the Origin's or the Host's)
            return False
        return (parts.scheme.lower() == request.scheme and port == own_port
                and (parts.hostname or "") in self.hosts | {_host_of(request.host)})

    def _timeout(self, request: web.Request) -> float:
        raw = request.query.get("timeout")
        if raw is None:
            return self.request_timeout_s
        try:
            timeout = float(raw)
        except ValueError:
            raise _BadRequest(f"?timeout= must be a number of seconds, got {raw!r}") from None
        if not 0 <= timeout <= MAX_TIMEOUT_S:  # (NaN fails it too)
            raise _BadRequest(f"?timeout= must be between 0 and {MAX_TIMEOUT_S:g} seconds, got {raw!r}")
        return timeout + 0.0  # (-0 is 0)

    async def _read_within_budget(self, request: web.Request) -> bytes:
        """`_read`, once the body's declared size (or ``max_body_bytes`` for one sent in
        chunks) and its head's fit in `MAX_BODY_BYTES_READING` with those being read; a
        body of up to `SMALL_BODY_BYTES` with its head is always read. Raises `_Busy`
        otherwise, and 413 at once for a body that declares more than ``max_body_bytes``
        (none of it is read)."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        # (the head is held while the body comes: 1,024 heads of 232 KB whose bodies never
        # came held 470 MiB, counted as 1 byte each)
        declared = sum(len(name) + len(value) for name, value in request.raw_headers)
        if request.body_exists:  # (sent in chunks: what it may be; past the limit, aiohttp answers 413)
            declared += min(request.content_length or self.max_body_bytes, self.max_body_bytes)
        if declared > SMALL_BODY_BYTES and self.reading_bytes and \
                self.reading_bytes + declared > MAX_BODY_BYTES_READING:  # (one alone is read whatever its size)
            raise _Busy(f"{MAX_BODY_BYTES_READING} bytes of bodies are arriving; try again")
        self.reading_bytes += declared
        try:
            return await self._read(request)
        finally:
            self.reading_bytes -= declared

    async def _read(self, request: web.Request) -> bytes:
        """The body of ``request`` (kept by aiohttp: `_body` reads it again at no cost).
        Raises 408 past the body timeout, 413 past ``max_body_bytes``."""
        try:
            return await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text=f"the body did not arrive within {self.body_timeout_s:g} s") from None

    async def _body(self, request: web.Request) -> Any:
        """The body, parsed as JSON (`_parse`)."""
        return _parse(await self._read(request))

    async def _outlived(self, call: Coroutine[Any, Any, Any], size: int) -> Any:
        """What ``call``, a call into the mesh made for a request of ``size`` body bytes,
        returns or raises. It runs as a task of its own: if its caller hangs up (aiohttp
        cancels the handler), it goes on to its own end (its reply, its timeout, its
        provider lost), holding the caller's place among those in flight and its bytes
        until then (`_hold`), since the provider works on all the same; so `MAX_IN_FLIGHT`
        bounds the work the gateway has set going, not only the callers still there. A
        call whose caller goes once the stop began is dropped (`finish`)."""
        running = asyncio.ensure_future(call)
        running.add_done_callback(_seen)
        try:
            await asyncio.wait({running})  # (a cancel of the handler stops this wait, not the call)
        except asyncio.CancelledError:
            if self._stopping:
                running.cancel()
            elif not running.done():
                self._hold(running, size)
            raise
        return running.result()

    def _hold(self, running: asyncio.Future[Any], size: int) -> None:
        """Keep a place among the requests in flight, and ``size`` body bytes, until
        ``running`` (a call whose caller hung up) ends; counted (``hung_up``), and logged
        the first and every 1,000th time."""
        self.in_flight += 1
        self.body_bytes += size
        self._orphans.add(running)
        _count_event(self.event_counts, "hung_up", logging.INFO,
                     "a caller hung up before its reply: its call into the mesh holds its place until it ends")

        def let_go(_: asyncio.Future[Any]) -> None:
            self.in_flight -= 1
            self.body_bytes -= size
            self._orphans.discard(running)

        running.add_done_callback(let_go)

    def _failure(self, exc: Exception, service: str | None = None) -> web.Response:
        """The JSON error for what a route's call into the mesh raised; anything else is
        raised again (the middleware's 500)."""
        if isinstance(exc, RemoteError):
            log.warning("the handler of %r raised %r: %r\n%s", service, exc.remote_type[:200],
                        _cut(exc.remote_message, LOGGED_REMOTE_CHARS), _quoted(exc.remote_traceback))
            extra = {"traceback": exc.remote_traceback} if self.tracebacks else {}
            return _error(500, "RemoteError", exc.remote_message, remote_type=exc.remote_type, **extra)
        if isinstance(exc, (_BadRequest, ValueError, TypeError)):  # (bad data, names, timeouts, too large)
            return _error(400, "BadRequest", str(exc))
        if isinstance(exc, PeerLostError):
            return _error(502, "PeerLostError", str(exc))
        if isinstance(exc, NoProviderError):
            return _error(503, "NoProviderError", str(exc))
        if isinstance(exc, MeshTimeoutError):
            return _error(504, "MeshTimeoutError", str(exc))
        if isinstance(exc, ZmqMeshError):  # (the node stops, its store is full, ...)
            return _error(503, type(exc).__name__, str(exc))
        raise exc

    # routes -----------------------------------------------------------------------------------

    def _met_mesh(self) -> bool:
        """Whether a missing provider or puller is missing for real: the gateway knows a
        peer, or looked for them for `_DISCOVERY_GRACE_S`."""
        return bool(self.node.peers()) or time.monotonic() - self.started_at > _DISCOVERY_GRACE_S

    async def request(self, request: web.Request) -> web.Response:
        """POST /request/{service}."""
        service = request.match_info["service"]
        try:
            raw = await self._read(request)
            data = _parse(raw)
            timeout = self._timeout(request)
            if not self.node.providers(service) and self._met_mesh():
                raise NoProviderError(f"no node offers the service {service!r} in mesh {self.node.config.mesh!r}")
            reply = await self._outlived(self.node.request(service, data, timeout=timeout), len(raw))
        except Exception as exc:
            return self._failure(exc, service)
        try:
            text = dumps(reply)
        except (TypeError, ValueError, RecursionError) as exc:  # (e.g. nested past what JSON's encoder recurses)
            log.warning("a reply of %r has no JSON form: %s", service, exc)
            return _error(502, "BadReply", f"the reply has no JSON form: {type(exc).__name__}")
        return web.Response(text=text, content_type="application/json")

    async def publish(self, request: web.Request) -> web.Response:
        """POST /publish/{topic}."""
        try:
            data = await self._body(request)
            await self.node.publish(request.match_info["topic"], data)
        except Exception as exc:
            return self._failure(exc)
        return web.json_response({"status": "published"}, status=202)

    async def push(self, request: web.Request) -> web.Response:
        """POST /push/{queue}."""
        queue = request.match_info["queue"]
        try:
            data = await self._body(request)
            timeout = self._timeout(request)
            if not any(queue in peer.queues for peer in self.node.peers()) and self._met_mesh():
                timeout = 0.0  # nobody pulls it: NoProviderError at once (the push still checks the name first)
            await self.node.push(queue, data, timeout=timeout)
        except Exception as exc:
            return self._failure(exc)
        return web.json_response({"status": "queued"}, status=202)

    def membership(self) -> list[dict[str, Any]]:
        """Every node, the gateway included."""
        me = self.node.as_peer()
        return [peer_json(me, gateway=True)] + [peer_json(p) for p in sorted(self.node.peers(), key=lambda p: p.name)]

    async def peers(self, request: web.Request) -> web.Response:
        """GET /peers."""
        return web.Response(text=dumps(self.membership()), content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """GET /events: a Server-Sent Events stream. A reader that takes no event for
        `STREAM_WRITE_TIMEOUT_S` is disconnected; one that lags loses events past
        `MAX_STREAM_BYTES` waiting (both counted: ``stream_stalled``, ``stream_event_lost``).
        HEAD /events: the stream's head alone (no stream is opened)."""
        if len(self.listeners) >= MAX_LISTENERS:
            return self._refuse("event_streams", 503, "Busy", f"{MAX_LISTENERS} event streams are open; try again")
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if request.method == "HEAD":  # (a body after a HEAD's answer would be read as the next answer)
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        stream = _Stream()
        self.listeners.add(stream)
        try:
            chunk: bytes | None = _sse("snapshot", self.membership())
            while chunk is not None:  # (None: the gateway stops)
                await asyncio.wait_for(response.write(chunk), STREAM_WRITE_TIMEOUT_S)
                chunk = await stream.next(15)
        except asyncio.TimeoutError:  # (a reader that stopped reading: its connection goes, not just the stream)
            self.event_counts["stream_stalled"] += 1
            log.warning("closed an /events stream whose reader took no event for %g s", STREAM_WRITE_TIMEOUT_S)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass
        finally:  # (a cancel goes on up: the task that serves the stream ends cancelled)
            self.listeners.discard(stream)
            if stream.lost:
                log.warning("an /events stream that lagged lost %d event(s)", stream.lost)
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: every zmqmesh node's counters, for Prometheus (one scrape, the mesh),
        and the gateway's own (`counters`, read as the scrape is answered)."""
        snapshots = await self.mesh_stats()
        try:
            made = self._metrics
            if made is None or made[0] is not snapshots:
                # once a collection, not once a scrape: scrapes are not bounded by MAX_IN_FLIGHT,
                # and as many as there are connections may wait on one collection, then be answered
                # back to back (a mesh of 64 nodes with 100 names each: 43 ms a text)
                unread: list[tuple[Any, Exception]] = [(s, s.error) for s in snapshots if type(s) is _Unanswered]
                readable = [s for s in snapshots if type(s) is not _Unanswered]
                made = self._metrics = (snapshots, metrics_text(readable, unreadable=lambda s, e: unread.append((s, e))),
                                        unread)
            for snap, exc in made[2]:  # (counted at each scrape, as before)
                self._unreadable(snap, exc)
            text = made[1] + metrics_text(None, gateway=self.counters())
        except ConfigError as exc:  # prometheus_client is not installed
            return _error(501, "NotImplemented", str(exc))
        return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def counters(self) -> dict[str, Any]:
        """The gateway's own counters, as ``/metrics`` (`metrics_text`) and the dashboard's
        ``stats`` events show them: its node's ``id`` and ``name``; ``events`` (`EVENTS`) and
        ``refused`` (`REFUSALS`), counts since it started; ``gauges``, what is in flight or
        open now: ``requests_in_flight`` (streams and scrapes aside; calls whose callers hung up
        included), ``in_flight_body_bytes``, ``arriving_body_bytes`` (declared by the bodies
        being read, with their requests' heads), ``waiting_answer_bytes`` (the bodies of the
        answers being written), ``event_streams``, ``hung_up_calls``, ``stats_bytes`` (what the
        last collection of the nodes' answers holds, about: `MAX_STATS_BYTES`), and ``connections`` when served
        by `run_gateway`."""
        gauges = {"requests_in_flight": self.in_flight, "in_flight_body_bytes": self.body_bytes,
                  "arriving_body_bytes": self.reading_bytes, "waiting_answer_bytes": self.answer_bytes,
                  "event_streams": len(self.listeners),
                  "hung_up_calls": len(self._orphans), "stats_bytes": self._stats_bytes}
        if self.server is not None:
            gauges["connections"] = len(self.server.connections)
        me = self.node.as_peer()
        return {"id": me.id, "name": me.name, "events": dict(self.event_counts), "refused": dict(self.refusals),
                "gauges": gauges}

    async def mesh_stats(self) -> list[dict[str, Any]]:
        """The counters of every zmqmesh node that answers within a second, the gateway's
        first (an answer that is not a map at all, an `_Unanswered` in its place), read at
        most `STATS_MAX_AGE_S` before this call: one collection at a time,
        shared by every caller while it is in flight and for `STATS_MAX_AGE_S` from its
        start (a flood of scrapes asks each node once a second, not once a scrape). The
        list is shared: not to be changed. Raises what the collection raised."""
        while True:
            now = time.monotonic()
            fresh = now - self._stats_began < STATS_MAX_AGE_S
            if self._collecting is not None:  # (shielded: a caller that hangs up cancels only its wait)
                result = await asyncio.shield(self._collecting)
                if fresh:
                    return result
                continue  # (it began too long ago, a node being slow: the next one)
            if self._stats is not None and fresh:
                return self._stats
            self._stats_began = now
            self._collecting = asyncio.ensure_future(self._collect())
            self._collecting.add_done_callback(self._collected)

    def _collected(self, collection: asyncio.Future[list[dict[str, Any]]]) -> None:
        self._collecting = None
        failed = collection.cancelled() or collection.exception() is not None
        self._stats = None if failed else collection.result()  # (a failed one: the next caller collects anew)
        if self._metrics is not None and self._metrics[0] is not self._stats:
            self._metrics = None  # (the text of a collection before, which it would keep alive)

    async def _collect(self) -> list[dict[str, Any]]:
        """Ask every zmqmesh node for its counters (`STATS_COLLECTION_S` at most), the
        gateway's first, each under the id and name of the node asked (an answer may claim
        another's); the answers held within `MAX_STATS_BYTES` (`_Answers`). The nodes asked
        in vain since they last answered are asked last: each holds a turn to its end, and
        would keep the others out."""
        peers = sorted((p for p in self.node.peers() if p.is_zmqmesh), key=lambda p: p.id in self._unanswered)
        answers = _Answers()
        asking = asyncio.Semaphore(STATS_ASKS_AT_ONCE)  # (its waiters go in turn: the order of ``peers``)
        deadline = time.monotonic() + STATS_COLLECTION_S
        in_vain = await asyncio.gather(*(self._ask(peer, answers, asking, deadline) for peer in peers))
        self._unanswered = {peer.id for peer, unanswered in zip(peers, in_vain)
                            if unanswered or (unanswered is None and peer.id in self._unanswered)}
        self._stats_bytes = answers.bytes
        me = self.node.as_peer()
        return [{"id": me.id, "name": me.name, **self.node.stats()}, *answers.collected(peers)]

    async def _ask(self, peer: Peer, answers: _Answers, asking: asyncio.Semaphore, deadline: float) -> bool | None:
        """Ask ``peer`` for its counters once ``asking`` lets it (`STATS_ASKS_AT_ONCE`), until
        ``deadline`` (`time.monotonic`) at most, its answer sized and kept (or let go) before
        the next node is asked: answers are never held unsized, whatever their number. A
        node not asked by the deadline, one that does not answer in time, or leaves, is not
        listed. True if ``peer`` was asked in vain, False if it answered, None if it was
        not asked."""
        async with asking:
            left = deadline - time.monotonic()
            if left <= 0:  # (the collection's time is over: not asked)
                return None
            try:
                answer = await self.node.node_stats(peer, timeout=min(1.0, left))
            except DecodeError as exc:  # (not a map at all: a stranger's)
                answers.refuse(peer, exc)
            except Exception:  # (timed out, lost, the gateway stops)
                return True
            else:
                answers.add(peer, answer)
            return False

    async def dashboard(self, request: web.Request) -> web.Response:
        """GET /: the dashboard page."""
        page = resources.files("zmqmesh.tools").joinpath("dashboard.html").read_text()
        return web.Response(text=page, content_type="text/html",  # (never in another site's frame)
                            headers={"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"})

    # stop -------------------------------------------------------------------------------------

    async def finish(self, app: web.Application | None = None) -> None:
        """Give the requests being served `STOP_GRACE_S` to end, then cut off those still
        running: each is answered 503 ``Stopping`` (by `errors`), or has its connection
        closed if its answer is being written. Drops at once the calls into the mesh whose
        callers hung up (`_outlived`), and a collection of the nodes' counters in flight.
        (The application's ``on_shutdown``: the listening socket is closed by then, and
        idle connections.)"""
        self._stopping = True
        for running in list(self._orphans):
            running.cancel()
        if self._serving or self._orphans:
            await asyncio.wait(self._serving | self._orphans, timeout=STOP_GRACE_S)
        for task in list(self._serving):
            self._cut.add(task)
            task.cancel()
        if self._collecting is not None:
            self._collecting.cancel()

    # events -----------------------------------------------------------------------------------

    def end_streams(self) -> None:
        """End every open /events stream (the gateway stops: it must not wait for them)."""
        for stream in list(self.listeners):
            stream.end()

    def broadcast(self, event: str, data: Any) -> None:
        """Queue an event for every open /events stream (a stream that lags loses events,
        counted: ``stream_event_lost``)."""
        chunk = _sse(event, data)
        for stream in list(self.listeners):
            if not stream.put(chunk):
                self.event_counts["stream_event_lost"] += 1

    async def poll_stats(self) -> None:
        """Every second, collect every zmqmesh node's counters and broadcast them, with the
        gateway's own (`counters`). A node whose counters cannot be read (another version's,
        or a stranger's) is left out, counted (``unreadable_stats``) and logged once; nothing
        stops the polling but a cancel."""
        while True:
            await asyncio.sleep(_STATS_INTERVAL_S)
            if not self.listeners:
                continue
            try:
                stats: dict[str, Any] = {}
                for snap in await self.mesh_stats():
                    try:
                        if type(snap) is _Unanswered:
                            raise snap.error
                        stats[str(snap["id"])] = _dashboard_view(snap)
                    except Exception as exc:
                        self._unreadable(snap, exc)
                self.broadcast("stats", {"time": time.time(), "nodes": stats, "gateway": self.counters()})
            except Exception:
                log.exception("collecting the nodes' counters for the dashboard failed")

    def _unreadable(self, snap: Any, exc: Exception) -> None:
        self.event_counts["unreadable_stats"] += 1
        name = str(snap.get("name") if isinstance(snap, dict) else None)[:64]
        if name not in self._warned:
            if len(self._warned) >= 1024:
                self._warned.clear()
            self._warned.add(name)
            log.warning("the counters of node %r cannot be shown (%s: %s); left out of the dashboard and "
                        "/metrics", name, type(exc).__name__, exc)


class _Answers:
    """The nodes' answers to one collection of their counters, held within
    `MAX_STATS_BYTES` together: one past `MAX_NODE_STATS_BYTES` is refused as it comes,
    and while they pass the budget the largest is let go, so that the smallest are kept
    whatever the order they came in. Each refused or let go is told in its node's place
    (`collected`), as an `_Unanswered` with why."""

    def __init__(self) -> None:
        self.bytes = 0
        self._kept: dict[str, tuple[int, dict[str, Any]]] = {}  # by peer id: (size, answer)
        self._refused: dict[str, Exception] = {}  # by peer id

    def add(self, peer: Peer, answer: dict[str, Any]) -> None:
        """Keep ``answer``, ``peer``'s, if it fits (see the class)."""
        try:
            size = _held_bytes(answer, MAX_NODE_STATS_BYTES)
        except ValueError as exc:
            self.refuse(peer, exc)
            return
        self._kept[peer.id] = (size, answer)
        self.bytes += size
        while self.bytes > MAX_STATS_BYTES:
            largest = max(self._kept, key=lambda peer_id: self._kept[peer_id][0])
            size = self._kept.pop(largest)[0]
            self.bytes -= size
            self._refused[largest] = ValueError(
                f"counters of about {size} bytes, past the {MAX_STATS_BYTES} the gateway holds of all nodes' "
                f"with those of {self.bytes} bytes of others")

    def refuse(self, peer: Peer, error: Exception) -> None:
        """Hold none of ``peer``'s answer: told in its place, with ``error`` (without its
        traceback, whose frames hold the answer: kept, 16 refused answers of 9 MB held 145 MB)."""
        error.__traceback__ = error.__context__ = error.__cause__ = None
        self._refused[peer.id] = error

    def collected(self, peers: list[Peer]) -> list[dict[str, Any]]:
        """The answers kept, in the order of ``peers``, each under the id and name of the node
        asked; an `_Unanswered` for each refused; nothing for a node that did not answer."""
        made: list[dict[str, Any]] = []
        for peer in peers:
            if peer.id in self._kept:
                made.append({**self._kept[peer.id][1], "id": peer.id, "name": peer.name})
            elif peer.id in self._refused:
                made.append(_Unanswered(peer, self._refused[peer.id]))
        return made


def _held_bytes(value: Any, limit: int) -> int:
    """About how many bytes ``value`` (a decoded answer: maps, lists, text, numbers) holds:
    the `sys.getsizeof` of each of its objects, a key or an object met twice counted each
    time. Raises ``ValueError`` once past ``limit`` (the walk stops there: its cost is
    bounded by ``limit``, not by the answer; any depth of nesting)."""
    size = 0
    waiting = [value]
    while waiting:
        item = waiting.pop()
        size += sys.getsizeof(item)
        if size > limit:
            raise ValueError(f"counters of more than {limit} bytes, past what a node's may hold")
        if type(item) is dict:
            waiting.extend(item.keys())
            waiting.extend(item.values())
        elif type(item) in (list, tuple):
            waiting.extend(item)
    return size


class _Unanswered(dict[str, Any]):
    """In a collection of the nodes' counters (`Gateway.mesh_stats`), the place of a node
    whose answer was not a map at all (`DecodeError`: a stranger's): its id and name, and
    the ``error``, for it to be counted and logged as unreadable (``unreadable_stats``)
    where those of another shape are. (Left out silently, it was counted nowhere.)"""

    def __init__(self, peer: Peer, error: Exception) -> None:
        super().__init__(id=peer.id, name=peer.name)
        self.error = error


MAX_VIEW_ENTRIES = 2048
"""Entries of each map of a node's counters the dashboard draws (a node of this version
has at most 1,024 peers and 257 services timed); counters with more are left out whole
(as those of another shape are): every stats event carried a stranger's million names,
to every stream, each second."""
MAX_VIEW_KEY_CHARS = 1024
"""Characters of a key of those maps (a peer's id, a service, an event); counters with a
longer one are left out whole."""


def _dashboard_view(snap: dict[str, Any]) -> dict[str, Any]:
    """What the dashboard draws of a node's counters: the patterns' counters, what it
    received from each peer (the edges), its rejects, and the latency of what it called.
    Raises `TypeError`, `KeyError` or `ValueError` for counters not shaped as this
    version's, or with a map of more than `MAX_VIEW_ENTRIES` entries or a key past
    `MAX_VIEW_KEY_CHARS` (checked before the view is made)."""
    for key in ("pubsub", "pipeline", "request", "service", "zre", "peers", "rejected", "latency"):
        entries = dict(snap.get(key) or {})
        if len(entries) > MAX_VIEW_ENTRIES:
            raise ValueError(f"{len(entries)} entries in {key!r}; at most {MAX_VIEW_ENTRIES}")
        if any(len(str(name)) > MAX_VIEW_KEY_CHARS for name in entries):
            raise ValueError(f"a key of more than {MAX_VIEW_KEY_CHARS} characters in {key!r}")
    view: dict[str, Any] = {k: {str(name): _count(n) for name, n in dict(snap.get(k) or {}).items()}
                            for k in ("pubsub", "pipeline", "request", "service", "zre")}
    view["from"] = {str(peer): _count(counts.get("received", 0)) for peer, counts in (snap.get("peers") or {}).items()}
    view["rejected"] = sum(_count(n) for n in (snap.get("rejected") or {}).values())
    view["latency"] = {str(service): [_count(h["sum"]), _count(h["count"])]
                       for service, h in (snap.get("latency") or {}).items()}
    return view


def _count(value: Any) -> int | float:
    """``value`` if it is a number (what counters hold), else `TypeError`: a node's view
    holds nothing else, so nothing of a stranger's shape reaches the event's encoding."""
    if type(value) not in (int, float):
        raise TypeError(f"a counter that is not a number: {type(value).__name__}")
    return value  # type: ignore[no-any-return]


class _Stream:
    """The events waiting to be written to one ``/events`` stream: at most
    `MAX_STREAM_BYTES`, or one event alone (past them, an event is lost, and counted in
    `lost`)."""

    def __init__(self) -> None:
        self._chunks: deque[bytes | None] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.lost = 0

    def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``, unless it would make more than `MAX_STREAM_BYTES` wait (one
        alone waits whatever its size: a large mesh's counters are one large event).
        Returns whether it was queued."""
        if self._bytes and self._bytes + len(chunk) > MAX_STREAM_BYTES:
            self.lost += 1
            return False
        self._chunks.append(chunk)
        self._bytes += len(chunk)
        self._ready.set()
        return True

    def end(self) -> None:
        """End the stream: what waits is dropped, and `next` gives None."""
        self._chunks.clear()
        self._bytes = 0
        self._chunks.append(None)
        self._ready.set()

    async def next(self, keep_alive_s: float) -> bytes | None:
        """The next chunk to write; a keep-alive comment after ``keep_alive_s`` without one;
        None once the stream ended."""
        if not self._chunks:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), keep_alive_s)
            except asyncio.TimeoutError:
                return b": keep-alive\n\n"
        chunk = self._chunks.popleft()
        if chunk is not None:
            self._bytes -= len(chunk)
        return chunk


class _BadRequest(Exception):
    pass


class _Busy(Exception):
    pass


def _body_bytes(response: web.StreamResponse) -> int:
    """The bytes of ``response``'s body held in memory (0 for a stream's)."""
    body = response.body if isinstance(response, web.Response) else None
    return len(body) if isinstance(body, (bytes, bytearray)) else 0


def _count_event(counts: dict[str, int], key: str, level: int, message: str) -> None:
    """Add one to ``counts[key]``, and log ``message`` with the count so far the first and
    every 1,000th time (a flood costs the log a line per thousand)."""
    counts[key] += 1
    if counts[key] == 1 or counts[key] % 1000 == 0:
        log.log(level, "%s (%d so far)", message, counts[key])


def _seen(done: asyncio.Future[Any]) -> None:
    """Mark what ``done`` raised as seen: asyncio logs a failure nobody looked at, and a
    call whose caller hung up has nobody left to be told of it."""
    if not done.cancelled():
        done.exception()


def _parse(raw: bytes) -> Any:
    """A body parsed as JSON (None if empty). Raises `_BadRequest` for what is not JSON:
    bad syntax or text, ``NaN`` or infinities, nesting deeper than Python recurses."""
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as exc:  # (JSONDecodeError is a ValueError)
        raise _BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _BadRequest("the body is not valid JSON: it is nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is too large a number")
    return value


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


def create_app(node: AsyncNode, token: str | None = None, max_body_bytes: int = 1024 * 1024,
               request_timeout_s: float = 10.0, hosts: frozenset[str] = LOOPBACK_HOSTS,
               tracebacks: bool = False, body_timeout_s: float = BODY_TIMEOUT_S) -> tuple[web.Application, Gateway]:
    """The aiohttp application of a gateway on a running ``node``: it answers the ``Host``
    names ``hosts`` (without a token), and sends remote tracebacks only with ``tracebacks``.
    Raises `GatewayArgumentError` for an empty ``token`` (`_check_token`)."""
    _check_token(token)
    gateway = Gateway(node, token, request_timeout_s, max_body_bytes, hosts, tracebacks, body_timeout_s)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[gateway.errors])
    app.router.add_post("/request/{service}", gateway.request)
    app.router.add_post("/publish/{topic}", gateway.publish)
    app.router.add_post("/push/{queue}", gateway.push)
    app.router.add_get("/peers", gateway.peers)
    app.router.add_get("/events", gateway.events)
    app.router.add_get("/metrics", gateway.metrics)
    app.router.add_get("/", gateway.dashboard)
    app.on_response_prepare.append(_no_sniffing)
    app.on_shutdown.append(gateway.finish)
    node.on_join(lambda peer: gateway.broadcast("join", peer_json(peer)))
    node.on_leave(lambda peer: gateway.broadcast("leave", peer_json(peer)))
    return app, gateway


async def _no_sniffing(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer's ``Content-Type`` is the one a browser goes by: a JSON answer (which
    may carry what a caller sent) is never sniffed and read as a page, a script or a style."""
    response.headers["X-Content-Type-Options"] = "nosniff"


def _bound_connections(gateway: Gateway, server: web.Server | None, limit: int) -> None:
    """Close each connection past ``limit`` open at once, as soon as it is made (counted in
    the ``gateway``'s refusals, which counts ``server``'s connections from now on)."""
    assert server is not None, "runner.setup() first"
    gateway.server = server
    made = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > limit:
            transport.close()
            _count_event(gateway.refusals, "connections", logging.WARNING,
                         f"{limit} HTTP connections are open: closed a new one")

    server.connection_made = connection_made  # type: ignore[method-assign]


class _MalformedHttp(logging.Filter):
    """What aiohttp logs of a request it could not parse (a client's malformed HTTP,
    answered 400): counted, and one line without traceback for the first and every
    1,000th (a traceback each let one client write 8 times what it sent into the log);
    anything else as it comes."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            return True
        self.count += 1
        if self.count != 1 and self.count % 1000:
            return False
        said = _said(exc)
        record.msg, record.args = "%d malformed HTTP request(s) answered 400 so far (last: %s)", (self.count, said)
        record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.WARNING, "WARNING"
        return True


LOGGED_REMOTE_CHARS = 4096
"""Characters logged of a remote handler's message, and of its traceback (its last ones):
what a provider sends may reach 16 MiB, logged at each call a client makes."""


def _cut(text: str, chars: int) -> str:
    """``text``, cut to its first ``chars`` characters (said so) if longer."""
    return text if len(text) <= chars else text[:chars] + f" ...(cut: {len(text)} characters)"


def _quoted(traceback_text: str) -> str:
    """A remote traceback as lines of the gateway's log may hold it: its last
    `LOGGED_REMOTE_CHARS` characters, each line set off by ``  | `` and its control
    characters written as ``\\xNN`` (the provider's text can begin no line of the log)."""
    tail = traceback_text[-LOGGED_REMOTE_CHARS:]
    return "\n".join("  | " + shown(line) for line in tail.splitlines())


def _said(exc: BaseException) -> str:
    """The first line of what aiohttp says of a client's malformed HTTP: an
    `HttpProcessingError`'s message, or that of the one a ``RequestPayloadError`` (a body
    it cannot decode, e.g. ``Content-Encoding: gzip`` on bytes that are not) wraps."""
    if isinstance(exc, web.RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
        exc = exc.__cause__
    text = str(exc.message) if isinstance(exc, HttpProcessingError) else str(exc)
    return (text.strip() or type(exc).__name__).splitlines()[0][:200]


_http_log = logging.getLogger("zmqmesh.gateway.http")
_http_log.addFilter(_MalformedHttp())


def _host_of(authority: str) -> str:
    """The host of a ``host[:port]`` (IPv6 in brackets), lower-cased; anything else whole
    (``127.0.0.1:1@evil`` is no host and port: it matches no name a gateway serves)."""
    authority = authority.strip().lower()
    if authority.startswith("[") and "]" in authority:
        end = authority.index("]")
        host, port = authority[1:end], authority[end + 1:]
    elif authority.count(":") == 1:
        host, port = authority.split(":")[0], ":" + authority.split(":")[1]
    else:  # (no port, or an IPv6 address without brackets)
        return authority
    digits = port[1:]
    if port and not (port.startswith(":") and (digits == "" or (digits.isascii() and digits.isdigit()))):
        return authority
    return host


def _check_token(token: str | None) -> None:
    """Raise `GatewayArgumentError` for an empty token: taken as a token, it would turn the
    ``Host`` check off (made only without one) and let in every request, which all carry it."""
    if token == "":
        raise GatewayArgumentError("the token is empty: give one, or None for no token")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def run_gateway(listen: str, token: str | None = None, ready: Any = None, hosts: tuple[str, ...] = (),
                      tracebacks: bool = False, *, max_connections: int = MAX_CONNECTIONS,
                      idle_timeout_s: float = IDLE_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                      **node_options: Any) -> None:
    """Join the mesh and serve HTTP on ``listen`` (``host:port``; port 0: any free one)
    until cancelled, calling ``ready`` with its base URL (the port bound) once it listens. Without a
    token, it answers the loopback names, the listen host and ``hosts``. At most
    ``max_connections`` are open at once; one idle (or sending its head) for
    ``idle_timeout_s`` is closed, a body slower than ``body_timeout_s`` answered 408.
    Raises `GatewayArgumentError` for a bad address, or one off loopback without a
    token, or an empty token; `GatewayError` for one it cannot listen on."""
    host, _, port_text = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:8080
    if not host or not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise GatewayArgumentError(f"--listen must be host:port with a port from 0 to 65535, got {listen!r}")
    if not _is_loopback(host) and not token:
        raise GatewayArgumentError(f"listening on {host} (not loopback) needs a bearer token (--token or ZMQMESH_GATEWAY_TOKEN)")
    _check_token(token)
    async with AsyncNode(node_options.pop("name", "gateway"), **node_options) as node:
        app, gateway = create_app(node, token, hosts=LOOPBACK_HOSTS | {_host_of(h) for h in (host, *hosts)},
                                  tracebacks=tracebacks, body_timeout_s=body_timeout_s)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout_s,  # (a slow head too)
                               logger=_http_log,  # (a malformed request: a counted line, not a traceback each)
                               max_headers=MAX_HEADERS,  # (the heads' memory: MAX_HEADERS' docstring)
                               shutdown_timeout=_STOP_WRITE_S,  # (after `finish`: for its answers)
                               lingering_time=LINGER_S,  # (the rest of a body refused unread, e.g. a 413)
                               handler_cancellation=True)  # (a client that hangs up: its handler ends at once)
        await runner.setup()
        _bound_connections(gateway, runner.server, max_connections)
        site = web.TCPSite(runner, host, int(port_text))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise GatewayError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        stats_task = asyncio.create_task(gateway.poll_stats())
        # (the port bound, not the one asked: port 0 is any free one)
        url = f"http://{listen.rpartition(':')[0]}:{runner.addresses[0][1]}"
        log.info("gateway on %s (mesh %r)", url, node.config.mesh)
        if ready is not None:
            ready(url)
        try:
            await asyncio.Event().wait()
        finally:
            stats_task.cancel()
            gateway.end_streams()
            await runner.cleanup()
