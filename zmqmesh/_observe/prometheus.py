"""Prometheus metrics: nodes' counters and gauges as metric families, made at each scrape.

Nothing is counted twice: the families are made from what `Node.stats()` (or the built-in
``\\x00stats`` service) reports, when Prometheus asks; what a node counts anyway (a
dictionary update per frame or call) is all it pays between scrapes.
``prometheus_client`` (the ``metrics`` extra) is imported on first use only.

Every family carries the labels ``node`` (name) and ``node_id``, so one scrape can hold
several nodes (the gateway serves the whole mesh's), and the gateway's own counters
(`gateway_families`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .._stats import PATTERNS, LogThrottle
from ..errors import ArgumentTypeError, ConfigError

__all__ = ["MetricsServer", "families", "gateway_families", "metrics_text"]

log = logging.getLogger("zmqmesh.metrics")

MAX_CONNECTIONS = 16
"""Connections a node's metrics server serves at once; past it, a new one is closed at
once. (Each takes a thread and a file descriptor: strangers' idle connections took one of
each for ever, until the node could open no socket to meet its peers.)"""
IDLE_TIMEOUT_S = 10.0
"""How long a connection to a node's metrics server may keep it waiting, for its request
or to take the answer, before it is closed."""
CONNECTION_LIMIT_S = 30.0
"""How long a connection to a node's metrics server may stay open in all, however it
trickles its request or takes the answer (`IDLE_TIMEOUT_S` bounds each wait only: a byte
sent more often held a slot for good, and `MAX_CONNECTIONS` such strangers every one)."""

MAX_SAMPLES = 8192
"""Samples the counters of one node may make in a scrape, a histogram's buckets, sum and
count each one (a node of this version makes some 7,000 at most: 257 names per pattern
and direction, 257 services timed, of 19 samples each, and a backlog per queue pushed
to, 512 at most); counters that would make more are left out whole, as those of another shape are
(`families`): a stranger's answer to ``\\x00stats`` may name a million topics, or time a
service in a million buckets, each a series of every scrape."""
MAX_SCRAPE_CHARS = 32 * 2**20
"""Characters the counters of all the nodes of one scrape may make together, about (their
label values as written, escaped: `_label_chars`; and `_SAMPLE_CHARS` for each sample's
name, label names and value): the
nodes whose counters are the smallest go in first, and one that would take the scrape
past it is left out whole, told as one of another shape is (`families`). Each node's
counters are bounded (`MAX_SAMPLES`, `MAX_LABEL_CHARS`: some 9 MB of text), not the
nodes of a mesh: the gateway's scrape of 16 strangers at those bounds was 145 MB of
text, 650 MB resident, and up to 1,024 peers would make 9 GB."""
_SAMPLE_CHARS = 64
MAX_LABEL_CHARS = 1024
"""Characters of a label value (a node's name, a topic, queue or service, an event);
counters with a longer one are left out whole (a name a node keeps is 255 bytes at most)."""

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
"""The ``Host`` names a metrics server on a loopback address answers, besides that address
(`_served_hosts`): a web page whose own name its DNS turns into 127.0.0.1 (DNS rebinding)
sends that name, and would read the counters, and the topics, queues and services they name,
from any browser on the host."""

Snapshot = dict[str, Any]
"""What `Node.stats()` returns, with ``"id"`` and ``"name"`` added (as ``\\x00stats`` answers)."""

_GATEWAY_GAUGES = {
    "requests_in_flight": "Requests being served (event streams and scrapes aside), the calls whose "
                          "callers hung up included",
    "in_flight_body_bytes": "Bytes of the bodies of the requests being served",
    "arriving_body_bytes": "Bytes the request bodies being read declare, with their requests' heads",
    "waiting_answer_bytes": "Bytes of the answers being written, waiting for their readers",
    "event_streams": "Event streams (/events) open",
    "hung_up_calls": "Calls into the mesh still running whose callers hung up",
    "connections": "HTTP connections open",
    "stats_bytes": "Bytes the gateway holds of the nodes' answers to its last collection of their counters, about",
}
"""The gauges a gateway's counters may hold, each a family ``zmqmesh_gateway_<key>``, with its help."""


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # (the metric families; not loaded by the package itself)
    except ImportError:
        raise ConfigError("Prometheus metrics need prometheus_client: pip install 'zmqmesh[metrics]'") from None
    return prometheus_client


def families(snapshots: Iterable[Snapshot],
             unreadable: Callable[[Snapshot, Exception], None] | None = None) -> list[Any]:
    """The metric families of the nodes whose counters are ``snapshots``. A snapshot of
    another shape (another version's, or a stranger's answer to ``\\x00stats``), or one
    past the bounds of a node's counters or of a scrape (`MAX_SCRAPE_CHARS`: the smallest
    go in first), is left out whole, and told to ``unreadable(snapshot, error)`` (by
    default, logged): one odd node must not cost the scrape of the others."""
    core = _client().core
    labels = ["node", "node_id"]
    made = {
        "messages": core.CounterMetricFamily("zmqmesh_messages", "Messages by pattern and event (sent, received, "
                                             "dropped, errors, and more where a pattern counts more)",
                                             labels=[*labels, "pattern", "event"]),
        "named": core.CounterMetricFamily("zmqmesh_named_messages", "Messages by pattern, direction and "
                                          "topic, queue or service", labels=[*labels, "pattern", "direction", "name"]),
        "rejected": core.CounterMetricFamily("zmqmesh_rejected", "Inputs dropped, by reason",
                                             labels=[*labels, "reason"]),
        "membership": core.CounterMetricFamily("zmqmesh_membership_events", "Peers joined and left, PINGs sent "
                                               "and answered, strangers ignored", labels=[*labels, "event"]),
        "latency": core.HistogramMetricFamily("zmqmesh_request_duration_seconds", "Seconds from a call of a "
                                              "service to its answer", labels=[*labels, "service"]),
        "peers": core.GaugeMetricFamily("zmqmesh_peers", "Peers present", labels=labels),
        "queued": core.GaugeMetricFamily("zmqmesh_queued_messages", "Messages not yet sent, or sent at least "
                                         "once and not yet acknowledged", labels=labels),
        "backlog": core.GaugeMetricFamily("zmqmesh_queue_backlog", "Messages waiting in a queue's send queue",
                                          labels=[*labels, "queue"]),
        "send_queue_bytes": core.GaugeMetricFamily("zmqmesh_send_queue_bytes", "Bytes waiting in the push send "
                                                   "queues together, headers included", labels=labels),
        "durable_buffered": core.GaugeMetricFamily("zmqmesh_durable_buffered_bytes", "Bytes of durable messages "
                                                   "held in memory, ready to send, about", labels=labels),
    }
    def leave_out(snap: Snapshot, exc: Exception) -> None:
        if unreadable is not None:
            unreadable(snap, exc)
        else:
            log.warning("left the counters of a node out of the metrics (%s: %s)", type(exc).__name__, exc)

    sized: list[tuple[int, Snapshot]] = []
    for snap in snapshots:  # (their sizes first, each node's rows made and let go: held together, they could be GBs)
        try:
            sized.append((_scrape_chars(snap), snap))
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            leave_out(snap, exc)
    taken = 0
    for size, snap in sorted(sized, key=lambda sized_snap: sized_snap[0]):
        if taken + size > MAX_SCRAPE_CHARS:
            leave_out(snap, ValueError(f"counters of {size} characters, past the {MAX_SCRAPE_CHARS} of a scrape "
                                       f"with those of {taken} characters of other nodes"))
            continue
        taken += size
        for key, values, sample in _rows(snap):
            if key == "latency":
                made[key].add_metric(values, *sample)
            else:
                made[key].add_metric(values, sample)
    return list(made.values())


def _scrape_chars(snap: Snapshot) -> int:
    """About how many characters the counters ``snap`` make in a scrape (`MAX_SCRAPE_CHARS`),
    their label values as the text writes them (`_label_chars`). Raises as `_rows` does."""
    chars = 0
    for key, values, sample in _rows(snap):
        each = sum(map(_label_chars, values)) + _SAMPLE_CHARS
        chars += each * (len(sample[0]) + 2) if key == "latency" else each
    return chars


def _label_chars(value: str) -> int:
    """The characters of label ``value`` in the text: a backslash, a newline and a double
    quote are written escaped, two characters each (a label of them all is twice as long)."""
    return len(value) + value.count("\\") + value.count("\n") + value.count('"')


def _rows(snap: Snapshot) -> Iterator[tuple[str, list[str], Any]]:
    """The samples of one node's counters: ``(family, label values, value)``, the value of
    a ``latency`` one ``(buckets, sum)``. Raises ``TypeError`` (or another error of a wrong
    shape) for counters of another shape, ``ValueError`` for more than `MAX_SAMPLES`
    samples or a label value past `MAX_LABEL_CHARS`, before any sample is added (the
    caller lists them all first)."""
    made = 0
    for row in _samples(snap):
        made += len(row[2][0]) + 2 if row[0] == "latency" else 1  # (a histogram: its buckets, sum and count)
        if made > MAX_SAMPLES:
            raise ValueError(f"counters of more than {MAX_SAMPLES} samples")
        if any(len(value) > MAX_LABEL_CHARS for value in row[1]):
            raise ValueError(f"a label value of more than {MAX_LABEL_CHARS} characters")
        yield row


def _samples(snap: Snapshot) -> Iterator[tuple[str, list[str], Any]]:
    """The samples of one node's counters, unbounded (`_rows` bounds them)."""
    node = [str(snap.get("name", "")), str(snap.get("id", ""))]
    for pattern in PATTERNS:
        for event, count in (snap.get(pattern) or {}).items():
            yield "messages", [*node, pattern, str(event)], _number(count)
    for pattern, directions in (snap.get("names") or {}).items():
        for direction, counts in directions.items():
            for name, count in counts.items():
                yield "named", [*node, str(pattern), str(direction), str(name)], _number(count)
    for reason, count in (snap.get("rejected") or {}).items():
        yield "rejected", [*node, str(reason)], _number(count)
    for event, count in (snap.get("membership") or {}).items():
        yield "membership", [*node, str(event)], _number(count)
    for service, histogram in (snap.get("latency") or {}).items():
        yield "latency", [*node, str(service)], (_buckets(histogram["buckets"]), _number(histogram["sum"]))
    gauges = snap.get("gauges") or {}
    yield "peers", node, _number(gauges.get("peers", 0))
    yield "queued", node, _number(gauges.get("queued", 0))
    for queue, count in (gauges.get("queue_backlog") or {}).items():
        yield "backlog", [*node, str(queue)], _number(count)
    for family, key in (("send_queue_bytes", "send_queue_bytes"), ("durable_buffered", "durable_buffered_bytes")):
        if key in gauges:  # (a node of a version that reports none has no sample, not a 0 it never told)
            yield family, node, _number(gauges[key])


def _buckets(given: Any) -> list[tuple[str, int | float]]:
    """The buckets of a histogram given as ``[[bound, count], ...]`` (as `Node.stats` makes
    them), as prometheus_client takes them: ``(bound as text, cumulative count)``. Raises
    ``ValueError`` unless there is one at least, their bounds numbers that increase, the
    last ``+Inf`` (prometheus_client reads the first bound as a number and the last count
    as the histogram's; one of a stranger's histograms without them failed the scrape
    of every node), ``TypeError`` for a count that is not a number."""
    cumulative: int | float = 0
    buckets: list[tuple[str, int | float]] = []
    below = float("-inf")
    for bound, count in given:
        text = str(bound)
        if len(text) > MAX_LABEL_CHARS:  # (a bound is the label ``le`` of its bucket)
            raise ValueError(f"a histogram bound of more than {MAX_LABEL_CHARS} characters")
        at = float(text)
        if not at > below:  # (NaN too)
            raise ValueError(f"histogram bounds that do not increase: {text[:32]!r}")
        below = at
        cumulative += _number(count)
        buckets.append((text, cumulative))
    if below != float("inf"):
        raise ValueError("a histogram without its +Inf bucket")
    return buckets


def _number(value: Any) -> int | float:
    """``value`` if it is a number, what counters hold (an ``int`` or a ``float``, as msgpack
    and `Node.stats` make them); raises ``TypeError`` otherwise: nothing of a stranger's
    shape reaches a sample. (The gateway's dashboard checks its view alike: tools use the
    public API only.)"""
    if type(value) not in (int, float):
        raise TypeError(f"a counter that is not a number: {type(value).__name__}")
    return value  # type: ignore[no-any-return]


def gateway_families(counters: Snapshot) -> list[Any]:
    """The metric families of an HTTP gateway's own ``counters``: ``{"id", "name",
    "events": {event: count}, "refused": {reason: count}, "gauges": {key: value}}``, the
    gauges' keys among `_GATEWAY_GAUGES` (one missing is left out, another ignored)."""
    core = _client().core
    labels = ["node", "node_id"]
    node = [str(counters.get("name", "")), str(counters.get("id", ""))]
    events = core.CounterMetricFamily("zmqmesh_gateway_events", "What befell the gateway's requests and "
                                      "streams, by event (callers that hung up, clients that took no reply, ...)",
                                      labels=[*labels, "event"])
    refused = core.CounterMetricFamily("zmqmesh_gateway_refused", "Requests and connections the gateway "
                                       "refused, by reason (a bound reached, a body too large or too slow, "
                                       "a missing token, a foreign origin, ...)", labels=[*labels, "reason"])
    for event, count in (counters.get("events") or {}).items():
        events.add_metric([*node, event], count)
    for reason, count in (counters.get("refused") or {}).items():
        refused.add_metric([*node, reason], count)
    gauges = counters.get("gauges") or {}
    made = [events, refused]
    for key, help_text in _GATEWAY_GAUGES.items():
        if key in gauges:
            gauge = core.GaugeMetricFamily(f"zmqmesh_gateway_{key}", help_text, labels=labels)
            gauge.add_metric(node, gauges[key])
            made.append(gauge)
    return made


class _Collector:
    """A prometheus_client collector over a source of snapshots (and a gateway's counters)."""

    def __init__(self, source: Callable[[], Iterable[Snapshot] | None], gateway: Snapshot | None = None,
                 unreadable: Callable[[Snapshot, Exception], None] | None = None) -> None:
        self.source = source
        self.gateway = gateway
        self.unreadable = unreadable

    def collect(self) -> Iterator[Any]:
        snapshots = self.source()
        if snapshots is not None:
            yield from families(snapshots, self.unreadable)
        if self.gateway is not None:
            yield from gateway_families(self.gateway)


def metrics_text(snapshots: Iterable[Snapshot] | None, gateway: Snapshot | None = None,
                 unreadable: Callable[[Snapshot, Exception], None] | None = None) -> bytes:
    """The Prometheus text exposition of ``snapshots`` (what a ``/metrics`` route answers),
    and of an HTTP gateway's own counters if given (`gateway_families`); a snapshot of
    another shape is left out and told to ``unreadable`` (`families`). ``snapshots`` None:
    the gateway's families alone (no node family at all, not even its HELP: the text of
    the nodes made apart, once, may go before it).

    Raises `ConfigError` without ``prometheus_client``, `ArgumentTypeError` (a
    ``TypeError``) for ``snapshots`` that cannot be iterated."""
    items = None if snapshots is None else _iterated(snapshots)
    client = _client()
    taken = None if items is None else list(items)  # (taken once: an iterator has them once)
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: taken, gateway, unreadable))
    text: bytes = client.generate_latest(registry)
    return text


