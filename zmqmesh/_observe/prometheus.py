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

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._stats import PATTERNS
from ..errors import ConfigError

__all__ = ["MetricsServer", "families", "gateway_families", "metrics_text"]

log = logging.getLogger("zmqmesh.metrics")

Snapshot = dict[str, Any]
"""What `Node.stats()` returns, with ``"id"`` and ``"name"`` added (as ``\\x00stats`` answers)."""

_GATEWAY_GAUGES = {
    "requests_in_flight": "Requests being served (event streams aside): the scrape itself, and the "
                          "calls whose callers hung up, included",
    "in_flight_body_bytes": "Bytes of the bodies of the requests being served",
    "arriving_body_bytes": "Bytes the request bodies being read declare",
    "event_streams": "Event streams (/events) open",
    "hung_up_calls": "Calls into the mesh still running whose callers hung up",
    "connections": "HTTP connections open",
}
"""The gauges a gateway's counters may hold, each a family ``zmqmesh_gateway_<key>``, with its help."""


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # (the metric families; not loaded by the package itself)
    except ImportError:
        raise ConfigError("Prometheus metrics need prometheus_client: pip install 'zmqmesh[metrics]'") from None
    return prometheus_client


def families(snapshots: Iterable[Snapshot]) -> list[Any]:
    """The metric families of the nodes whose counters are ``snapshots``."""
    core = _client().core
    labels = ["node", "node_id"]
    messages = core.CounterMetricFamily("zmqmesh_messages", "Messages by pattern and event (sent, received, "
                                        "dropped, errors, and more where a pattern counts more)",
                                        labels=[*labels, "pattern", "event"])
    by_name = core.CounterMetricFamily("zmqmesh_named_messages", "Messages by pattern, direction and "
                                       "topic, queue or service", labels=[*labels, "pattern", "direction", "name"])
    rejected = core.CounterMetricFamily("zmqmesh_rejected", "Inputs dropped, by reason", labels=[*labels, "reason"])
    membership = core.CounterMetricFamily("zmqmesh_membership_events", "Peers joined and left, PINGs sent "
                                          "and answered, strangers ignored", labels=[*labels, "event"])
    latency = core.HistogramMetricFamily("zmqmesh_request_duration_seconds", "Seconds from a call of a "
                                         "service to its answer", labels=[*labels, "service"])
    peers = core.GaugeMetricFamily("zmqmesh_peers", "Peers present", labels=labels)
    queued = core.GaugeMetricFamily("zmqmesh_queued_messages", "Messages not yet sent, or sent at least once "
                                    "and not yet acknowledged", labels=labels)
    backlog = core.GaugeMetricFamily("zmqmesh_queue_backlog", "Messages waiting in a queue's send queue",
                                     labels=[*labels, "queue"])
    for snap in snapshots:
        node = [str(snap.get("name", "")), str(snap.get("id", ""))]
        for pattern in PATTERNS:
            for event, count in (snap.get(pattern) or {}).items():
                messages.add_metric([*node, pattern, event], count)
        for pattern, directions in (snap.get("names") or {}).items():
            for direction, counts in directions.items():
                for name, count in counts.items():
                    by_name.add_metric([*node, pattern, direction, name], count)
        for reason, count in (snap.get("rejected") or {}).items():
            rejected.add_metric([*node, reason], count)
        for event, count in (snap.get("membership") or {}).items():
            membership.add_metric([*node, event], count)
        for service, histogram in (snap.get("latency") or {}).items():
            cumulative, buckets = 0, []
            for bound, count in histogram["buckets"]:
                cumulative += count
                buckets.append((str(bound), cumulative))
            latency.add_metric([*node, service], buckets, histogram["sum"])
        gauges = snap.get("gauges") or {}
        peers.add_metric(node, gauges.get("peers", 0))
        queued.add_metric(node, gauges.get("queued", 0))
        for queue, count in (gauges.get("queue_backlog") or {}).items():
            backlog.add_metric([*node, queue], count)
    return [messages, by_name, rejected, membership, latency, peers, queued, backlog]


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

    def __init__(self, source: Callable[[], Iterable[Snapshot]], gateway: Snapshot | None = None) -> None:
        self.source = source
        self.gateway = gateway

    def collect(self) -> Iterator[Any]:
        yield from families(self.source())
        if self.gateway is not None:
            yield from gateway_families(self.gateway)


def metrics_text(snapshots: Iterable[Snapshot], gateway: Snapshot | None = None) -> bytes:
    """The Prometheus text exposition of ``snapshots`` (what a ``/metrics`` route answers),
    and of an HTTP gateway's own counters if given (`gateway_families`).

    Raises `ConfigError` without ``prometheus_client``."""
    client = _client()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: list(snapshots), gateway))
    text: bytes = client.generate_latest(registry)
    return text


class MetricsServer:
    """Serves ``/metrics`` over HTTP on ``address:port`` (a thread of its own), made from
    ``source()`` at each scrape. Raises `ConfigError` without ``prometheus_client``, or
    when it cannot listen there."""

    def __init__(self, source: Callable[[], Iterable[Snapshot]], address: str, port: int) -> None:
        client = _client()
        registry = client.CollectorRegistry(auto_describe=False)
        registry.register(_Collector(source))
        try:
            self._server, self._thread = client.start_http_server(port, addr=address, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
        self.port: int = self._server.server_address[1]
        self._lock = threading.Lock()
        log.info("metrics on http://%s:%d/metrics", address, self.port)

    def close(self) -> None:
        """Stop serving (idempotent, bounded)."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(5)
