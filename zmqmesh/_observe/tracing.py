"""OpenTelemetry traces: spans for publish, push, request and each handler run, with the
trace context carried in the message headers (W3C ``traceparent``, ``tracestate``).

Active when ``opentelemetry-api`` is installed (the ``otel`` extra) and a tracer provider
was set when a node of the process last started (`active` is one setting per process, as
OpenTelemetry's provider is); otherwise `active` is None and nothing is added to messages.
The context is injected and extracted with OpenTelemetry's global propagator (W3C trace
context by default), so a request that crosses three nodes is one trace. Of a received
message's W3C fields (``traceparent``, ``tracestate``, ``baggage``), one that is not
well-formed is left out before extraction (`trace_context`), counted and logged at most
every 10 s: OpenTelemetry logs what it cannot parse, raw, a line per message; so is one
past the bounds below, which OpenTelemetry would take long to read.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

from .._stats import LogThrottle

__all__ = ["active", "refresh", "send_span", "inject", "fail", "handler_span", "end_handler_span", "HandlerSpan",
           "trace_context", "malformed_contexts"]

log = logging.getLogger("zmqmesh.tracing")

_otel: Any = None  # the opentelemetry modules once traces are on
_KINDS = {"pubsub": ("receive", "CONSUMER"), "pipeline": ("process", "CONSUMER"), "service": ("serve", "SERVER")}


MAX_TRACESTATE_MEMBERS = 32
"""List-members a ``tracestate`` may hold (W3C trace context)."""
MAX_BAGGAGE_MEMBERS = 64
"""List-members a ``baggage`` may hold (W3C baggage)."""
MAX_CONTEXT_CHARS = 8192
"""Characters a ``tracestate`` or a ``baggage`` may take (what OpenTelemetry reads of either)."""
MAX_BAGGAGE_MEMBER_CHARS = 4096
"""Characters one list-member of a ``baggage`` may take (as OpenTelemetry reads it)."""
MAX_BLANK_RUN = 16
"""Spaces and tabs in a row a ``tracestate`` or a ``baggage`` may hold (W3C bounds none):
OpenTelemetry splits either at ``[ \t]*,[ \t]*``, which takes a run of n blanks n * n
steps (a ``baggage`` of 4,000 blanks in a member took 20 to 110 ms a message)."""
# (patterns, not compiled ones: `re` compiles each at its first use, which only a traced node
# makes, and keeps it; compiled here, they cost every import of a node 0.6 ms)
_TRACEPARENT = r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-[\x21-\x7e]{1,456})?"
_TRACESTATE_MEMBER = (r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
                      r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TOKEN, _OCTETS = r"[!#-'*+\-.0-9A-Z^-z|~]+", r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_BLANK_RUN = rf"[ \t]{{{MAX_BLANK_RUN + 1}}}"
_BAGGAGE_MEMBER = rf"{_TOKEN}[ \t]*=[ \t]*{_OCTETS}(?:[ \t]*;[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*{_OCTETS})?)*"

malformed_contexts = 0
"""Trace context fields of received messages left out as malformed, in this process."""
_malformed_lock = threading.Lock()
_malformed_log = LogThrottle()

active: Any = None
"""The zmqmesh tracer while traces are on (see `refresh`), else None: read on every send
and handler run, so it costs them one attribute lookup."""


def refresh() -> Any | None:
    """Look for a tracer provider (when a node starts) and set `active`: the zmqmesh
    tracer, or None when there is nothing to trace to. A program that set a provider has
    imported ``opentelemetry.trace``; one that has not is left alone (importing it would
    load asyncio and ssl into every node process)."""
    global active, _otel
    trace = sys.modules.get("opentelemetry.trace")
    found = None
    if trace is not None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            from opentelemetry import context, propagate
            from opentelemetry.trace import Status, StatusCode

            _otel = (trace, propagate, context, Status, StatusCode)
            found = provider.get_tracer("zmqmesh")
    active = found
    return found


def send_span(active: Any, operation: str, name: str, kind: str) -> Any:
    """A span for sending (``operation`` ``publish``, ``push`` or ``request``) to ``name``,
    child of the current span; the caller ends it."""
    trace = _otel[0]
    return active.start_span(f"{operation} {name}", kind=getattr(trace.SpanKind, kind), attributes={
        "messaging.system": "zmqmesh", "messaging.operation.name": operation, "messaging.destination.name": name})


def inject(span: Any, headers: dict[str, str] | None) -> dict[str, str]:
    """``headers`` (copied) with the trace context of ``span`` added."""
    trace, propagate = _otel[0], _otel[1]
    carrier = dict(headers) if headers else {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def fail(span: Any, error: BaseException) -> None:
    """Mark ``span`` failed by ``error``."""
    span.record_exception(error)
    span.set_status(_otel[3](_otel[4].ERROR, str(error)))


class HandlerSpan(NamedTuple):
    """A handler run's span, current until `end_handler_span`."""

    span: Any
    token: Any