def _iterated(snapshots: Iterable[Snapshot]) -> Iterator[Snapshot]:
    """The iterator over ``snapshots``, asked for as a for loop asks (a class with
    ``__getitem__`` only is iterable, and no ``Iterable``). Raises `ArgumentTypeError`
    (a ``TypeError``) if they cannot be iterated."""
    try:
        return iter(snapshots)
    except TypeError:
        raise ArgumentTypeError(f"snapshots must be an iterable of counters or None, "
                                f"got {type(snapshots).__name__}") from None


class MetricsServer:
    """Serves ``/metrics`` over HTTP on ``address:port`` (a thread of its own), made from
    ``source()`` at each scrape. Raises `ConfigError` without ``prometheus_client``, or
    when it cannot listen there."""

    def __init__(self, source: Callable[[], Iterable[Snapshot]], address: str, port: int) -> None:
        client = _client()
        registry = client.CollectorRegistry(auto_describe=False)
        registry.register(_Collector(source))
        app = client.make_wsgi_app(registry)
        hosts = _served_hosts(address)
        if hosts is not None:
            app = _HostCheck(app, hosts)
        try:
            server = _BoundedServer((address, port), app)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
        self._server: _BoundedServer | None = server
        self._thread = threading.Thread(target=server.serve_forever, name="zmqmesh-metrics", daemon=True)
        try:
            self._thread.start()
        except BaseException:  # (no thread to serve it: the port is let go at once)
            server.server_close()
            raise
        self.address: str = str(server.server_address[0])
        """The address it listens at, as bound (for `_io.inherited`)."""
        self.port: int = server.server_address[1]
        self._lock = threading.Lock()
        log.info("metrics on http://%s:%d/metrics", address, self.port)

    @property
    def closed(self) -> bool:
        """Whether it was closed (serves no more)."""
        return self._server is None

    def close(self) -> None:
        """Stop serving (idempotent, bounded)."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.end_connections(0.0)  # (none outlives the node: `service_actions` runs no more)
            self._thread.join(5)


def _served_hosts(address: str) -> frozenset[str] | None:
    """The ``Host`` names a metrics server listening on ``address`` answers: on a loopback
    address, `LOOPBACK_NAMES` and the address; elsewhere None, any (whoever the network
    lets reach it reads it: docs/security.md)."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address.lower() == "localhost"
    return LOOPBACK_NAMES | {address.lower()} if loopback else None


