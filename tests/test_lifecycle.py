"""Start and stop: bounded, draining, and leaking nothing; slow consumers stay bounded."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

import zmqmesh
from helpers import wait_until


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(240)
def test_a_thousand_start_stop_cycles_leak_no_fds_or_threads(mesh: dict[str, Any]) -> None:
    def cycle() -> None:
        node = zmqmesh.Node("cycler", **mesh)
        node.pull("q", lambda m: None)
        node.start()
        node.stop()

    cycle()  # warm up lazily created things (logging, codecs)
    fds, threads = open_fds(), threading.active_count()
    started = time.monotonic()
    for _ in range(1000):
        cycle()
    elapsed = time.monotonic() - started
    wait_until(lambda: threading.active_count() <= threads, 5, "threads to end")
    assert open_fds() <= fds + 2, f"{open_fds() - fds} file descriptors leaked"
    assert elapsed < 200


def test_async_start_stop_cycles_leak_nothing(mesh: dict[str, Any]) -> None:
    async def cycles(n: int) -> None:
        for _ in range(n):
            async with zmqmesh.AsyncNode("acycler", **mesh) as node:
                node.subscribe("x", lambda m: None)

    asyncio.run(cycles(5))
    fds, threads = open_fds(), threading.active_count()
    asyncio.run(cycles(200))
    wait_until(lambda: threading.active_count() <= threads, 5, "threads to end")
    assert open_fds() <= fds + 2


def test_stop_finishes_work_already_received(mesh: dict[str, Any]) -> None:
    handled: list[int] = []
    worker = zmqmesh.Node("worker", **mesh)
    worker.pull("slow", lambda m: (time.sleep(0.005), handled.append(m.data)))
    with zmqmesh.Node("boss", **mesh) as boss:
        worker.start()
        boss.wait_for_pullers("slow", timeout=10)
        for i in range(200):
            boss.push("slow", i)
        wait_until(lambda: worker.stats()["pipeline"]["received"] == 200, 10, "all messages at the worker")
        assert len(handled) < 200, "the test needs work still in progress when stop() is called"
        started = time.monotonic()
        worker.stop(timeout=5)
        assert sorted(handled) == list(range(200)), "in-flight work is finished before the node stops"
        assert time.monotonic() - started < 5


def test_stop_is_bounded_even_when_a_handler_never_returns(mesh: dict[str, Any]) -> None:
    forever = threading.Event()
    node = zmqmesh.Node("stuck", **mesh)
    node.service("hang", lambda m: forever.wait(60))
    with zmqmesh.Node("client", **mesh) as client:
        node.start()
        client.wait_for_service("hang", timeout=10)
        caller = threading.Thread(target=lambda: pytest.raises(zmqmesh.ZmqMeshError, client.request, "hang", None, timeout=10))
        caller.start()
        wait_until(lambda: node.stats()["service"]["received"] == 1, 10, "the request to arrive")
        started = time.monotonic()
        node.stop(timeout=1.0)
        assert time.monotonic() - started < 3.0
        forever.set()
        caller.join(15)


def test_a_handler_may_stop_its_own_node(mesh: dict[str, Any]) -> None:
    threads = threading.active_count()
    node = zmqmesh.Node("quitter", **mesh)
    took: list[float] = []

    @node.service("quit")
    def quit_now(msg: zmqmesh.Message) -> str:
        started = time.monotonic()
        node.stop(timeout=5.0)
        took.append(time.monotonic() - started)
        return "bye"

    with zmqmesh.Node("client", **mesh) as client:
        node.start()
        client.wait_for_service("quit", timeout=10)
        with pytest.raises(zmqmesh.PeerLostError):  # the node is gone before its reply
            client.request("quit", timeout=10)
        wait_until(lambda: took, 10, "the handler's stop() to return")
    assert took[0] < 4.0  # it does not wait for its own thread to end
    assert not node.running
    wait_until(lambda: threading.active_count() <= threads, 5, "the node's threads to end")


def test_slow_subscriber_never_stalls_the_publisher_and_its_drops_are_counted(mesh: dict[str, Any]) -> None:
    small = {**mesh, "recv_hwm": 10, "send_hwm": 10}
    received: list[int] = []
    gate = threading.Event()
    slow = zmqmesh.Node("slow", **small)
    slow.subscribe("flood", lambda m: (gate.wait(30), received.append(m.data)))  # stuck until the flood ends
    with slow, zmqmesh.Node("publisher", **small) as pub:
        pub.wait_for_subscribers("flood", 1, timeout=10)
        started = time.monotonic()
        for i in range(50_000):
            pub.publish("flood", i)
        wait_until(lambda: pub.stats()["pubsub"]["sent"] == 50_000, 20, "the publisher to send everything")
        assert time.monotonic() - started < 20, "publishing must not wait for the stuck subscriber"
        gate.set()
        pub.publish("flood", 50_000)  # after the backlog, this last one makes every gap visible
        wait_until(lambda: received and received[-1] == 50_000, 30, "the final message")
        stats = slow.stats()["pubsub"]
        assert stats["dropped"] > 0
        assert stats["received"] + stats["dropped"] == 50_001, stats
        assert received == sorted(received), "what arrives keeps the publisher's order"
