"""docs/protocol.md is sufficient: a program written from it alone (foreign_client.py:
the standard library, pyzmq and msgpack) finds a node, becomes a member of its mesh, and
uses every pattern both ways, at-least-once pulling included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptProcess, wait_until

import zmqmesh

pytestmark = pytest.mark.timeout(90)

FOREIGN = Path(__file__).resolve().parent / "foreign_client.py"


def lines(proc: ScriptProcess, prefix: str) -> list[str]:
    return [line for line in proc.lines if line.startswith(prefix)]


def test_a_program_written_from_the_protocol_document_takes_part_in_the_mesh(
        mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    pulled: list[Any] = []
    with zmqmesh.Node("native", **mesh) as node:
        node.service("double", lambda msg: msg.data * 2)
        node.pull("work", lambda msg: pulled.append(msg.data))
        foreign = ScriptProcess(FOREIGN, mesh["mesh"], mesh["beacon_port"])
        procs.append(foreign)

        # it found the node by its beacon and read its HELLO (sequence 1, the endpoints)
        wait_until(lambda: lines(foreign, "HELLO "), 20, "the node's HELLO at the foreign program")
        _, sequence, name, headers = lines(foreign, "HELLO ")[0].split(" ", 3)
        assert (sequence, name) == ("1", "native")
        announced = json.loads(headers)
        assert announced["X-ZMQMESH-MESH"] == mesh["mesh"] and announced["X-ZMQMESH-PROTOCOL"] == "7"
        assert {"X-ZMQMESH-PUB", "X-ZMQMESH-SUB", "X-ZMQMESH-PULL", "X-ZMQMESH-SERVICE"} <= announced.keys()

        # the node sees a zmqmesh peer offering "echo" and pulling "jobs"
        wait_until(lambda: any(p.name == "foreign" and "echo" in p.services for p in node.peers()), 10,
                   "the foreign program as a peer")
        assert next(p for p in node.peers() if p.name == "foreign").is_zmqmesh

        # it called the node's service, and a request id over 64 bytes is answered 0x03
        wait_until(lambda: len(lines(foreign, "REPLY ")) == 6, 10, "six replies")
        assert "REPLY call-one 8 00 42" in foreign.lines
        assert "REPLY call-two 8 00 100" in foreign.lines  # asked in one frame, answered in one
        assert "REPLY too-long 100 03 null" in foreign.lines
        # asked in a batch: each request answered, an unknown service 0x02
        assert {"REPLY batch-a 7 00 2", "REPLY batch-b 7 02 null", "REPLY batch-c 7 00 6"} <= set(foreign.lines)

        # it pushed a batch of two to the node
        wait_until(lambda: len(pulled) == 2, 10, "the foreign push")
        assert pulled == ["from foreign", {"n": 2}]

        # the node calls its service
        assert node.request("echo", {"a": [1, "b"]}, timeout=10) == {"a": [1, "b"]}

        # the node publishes to it: pub/sub sequence numbers start at 0, per topic
        node.wait_for_subscribers("news.", 1, timeout=10)
        node.publish("news.a", "first")
        node.publish("news.a", "second")
        wait_until(lambda: len(lines(foreign, "NEWS ")) == 2, 10, "the news")
        assert lines(foreign, "NEWS ") == ['NEWS news.a 0 "first"', 'NEWS news.a 1 "second"']

        # it pulls "jobs" at least once: every job arrives, acknowledged
        for i in range(5):
            node.push("jobs", {"job": i}, timeout=10)
        wait_until(lambda: len(lines(foreign, "JOB ")) == 5, 10, "the jobs")
        assert sorted(lines(foreign, "JOB ")) == [f'JOB {{"job": {i}}} first 2' for i in range(5)]
    # the node's stop reaches it as a bye
    foreign.wait_for("BYE", 10)
    assert foreign.proc.wait(10) == 0