def _host_name(authority: str) -> str:
    """The host of a ``Host`` header's ``host[:port]`` (IPv6 in brackets), lower-cased;
    anything else whole, which names no host served (as the gateway reads it)."""
    authority = authority.strip().lower()
    if authority.startswith("[") and "]" in authority:
        end = authority.index("]")
        host, port = authority[1:end], authority[end + 1:]
    elif authority.count(":") == 1:
        host, _, digits = authority.partition(":")
        port = ":" + digits
    else:  # (no port, or an IPv6 address without brackets)
        return authority
    digits = port[1:]
    if port and not (port.startswith(":") and (digits == "" or (digits.isascii() and digits.isdigit()))):
        return authority
    return host


class _HostCheck:
    """A WSGI application: ``app``'s answer to a request whose ``Host`` is one of ``hosts``
    (or that names none: browsers always do), 403 to another (logged at most every 10 s)."""

    def __init__(self, app: Callable[..., Any], hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts
        self._refused_log = LogThrottle()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if host is None or _host_name(host) in self.hosts:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        with self._lock:
            refused = self._refused_log.due()
        if refused:
            log.warning("metrics: refused %d request(s) for a host this loopback server is not (the last %r): "
                        "DNS rebinding, or a scraper that names the host otherwise (said at most every %g s)",
                        refused, host[:64], self._refused_log.every_s)
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"this metrics server on a loopback address answers only for localhost, 127.0.0.1, ::1 "
                b"and its own address\n"]