def handler_span(active: Any, pattern: str, msg: Any) -> HandlerSpan | None:
    """Start the span of a handler run for ``msg`` (its parent: the context its headers
    carry) and make it current; None for what is not traced (join and leave callbacks).
    A subscription's span is named by its operation alone (the topic, in its attributes, is
    whatever publishers chose: as a name it would give a tracing backend a span name per
    topic); a queue's and a service's by their name too (this node's own)."""
    found = _KINDS.get(pattern)
    if found is None:
        return None
    trace, propagate, context = _otel[0], _otel[1], _otel[2]
    operation, kind = found
    carrier = trace_context(msg.headers) if msg.headers else None
    parent = propagate.extract(carrier) if carrier else None
    name = operation if pattern == "pubsub" else f"{operation} {msg.topic}"
    span = active.start_span(name, context=parent, kind=getattr(trace.SpanKind, kind),
                             attributes={"messaging.system": "zmqmesh", "messaging.operation.name": operation,
                                         "messaging.destination.name": msg.topic,
                                         "messaging.message.id": str(msg.id or "")})
    return HandlerSpan(span, context.attach(trace.set_span_in_context(span)))


def end_handler_span(running: HandlerSpan, error: BaseException | None) -> None:
    """End a handler run's span (failed if ``error``) and restore the context before it."""
    if error is not None:
        fail(running.span, error)
    _otel[2].detach(running.token)
    running.span.end()


def trace_context(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers``, less those of their W3C trace context fields (``traceparent``,
    ``tracestate``, ``baggage``) that are not well-formed or too large (each counted in
    `malformed_contexts`, and logged at most every 10 s, without their text): what is
    safe to hand OpenTelemetry's propagator. ``headers`` itself when all are well-formed.
    Raises nothing."""
    bad = [key for key, ok in (("traceparent", _traceparent_ok), ("tracestate", _tracestate_ok),
                               ("baggage", _baggage_ok)) if key in headers and not ok(headers[key])]
    if not bad:
        return headers
    global malformed_contexts
    with _malformed_lock:
        malformed_contexts += len(bad)
        said = _malformed_log.due(len(bad))
    if said:
        log.warning("left out %d malformed trace context field(s) (traceparent, tracestate, baggage) of received "
                    "messages; their handler runs are traced without them (said at most every %g s)",
                    said, _malformed_log.every_s)
    return {key: value for key, value in headers.items() if key not in bad}


def _traceparent_ok(value: str) -> bool:
    return re.fullmatch(_TRACEPARENT, value) is not None


def _blanks_bounded(value: str) -> bool:
    return len(value) <= MAX_CONTEXT_CHARS and re.search(_BLANK_RUN, value) is None


def _tracestate_ok(value: str) -> bool:
    if not _blanks_bounded(value):
        return False
    members = [m for m in (m.strip(" \t") for m in value.split(",")) if m]
    keys = {m.partition("=")[0] for m in members}
    return len(members) <= MAX_TRACESTATE_MEMBERS and len(keys) == len(members) and \
        all(re.fullmatch(_TRACESTATE_MEMBER, m) for m in members)


def _baggage_ok(value: str) -> bool:
    if not _blanks_bounded(value):
        return False
    # (split at the commas, then stripped: split at ``[ \t]*,[ \t]*``, a run of n blanks took
    # the regex n * n steps, 8,000 blanks 0.1 to 0.3 s a message)
    members = [m for m in (m.strip(" \t") for m in value.split(",")) if m]
    return len(members) <= MAX_BAGGAGE_MEMBERS and \
        all(len(m) <= MAX_BAGGAGE_MEMBER_CHARS and re.fullmatch(_BAGGAGE_MEMBER, m) for m in members)
