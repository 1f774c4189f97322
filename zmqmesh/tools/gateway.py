"""`zmqmesh gateway`: an HTTP door into the mesh, and a live dashboard.

The gateway is a mesh node (an `AsyncNode`) serving, with aiohttp (the optional
``zmqmesh[gateway]`` extra):

    POST /request/{service}   JSON body in, the reply as JSON out
    POST /publish/{topic}     JSON body; 202 once handed to the mesh
    POST /push/{queue}        JSON body; 202 once handed to the mesh
    GET  /peers               the membership as JSON
    GET  /events              Server-Sent Events: joins, leaves, per-node counters, edges, latencies
    GET  /metrics             every node's counters for Prometheus (the ``metrics`` extra)
    GET  /                    the dashboard (one self-contained page, no CDN)

Errors are JSON ``{"error": type, "message": ..., ...}`` with a status per kind:
400 bad JSON or a bad ``?timeout=``, 401 missing or wrong token, 403 a foreign ``Host`` or
``Origin``, 404 unknown route, 405 wrong method, 408 a body slower than 10 s, 413 body
too large, 415 a POST whose body
is not ``application/json``, 500 the remote handler raised (its type and message; the
traceback only with ``tracebacks=True``), 502 the provider was lost mid-request, 503
nobody offers it (at once) or too many requests in flight, 504 timeout.

It listens on loopback by default; on any other address a bearer token is required.
Without a token it answers only the ``Host`` names it serves (against DNS rebinding), and
with or without one it refuses cross-site requests: a POST must say ``application/json``
(which a page on another site cannot send without a CORS preflight, never granted here)
and a request whose ``Origin`` is another site is refused.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from importlib import resources
from typing import Any

from zmqmesh import (
    AsyncNode,
    ConfigError,
    MeshTimeoutError,
    NoProviderError,
    Peer,
    PeerLostError,
    RemoteError,
    metrics_text,
)

from .jsonview import dumps, peer_dict

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("the gateway needs aiohttp: pip install 'zmqmesh[gateway]'") from exc

__all__ = ["create_app", "run_gateway", "GatewayError"]

log = logging.getLogger("zmqmesh.gateway")

_STATS_INTERVAL_S = 1.0
MAX_TIMEOUT_S = 300.0
"""The longest ``?timeout=`` a request may ask for."""
MAX_IN_FLIGHT = 256
"""Requests served at once (event streams aside); past it, 503 at once."""
MAX_LISTENERS = 64
"""Event streams (``/events``) open at once; past it, 503."""
MAX_CONNECTIONS = 1024
"""HTTP connections open at once; past it, a new one is closed at once (logged)."""
BODY_TIMEOUT_S = 10.0
"""How long a client may take to send a request's body; past it, 408."""
IDLE_TIMEOUT_S = 15.0
"""How long a connection may sit idle, or take to send a request's head, before it is closed."""
_DISCOVERY_GRACE_S = 3.0
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class GatewayError(ValueError):
    """The gateway cannot start as asked (e.g. a public address without a token)."""


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
        self.listeners: set[asyncio.Queue[str | None]] = set()
        self.in_flight = 0
        self.started_at = time.monotonic()  # an unknown service is answered at once after a grace

    # middleware --------------------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Turn every failure into a JSON error; refuse foreign hosts and cross-site
        requests; check the token; bound the requests in flight."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.token is not None and request.path != "/":
            supplied = request.headers.get("Authorization", "")
            supplied = supplied[7:] if supplied.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(supplied.encode(), self.token.encode()):
                return _error(401, "Unauthorized", "a valid bearer token is required")
        streaming = request.path == "/events"  # (streams have their own bound: MAX_LISTENERS)
        if not streaming and self.in_flight >= MAX_IN_FLIGHT:
            return _error(503, "Busy", f"{MAX_IN_FLIGHT} requests are in flight; try again")
        self.in_flight += not streaming
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPRequestTimeout as exc:
            return _error(408, "RequestTimeout", exc.text or "")
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "PayloadTooLarge", f"the body exceeds {self.max_body_bytes} bytes")
        except web.HTTPNotFound:
            return _error(404, "NotFound", f"no route {request.method} {request.path}")
        except web.HTTPMethodNotAllowed as exc:
            return _error(405, "MethodNotAllowed", f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}")
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason or "HTTPError", exc.text or exc.reason or "")
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # a bug of ours: logged here, never a traceback to the client
            log.exception("error serving %s %s", request.method, request.path)
            return _error(500, "InternalError", f"{type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= not streaming

    def _refused(self, request: web.Request) -> web.Response | None:
        """A 403 or 415 for a request from where it must not come, else None."""
        if self.token is None and _host_of(request.host) not in self.hosts:
            return _error(403, "Forbidden", f"this gateway does not serve the host {request.host!r}")
        origin = request.headers.get("Origin")
        if origin is not None:  # ("null": a sandboxed page, a file: always another site)
            origin_host = _host_of(origin.split("://", 1)[-1]) if origin != "null" else None
            if origin_host not in self.hosts | {_host_of(request.host)}:
                return _error(403, "Forbidden", f"cross-site request from {origin!r} refused")
        if request.method == "POST" and request.content_type != "application/json" and request.body_exists:
            return _error(415, "UnsupportedMediaType", "a POST body must be JSON, sent as 'application/json'")
        return None

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
        return timeout

    async def _body(self, request: web.Request) -> Any:
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text=f"the body did not arrive within {self.body_timeout_s:g} s") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"the body is not valid JSON: {exc}") from None

    # routes -----------------------------------------------------------------------------------

    async def request(self, request: web.Request) -> web.Response:
        """POST /request/{service}."""
        service = request.match_info["service"]
        try:
            data = await self._body(request)
            timeout = self._timeout(request)
            if not self.node.providers(service) and (
                    self.node.peers() or time.monotonic() - self.started_at > _DISCOVERY_GRACE_S):
                raise NoProviderError(f"no node offers the service {service!r} in mesh {self.node.config.mesh!r}")
            reply = await self.node.request(service, data, timeout=timeout)
        except _BadRequest as exc:
            return _error(400, "BadRequest", str(exc))
        except ValueError as exc:
            return _error(400, "BadRequest", str(exc))
        except RemoteError as exc:
            log.warning("the handler of %r raised %s: %s\n%s", service, exc.remote_type, exc.remote_message,
                        exc.remote_traceback)
            extra = {"traceback": exc.remote_traceback} if self.tracebacks else {}
            return _error(500, "RemoteError", exc.remote_message, remote_type=exc.remote_type, **extra)
        except PeerLostError as exc:
            return _error(502, "PeerLostError", str(exc))
        except NoProviderError as exc:
            return _error(503, "NoProviderError", str(exc))
        except MeshTimeoutError as exc:
            return _error(504, "MeshTimeoutError", str(exc))
        except TypeError as exc:
            return _error(400, "BadRequest", str(exc))
        return web.Response(text=dumps(reply), content_type="application/json")

    async def publish(self, request: web.Request) -> web.Response:
        """POST /publish/{topic}."""
        try:
            data = await self._body(request)
            await self.node.publish(request.match_info["topic"], data)
        except (_BadRequest, ValueError, TypeError) as exc:
            return _error(400, "BadRequest", str(exc))
        return web.json_response({"status": "published"}, status=202)

    async def push(self, request: web.Request) -> web.Response:
        """POST /push/{queue}."""
        try:
            data = await self._body(request)
            timeout = self._timeout(request)
            await self.node.push(request.match_info["queue"], data, timeout=timeout)
        except (_BadRequest, ValueError, TypeError) as exc:
            return _error(400, "BadRequest", str(exc))
        except NoProviderError as exc:
            return _error(503, "NoProviderError", str(exc))
        except MeshTimeoutError as exc:
            return _error(504, "MeshTimeoutError", str(exc))
        return web.json_response({"status": "queued"}, status=202)

    def membership(self) -> list[dict[str, Any]]:
        """Every node, the gateway included."""
        me = self.node.as_peer()
        return [peer_json(me, gateway=True)] + [peer_json(p) for p in sorted(self.node.peers(), key=lambda p: p.name)]

    async def peers(self, request: web.Request) -> web.Response:
        """GET /peers."""
        return web.Response(text=dumps(self.membership()), content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """GET /events: a Server-Sent Events stream."""
        if len(self.listeners) >= MAX_LISTENERS:
            return _error(503, "Busy", f"{MAX_LISTENERS} event streams are open; try again")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1000)
        self.listeners.add(queue)
        try:
            await response.write(_sse("snapshot", self.membership()))
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), 15)
                except asyncio.TimeoutError:
                    chunk = ": keep-alive\n\n"
                if chunk is None:  # the gateway stops
                    break
                await response.write(chunk.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.discard(queue)
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: every zmqmesh node's counters, for Prometheus (one scrape, the mesh)."""
        snapshots = await self.mesh_stats()
        try:
            text = metrics_text(snapshots)
        except ConfigError as exc:  # prometheus_client is not installed
            return _error(501, "NotImplemented", str(exc))
        return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def mesh_stats(self) -> list[dict[str, Any]]:
        """The counters of every zmqmesh node that answers within a second, the gateway's first."""
        peers = [p for p in self.node.peers() if p.is_zmqmesh]
        results = await asyncio.gather(*(self.node.node_stats(p, timeout=1.0) for p in peers), return_exceptions=True)
        me = self.node.as_peer()
        return [{"id": me.id, "name": me.name, **self.node.stats()},
                *(r for r in results if isinstance(r, dict))]

    async def dashboard(self, request: web.Request) -> web.Response:
        """GET /: the dashboard page."""
        page = resources.files("zmqmesh.tools").joinpath("dashboard.html").read_text()
        return web.Response(text=page, content_type="text/html")

    # events -----------------------------------------------------------------------------------

    def end_streams(self) -> None:
        """End every open /events stream (the gateway stops: it must not wait for them)."""
        for queue in list(self.listeners):
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    def broadcast(self, event: str, data: Any) -> None:
        """Queue an event for every open /events stream (a stream that lags loses events)."""
        chunk = _sse_text(event, data)
        for queue in list(self.listeners):
            try:
                queue.put_nowait(chunk)
            except asyncio.QueueFull:
                pass

    async def poll_stats(self) -> None:
        """Every second, collect every zmqmesh node's counters and broadcast them."""
        while True:
            await asyncio.sleep(_STATS_INTERVAL_S)
            if not self.listeners:
                continue
            stats = {snap["id"]: _dashboard_view(snap) for snap in await self.mesh_stats()}
            self.broadcast("stats", {"time": time.time(), "nodes": stats})


def _dashboard_view(snap: dict[str, Any]) -> dict[str, Any]:
    """What the dashboard draws of a node's counters: the patterns' counters, what it
    received from each peer (the edges), its rejects, and the latency of what it called."""
    view = {k: snap[k] for k in ("pubsub", "pipeline", "request", "service", "zre")}
    view["from"] = {peer: counts.get("received", 0) for peer, counts in (snap.get("peers") or {}).items()}
    view["rejected"] = sum((snap.get("rejected") or {}).values())
    view["latency"] = {service: [h["sum"], h["count"]] for service, h in (snap.get("latency") or {}).items()}
    return view


class _BadRequest(Exception):
    pass


def _sse_text(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {dumps(data)}\n\n"


def _sse(event: str, data: Any) -> bytes:
    return _sse_text(event, data).encode()


def create_app(node: AsyncNode, token: str | None = None, max_body_bytes: int = 1024 * 1024,
               request_timeout_s: float = 10.0, hosts: frozenset[str] = LOOPBACK_HOSTS,
               tracebacks: bool = False, body_timeout_s: float = BODY_TIMEOUT_S) -> tuple[web.Application, Gateway]:
    """The aiohttp application of a gateway on a running ``node``: it answers the ``Host``
    names ``hosts`` (without a token), and sends remote tracebacks only with ``tracebacks``."""
    gateway = Gateway(node, token, request_timeout_s, max_body_bytes, hosts, tracebacks, body_timeout_s)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[gateway.errors])
    app.router.add_post("/request/{service}", gateway.request)
    app.router.add_post("/publish/{topic}", gateway.publish)
    app.router.add_post("/push/{queue}", gateway.push)
    app.router.add_get("/peers", gateway.peers)
    app.router.add_get("/events", gateway.events)
    app.router.add_get("/metrics", gateway.metrics)
    app.router.add_get("/", gateway.dashboard)
    node.on_join(lambda peer: gateway.broadcast("join", peer_json(peer)))
    node.on_leave(lambda peer: gateway.broadcast("leave", peer_json(peer)))
    return app, gateway


def _bound_connections(server: web.Server | None, limit: int) -> None:
    """Close each connection past ``limit`` open at once, as soon as it is made."""
    assert server is not None, "runner.setup() first"
    made = server.connection_made
    refused = 0

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        nonlocal refused
        made(handler, transport)
        if len(server.connections) > limit:
            transport.close()
            refused += 1
            if refused == 1 or refused % 1000 == 0:
                log.warning("%d HTTP connections are open: closed a new one (%d so far)", limit, refused)

    server.connection_made = connection_made  # type: ignore[method-assign]


def _host_of(authority: str) -> str:
    """The host of a ``host[:port]`` (IPv6 in brackets), lower-cased."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def run_gateway(listen: str, token: str | None = None, ready: Any = None, hosts: tuple[str, ...] = (),
                      tracebacks: bool = False, *, max_connections: int = MAX_CONNECTIONS,
                      idle_timeout_s: float = IDLE_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                      **node_options: Any) -> None:
    """Join the mesh and serve HTTP on ``listen`` (``host:port``) until cancelled. Without a
    token, it answers the loopback names, the listen host and ``hosts``. At most
    ``max_connections`` are open at once; one idle (or sending its head) for
    ``idle_timeout_s`` is closed, a body slower than ``body_timeout_s`` answered 408.
    Raises `GatewayError` for a bad address or one it cannot listen on."""
    host, _, port_text = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:8080
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise GatewayError(f"--listen must be host:port with a port from 0 to 65535, got {listen!r}")
    if not _is_loopback(host) and not token:
        raise GatewayError(f"listening on {host} (not loopback) needs a bearer token (--token or ZMQMESH_GATEWAY_TOKEN)")
    async with AsyncNode(node_options.pop("name", "gateway"), **node_options) as node:
        app, gateway = create_app(node, token, hosts=LOOPBACK_HOSTS | {_host_of(h) for h in (host, *hosts)},
                                  tracebacks=tracebacks, body_timeout_s=body_timeout_s)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout_s,  # (a slow head too)
                               shutdown_timeout=5.0)  # what still runs at a stop gets 5 s
        await runner.setup()
        _bound_connections(runner.server, max_connections)
        site = web.TCPSite(runner, host, int(port_text))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise GatewayError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        stats_task = asyncio.create_task(gateway.poll_stats())
        log.info("gateway on http://%s (mesh %r)", listen, node.config.mesh)
        if ready is not None:
            ready(f"http://{listen}")
        try:
            await asyncio.Event().wait()
        finally:
            stats_task.cancel()
            gateway.end_streams()
            await runner.cleanup()