class _SilentHandler(WSGIRequestHandler):
    """Serves one connection; logs nothing of each request, and what fails in serving it
    (an answer a scraper stopped taking: `IDLE_TIMEOUT_S`) at debug level."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> _DebugLog:
        """Where wsgiref writes what fails (``wsgi.errors``): the log, not the process's stderr."""
        return _DebugLog()


class _DebugLog:
    """A stream whose text, at each flush, is one debug line of the log."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        self._parts.extend(lines)

    def flush(self) -> None:
        text, self._parts = "".join(self._parts).rstrip(), []
        if text:
            log.debug("metrics: serving a connection failed: %s", text)


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """Serves ``app`` on ``address`` (IPv4 or IPv6), a thread per connection,
    `MAX_CONNECTIONS` at most: past it, a new connection is closed at once (logged at most
    every 10 s). Raises `OSError` when it cannot listen there."""

    daemon_threads = True
    request_queue_size = 128  # (at socketserver's 5, 200 connections at once took 27 s to get in: SYN retries)

    def __init__(self, address: tuple[str, int], app: Callable[..., Any]) -> None:
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refused_log = LogThrottle()
        # the connections served now, and when each opened (`service_actions` ends those open too long)
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        super().__init__(address, _SilentHandler)
        self.set_app(app)

    def get_request(self) -> tuple[socket.socket, Any]:
        """A new connection, closed once it keeps the server waiting `IDLE_TIMEOUT_S`."""
        request, client_address = super().get_request()
        request.settimeout(IDLE_TIMEOUT_S)
        return request, client_address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            refused = self._refused_log.due()
            if refused:
                log.warning("metrics: %d connections open already: closed %d new one(s)", MAX_CONNECTIONS, refused)
            return
        with self._open_lock:
            self._open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:  # (no thread to give the slot back)
            with self._open_lock:
                self._open.pop(request, None)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        """Close a connection, no longer one `service_actions` may end (taken out of
        `_open` before it closes: its descriptor, once closed, may be another socket's)."""
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """(The serving thread, at least every half second.) End the connections open
        longer than `CONNECTION_LIMIT_S`."""
        self.end_connections(CONNECTION_LIMIT_S)

    def end_connections(self, open_s: float) -> None:
        """End the connections open longer than ``open_s``: their thread's wait returns, the
        thread closes the connection and gives its slot back."""
        too_old = time.monotonic() - open_s
        with self._open_lock:
            for request, opened in self._open.items():
                if opened <= too_old:
                    try:
                        request.shutdown(socket.SHUT_RDWR)
                    except OSError:  # (gone already)
                        pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (timed out, reset): logged, not printed."""
        log.debug("metrics: a connection from %s failed", client_address, exc_info=True)
