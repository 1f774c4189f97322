"""OpenTelemetry traces: spans for publish, push, request and each handler run, with the
trace context carried in the message headers (W3C ``traceparent``, ``tracestate``).

Active when ``opentelemetry-api`` is installed (the ``otel`` extra) and a tracer provider
was set when a node of the process last started (`active` is one setting per process, as
OpenTelemetry's provider is); otherwise `active` is None and nothing is added to messages.
The context is injected and extracted with OpenTelemetry's global propagator (W3C trace
context by default), so a request that crosses three nodes is one trace.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

__all__ = ["active", "refresh", "send_span", "inject", "fail", "handler_span", "end_handler_span", "HandlerSpan"]

_otel: Any = None  # the opentelemetry modules once traces are on
_KINDS = {"pubsub": ("receive", "CONSUMER"), "pipeline": ("process", "CONSUMER"), "service": ("serve", "SERVER")}


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
    carry) and make it current; None for what is not traced (join and leave callbacks)."""
    found = _KINDS.get(pattern)
    if found is None:
        return None
    trace, propagate, context = _otel[0], _otel[1], _otel[2]
    operation, kind = found
    parent = propagate.extract(msg.headers) if msg.headers else None
    span = active.start_span(f"{operation} {msg.topic}", context=parent, kind=getattr(trace.SpanKind, kind),
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
