"""``send_queue_max_bytes`` bounds what a node's push send queues really hold: headers
included, and without the loop paying for the bound while nothing changes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh
from zmqmesh._wire.frames import wire_size

MIB = 1 << 20


def _queued_bytes(node: Any) -> int:
    """The bytes every push send queue of ``node`` really holds, headers included."""
    pusher = node._engine.pusher
    return sum(wire_size(x) if isinstance(x, bytes) else len(x) for q in list(pusher.queues.values()) for x in list(q))


@pytest.mark.timeout(60)
def test_headers_count_in_the_bytes_bound(mesh: dict[str, Any]) -> None:
    """A pushed message's headers (up to 16 KiB) wait in the send queue with it: counting
    only the payload, pushes of empty payloads with 16 KiB of headers held 156 MiB
    under a bound of 1 MiB (``held_bytes`` 20 KB), stopped only by ``send_queue_max``."""
    release = threading.Event()
    puller = zmqmesh.Node("stuck", **mesh)
    puller.pull("q", lambda m: release.wait(30), at_least_once=True)
    headers = {"k": "x" * (16 * 1024 - 1)}
    try:
        with puller, zmqmesh.Node("pusher", **{**mesh, "send_queue_max_bytes": MIB, "ack_window": 1}) as node:
            node.wait_for_pullers("q", timeout=10)
            with pytest.raises(zmqmesh.MeshTimeoutError, match="send_queue_max_bytes"):
                for _ in range(1000):  # (16 MiB of headers, should the bound not see them)
                    node.push("q", b"", headers=headers, timeout=0.3)
            assert _queued_bytes(node) <= 2 * MIB, _queued_bytes(node)
            with pytest.raises(zmqmesh.MeshTimeoutError, match="send_queue_max_bytes"):
                node.push_many("q", [b""] * 200, headers=headers, timeout=0.3)
            assert _queued_bytes(node) <= 2 * MIB, _queued_bytes(node)
            release.set()
    finally:
        release.set()


@pytest.mark.timeout(90)
def test_a_full_bytes_bound_costs_the_loop_nothing_while_nothing_changes(mesh: dict[str, Any]) -> None:
    """With the queues full to ``send_queue_max_bytes`` of many small messages and the
    pullers taking nothing, the loop retries every few ms: it counted every message's
    bytes again at each retry (90,000 messages: half a core, against 3% below the
    bound), though nothing had been added or sent."""
    release = threading.Event()
    names = [f"q{k}" for k in range(10)]
    puller = zmqmesh.Node("stuck", **mesh)
    for name in names:
        puller.pull(name, lambda m: release.wait(60), at_least_once=True)
    try:
        with puller, zmqmesh.Node("pusher", **{**mesh, "send_queue_max_bytes": 60 * MIB, "ack_window": 1}) as node:
            for name in names:
                node.wait_for_pullers(name, timeout=10)
            for name in names:
                try:
                    node.push_many(name, [bytes(700)] * 10_000, timeout=1)
                except zmqmesh.MeshTimeoutError as exc:
                    assert "send_queue_max_bytes" in str(exc)
            assert node._engine.pusher.held_bytes >= 60 * MIB
            time.sleep(0.5)
            cpu, wall = time.process_time(), time.monotonic()
            time.sleep(3)
            share = (time.process_time() - cpu) / (time.monotonic() - wall)
            assert share < 0.2, f"{share:.0%} of a core while nothing changed"
            release.set()
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_what_a_queue_dropped_no_longer_counts_against_the_bytes_bound(mesh: dict[str, Any]) -> None:
    """Messages dropped from one queue (its pullers left, none came back within
    ``push_timeout_s``) while another queue still held some: the node's count of the
    bytes its queues hold kept them (50 MiB of 64 KiB payloads no longer queued, here: 75 MiB counted, 25 MiB queued)
    until every queue was empty, holding callers back by bytes that were gone."""
    release = threading.Event()
    stays, leaves = zmqmesh.Node("stays", **mesh), zmqmesh.Node("leaves", **mesh)
    stays.pull("a", lambda m: release.wait(30))
    leaves.pull("b", lambda m: release.wait(30))
    payload = bytes(64 * 1024)
    try:
        with stays, zmqmesh.Node("pusher", **{**mesh, "push_timeout_s": 1.0, "send_queue_max_bytes": 256 * MIB}) as node:
            leaves.start()
            node.wait_for_pullers("a", timeout=10)
            node.wait_for_pullers("b", timeout=10)
            node.push_many("a", [payload] * 600, timeout=10)  # (more than ZeroMQ's buffers and the puller's take)
            node.push_many("b", [payload] * 600, timeout=10)
            leaves.stop(timeout=0)
            deadline = time.monotonic() + 20
            while node.stats()["pipeline"]["dropped"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert node.stats()["pipeline"]["dropped"] > 100
            assert _queued_bytes(node) > 0, "queue a emptied: the test needs it to hold messages"
            # (the count is set right at the end of the flush that dropped them: waited for, not slept on)
            wait_until(lambda: node._engine.pusher.held_bytes - _queued_bytes(node) < 2 * len(payload), 10,
                       "the bytes counted to be those queued, the dropped ones taken off")
            release.set()
    finally:
        release.set()
        leaves.stop(timeout=0)


@pytest.mark.timeout(60)
def test_a_socket_that_takes_nothing_is_tried_again_ever_less_often(mesh: dict[str, Any]) -> None:
    """A push socket that ZeroMQ keeps refusing (its puller takes nothing) wakes the loop
    itself once it takes again: the loop tried it every 2 ms all the same, each try a flush
    that sent nothing (937 tries in 2 s here; pushing 1 MiB payloads, 45 us of the loop's
    CPU a message against 16). The tries now come ever less often while nothing goes (31
    in 2 s), and what waited is still sent once the puller takes again."""
    release = threading.Event()
    received = []
    puller = zmqmesh.Node("stuck", **mesh)

    def take(message: Any) -> None:
        release.wait(30)
        received.append(len(message.data))

    puller.pull("q", take)
    payload = bytes(64 * 1024)  # (a frame each: ZeroMQ's high-water marks fill with few of them)
    try:
        with puller, zmqmesh.Node("pusher", **{**mesh, "send_queue_max_bytes": 8 * MIB}) as node:
            node.wait_for_pullers("q", timeout=10)
            sent = 0
            with pytest.raises(zmqmesh.MeshTimeoutError, match="send_queue_max_bytes"):
                for _ in range(10_000):
                    node.push("q", payload, timeout=2)
                    sent += 1
            pusher = node._engine.pusher
            wait_until(lambda: "q" in pusher.stalled, 10, "ZeroMQ to refuse the queue's frames")
            tries = pusher.refusals
            time.sleep(2)
            tries = pusher.refusals - tries
            assert tries < 100, f"the refused socket was tried {tries} times in 2 s"
            release.set()
            wait_until(lambda: len(received) == sent, 20, f"all {sent} messages to arrive")
    finally:
        release.set()
