"""A careless caller gets a clear, typed error at once: never a bare Python error from deep
inside, never a wait that cannot end."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh

BAD_TIMEOUTS = [math.nan, math.inf, -1, -0.5, "5", True, None]


def test_every_timeout_is_checked(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("careless", **mesh) as node:
        node.service("echo", lambda m: m.data)
        node.pull("jobs", lambda m: None)
        calls = {
            "push": lambda t: node.push("jobs", 1, timeout=t),
            "request": lambda t: node.request("echo", 1, timeout=t),
            "wait_for_peers": lambda t: node.wait_for_peers(1, timeout=t),
            "wait_for_subscribers": lambda t: node.wait_for_subscribers("x", 1, timeout=t),
            "wait_for_service": lambda t: node.wait_for_service("echo", timeout=t),
            "wait_for_pullers": lambda t: node.wait_for_pullers("jobs", timeout=t),
            "node_stats": lambda t: node.node_stats(node.id, timeout=t),
        }
        for name, call in calls.items():
            for bad in BAD_TIMEOUTS:
                if bad is None and name in ("push", "request", "node_stats"):
                    continue  # None: the configured default
                with pytest.raises(zmqmesh.ConfigError, match="timeout"):
                    call(bad)
                    pytest.fail(f"{name}(timeout={bad!r}) was accepted")
        assert node.request("echo", 7, timeout=5) == 7, "the node is unharmed"
        with pytest.raises(zmqmesh.ConfigError, match="ack_timeout_s"):
            node.pull("other", lambda m: None, at_least_once=True, ack_timeout_s=math.nan)
        with pytest.raises(zmqmesh.ConfigError, match="timeout"):
            node.stop(timeout=math.inf)
    for option, bad in (("push_timeout_s", math.inf), ("request_timeout_s", math.nan), ("heartbeat_interval_s", math.nan),
                        ("linger_s", -1)):
        with pytest.raises(zmqmesh.ConfigError, match=option):
            zmqmesh.Node("bad", **{**mesh, option: bad})


def test_an_async_node_checks_its_timeouts_too(mesh: dict[str, Any]) -> None:
    async def main() -> None:
        async with zmqmesh.AsyncNode("careless", **mesh) as node:
            node.service("echo", lambda m: m.data)
            for bad in (math.nan, math.inf, -1):
                with pytest.raises(zmqmesh.ConfigError, match="timeout"):
                    await node.request("echo", 1, timeout=bad)
                with pytest.raises(zmqmesh.ConfigError, match="timeout"):
                    await node.push("echo-queue", 1, timeout=bad)
                with pytest.raises(zmqmesh.ConfigError, match="timeout"):
                    await node.wait_for_peers(1, timeout=bad)
            assert await node.request("echo", 3, timeout=5) == 3

    asyncio.run(main())


def test_large_messages_near_the_limit_arrive_in_every_pattern(mesh: dict[str, Any]) -> None:
    """Batches never pass what a receiver accepts: messages close to max_message_bytes,
    queued together, all arrive (at-least-once ones are acknowledged, never stuck)."""
    limit = 2 * 1024 * 1024
    big = b"\x01" * (limit - 64)  # its encoding is a few bytes under the limit
    got: dict[str, list[int]] = {"alo": [], "plain": [], "sub": []}
    options = {**mesh, "max_message_bytes": limit}
    receiver = zmqmesh.Node("receiver", **options)
    receiver.pull("alo", lambda m: got["alo"].append(len(m.data)), at_least_once=True)
    receiver.pull("plain", lambda m: got["plain"].append(len(m.data)))
    receiver.subscribe("big.", lambda m: got["sub"].append(len(m.data)))
    with receiver, zmqmesh.Node("sender", **options) as sender:
        sender.wait_for_pullers("alo")
        sender.wait_for_pullers("plain")
        sender.wait_for_subscribers("big.", 1)
        small = b"\x02" * 60_000
        for _ in range(3):
            sender.push("alo", small)
            sender.push("alo", big, headers={"h": "x" * 8000})
            sender.push("plain", small)
            sender.push("plain", big)
            sender.publish("big.x", small)
            sender.publish("big.x", big)
        wait_until(lambda: all(len(v) == 6 for v in got.values()), 30, "every large message")
    for kind, sizes in got.items():
        assert sorted(sizes) == sorted([len(small), len(big)] * 3), kind
    assert receiver.stats()["rejected"].get("pipeline_malformed", 0) == 0
