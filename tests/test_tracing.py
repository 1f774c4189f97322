"""OpenTelemetry across real processes: a call from client to mid to leaf is one trace,
as are a publish and a push and their handler runs, the context carried in headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptProcess, wait_until

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed")

pytestmark = pytest.mark.timeout(90)

SCRIPT = Path(__file__).resolve().parent / "traced_node.py"


def spans(proc: ScriptProcess) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in proc.lines if line.startswith("SPAN ")]


def test_one_request_across_three_nodes_is_one_trace(mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    leaf, mid = (ScriptProcess(SCRIPT, role, mesh["mesh"], mesh["beacon_port"]) for role in ("leaf", "mid"))
    procs += [leaf, mid]
    leaf.wait_for("READY")
    mid.wait_for("READY")
    client = ScriptProcess(SCRIPT, "client", mesh["mesh"], mesh["beacon_port"])
    procs.append(client)
    client.wait_for("DONE", 60)
    assert "RESULT 11" in client.lines
    mid.wait_for("GOT t.x")
    mid.wait_for("GOT job 7")
    for proc in (leaf, mid):
        proc.close()
    wait_until(lambda: "DONE" in leaf.lines and "DONE" in mid.lines, 20, "the servers' spans")
    every = {s["span"]: s for proc in (client, mid, leaf) for s in spans(proc)}
    by_name = {(s["node"], s["name"]): s for s in every.values()}

    call = by_name[("client", "request mid")]
    served = by_name[("mid", "serve mid")]
    inner = by_name[("mid", "request leaf")]
    leaf_served = by_name[("leaf", "serve leaf")]
    assert (call["kind"], served["kind"], inner["kind"], leaf_served["kind"]) == ("CLIENT", "SERVER", "CLIENT", "SERVER")
    assert served["parent"] == call["span"] and inner["parent"] == served["span"]
    assert leaf_served["parent"] == inner["span"]
    assert len({call["trace"], served["trace"], inner["trace"], leaf_served["trace"]}) == 1  # one trace

    # (a subscriber's span is named by its operation alone: the topic is the publisher's
    # choice, of any cardinality, and goes in the destination attribute)
    published, received = by_name[("client", "publish t.x")], by_name[("mid", "receive")]
    assert (published["kind"], received["kind"]) == ("PRODUCER", "CONSUMER")
    assert received["destination"] == "t.x" and by_name[("mid", "process jobs")]["destination"] == "jobs"
    assert received["parent"] == published["span"] and received["trace"] == published["trace"]
    pushed, processed = by_name[("client", "push jobs")], by_name[("mid", "process jobs")]
    assert processed["parent"] == pushed["span"] and processed["trace"] == pushed["trace"]
    assert all(s["status"] != "ERROR" for s in every.values())
