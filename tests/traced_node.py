"""A node process with OpenTelemetry's SDK and its in-memory exporter, for
test_tracing.py. Usage: python traced_node.py ROLE MESH BEACON_PORT

    leaf    offers "leaf" (doubles its input)
    mid     offers "mid" (calls "leaf", adds one), subscribes to "t.", pulls "jobs"
    client  calls "mid", publishes on "t.x", pushes to "jobs", then ends

Each prints READY once started, then (at the end, or when its stdin closes) every span
it recorded as one JSON line: SPAN {...}.
"""

from __future__ import annotations

import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import zmqmesh

role, mesh, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

node = zmqmesh.Node(role, mesh=mesh, beacon_port=port, heartbeat_interval_s=0.5, peer_timeout_s=2.0)
if role == "leaf":
    node.service("leaf", lambda msg: msg.data * 2)
elif role == "mid":
    node.service("mid", lambda msg: node.request("leaf", msg.data, timeout=10) + 1)
    node.subscribe("t.", lambda msg: print("GOT", msg.topic, flush=True))
    node.pull("jobs", lambda msg: print("GOT job", msg.data, flush=True))

with node:
    print("READY", flush=True)
    if role == "client":
        node.wait_for_service("mid", timeout=20)
        node.wait_for_subscribers("t.", 1, timeout=20)
        print("RESULT", node.request("mid", 5, timeout=10), flush=True)
        node.publish("t.x", {"n": 1})
        node.push("jobs", 7, timeout=10)
    else:
        sys.stdin.read()  # until the test closes it
provider.force_flush()
for span in exporter.get_finished_spans():
    context = span.get_span_context()
    print("SPAN", json.dumps({
        "name": span.name, "kind": span.kind.name, "trace": f"{context.trace_id:032x}",
        "span": f"{context.span_id:016x}", "parent": f"{span.parent.span_id:016x}" if span.parent else None,
        "status": span.status.status_code.name, "node": role,
        "destination": (span.attributes or {}).get("messaging.destination.name"),
    }), flush=True)
print("DONE", flush=True)
