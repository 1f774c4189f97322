"""What publishing can cost a node: its publish queue is bounded in bytes as its push
queues are, and a subscriber that stops reading holds at most ``pub_hwm`` frames at its
publisher, a mark of its own."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import NodeProcess, hold_loop, rss_bytes, wait_until

import zmqmesh

MIB = 1 << 20


@pytest.mark.timeout(60)
def test_a_subscriber_that_stops_reading_costs_its_publisher_less_with_a_lower_pub_hwm(
        mesh: dict[str, Any], spawn: Callable[..., NodeProcess]) -> None:
    """Publishing 64 KiB messages for 3 s past a stopped subscriber, with ``pub_hwm``
    1,000: the publisher grew to 162-234 MiB resident (in a process of its own), where it
    grows to 774 MiB with the default 10,000 (which ``send_hwm`` set before ``pub_hwm`` was
    an option of its own), and to 1.9 GiB when the publish queue was bounded in messages
    only. (The test's process grew by 1,324 MiB with the code before.)"""
    subscriber = spawn("frozen", subscribe=["frames"])
    payload = os.urandom(64 * 1024)
    with zmqmesh.Node("publisher", **{**mesh, "pub_hwm": 1000}) as node:
        node.wait_for_subscribers("frames", 1, timeout=15)
        subscriber.signal(signal.SIGSTOP)
        try:
            base = peak = rss_bytes()
            published = 0
            until = time.monotonic() + 3
            while time.monotonic() < until:
                for _ in range(100):
                    node.publish("frames", payload)
                published += 100
                peak = max(peak, rss_bytes())
        finally:
            subscriber.signal(signal.SIGCONT)
    assert published > 2_000  # (far past the 1,000 frames the subscriber may hold here)
    assert peak - base < 450 * MIB, f"the publisher grew by {(peak - base) // MIB} MiB"


@pytest.mark.timeout(60)
def test_publishes_wait_while_the_publish_queue_holds_send_queue_max_bytes(mesh: dict[str, Any]) -> None:
    """With the loop held up, publications of 1 MiB queued until ``send_queue_max``
    (10,000 messages, 10 GiB); a `publish` now waits once the queue holds
    ``send_queue_max_bytes``, and ``publish_many`` queues only what fits. What was queued
    is delivered once the loop goes on."""
    got: list[int] = []
    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("big", lambda message: got.append(len(message.data)))
    payload = b"x" * MIB
    release = threading.Event()
    options = {**mesh, "send_queue_max_bytes": 4 * MIB, "push_timeout_s": 0.3}
    try:
        with subscriber, zmqmesh.Node("publisher", **options) as node:
            node.wait_for_subscribers("big", 1, timeout=15)
            hold_loop(node, release, 5)  # (the loop sends nothing meanwhile)
            queued = 0
            with pytest.raises(zmqmesh.MeshTimeoutError, match="send_queue_max_bytes"):
                for _ in range(40):
                    node.publish("big", payload)
                    queued += 1
            assert 4 <= queued <= 5, queued
            with pytest.raises(zmqmesh.MeshTimeoutError, match="send_queue_max_bytes"):
                node.publish_many("big", [payload] * 10)
            assert node.stats()["pubsub"]["refused_queue_full"] == 2
            release.set()
            wait_until(lambda: len(got) >= queued, 15, "the queued publications")
            time.sleep(0.3)
            assert got == [MIB] * queued
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_async_publishes_wait_for_room_once_the_publish_queue_holds_send_queue_max_bytes(mesh: dict[str, Any]) -> None:
    """An `AsyncNode` sends on its caller's loop: a task publishing without a pause left
    every publication of 1 MiB in the queue (up to ``send_queue_max``, 10 GiB) until it
    awaited something else. It now awaits room once the queue holds
    ``send_queue_max_bytes``, and everything still arrives."""
    import asyncio

    got: list[int] = []

    async def main() -> int:
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("big", lambda message: got.append(len(message.data)))
        with subscriber:
            async with zmqmesh.AsyncNode("publisher", **{**mesh, "send_queue_max_bytes": 4 * MIB}) as node:
                await node.wait_for_subscribers("big", 1, timeout=15)
                queue = node._engine.publisher.queue
                most = 0
                for _ in range(20):
                    await node.publish("big", b"x" * MIB)
                    most = max(most, len(queue))
                await node.publish_many("big", [b"x" * MIB] * 20)
                most = max(most, len(queue))
                await asyncio.to_thread(wait_until, lambda: len(got) >= 40, 15, "the publications")
                return most

    assert asyncio.run(main()) <= 5
    assert got == [MIB] * 40


@pytest.mark.timeout(60)
def test_a_long_lived_subscriber_keeps_the_numbers_of_few_publishers_gone(
        mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived subscriber among publishers that come and go (each a new peer id): it
    keeps the message numbers (for counting drops) of at most `MAX_PUBLISHERS_GONE`
    publishers gone (here 2), those met first forgotten as a new one comes, and still
    counts no drop. (Before, those of every publisher stayed until 65,536 topics filled the
    table: 3,000 short-lived publishers left 3,000 publishers' and 11,000 topics' numbers,
    ~1.2 MB; here 6 left 6.)"""
    from zmqmesh._patterns import pubsub

    monkeypatch.setattr(pubsub, "MAX_PUBLISHERS_GONE", 2, raising=False)
    got: list[int] = []
    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("news.", lambda m: got.append(m.data))
    with subscriber:
        for run in range(6):
            with zmqmesh.Node(f"publisher{run}", **mesh) as publisher:
                publisher.wait_for_subscribers("news.", 1)
                publisher.publish(f"news.{run % 2}", run)
                wait_until(lambda run=run: run in got, 10, f"publication {run}")
            wait_until(lambda: not subscriber.peers(), 10, "the publisher gone")
        tracked = len(subscriber._engine.inbox.gaps)
        dropped = subscriber.stats()["pubsub"]["dropped"]
    assert tracked <= 3, f"the numbers of 2 publishers gone and the last one's, not of {tracked}"
    assert got == list(range(6)) and dropped == 0

