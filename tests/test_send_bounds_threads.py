"""The send queues' bytes bounds with many caller threads at once (with headers, and
``publish_many`` and ``push_many`` from many threads), the node's loop held up."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import hold_loop, wait_until

import zmqmesh
from zmqmesh._wire.frames import wire_size

KIB = 1 << 10


def _queued_bytes(node: zmqmesh.Node) -> int:
    return sum(wire_size(body) for _, body in list(node._engine.publisher.queue))


def _rounds_of_threads(threads: int, rounds: int, call: Callable[[], None], queued: Callable[[], int],
                       empty: Callable[[], None]) -> tuple[set[str], int]:
    """``rounds`` times, ``threads`` threads each make ``call`` at once, switching often (as
    on a busy host); then ``queued()`` is read and the queues are emptied (``empty``: the
    loop is held). The outcomes seen ("queued", "timed out" or another error) and the
    largest ``queued()``."""
    outcomes: set[str] = set()
    start = threading.Barrier(threads)

    def one() -> None:
        start.wait()
        try:
            call()
            outcomes.add("queued")
        except zmqmesh.MeshTimeoutError:
            outcomes.add("timed out")
        except BaseException as exc:  # (reported by the caller)
            outcomes.add(repr(exc))

    peak = 0
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(rounds):
            workers = [threading.Thread(target=one) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
            peak = max(peak, queued())
            empty()
    finally:
        sys.setswitchinterval(switching)
    return outcomes, peak


@pytest.mark.timeout(60)
def test_threads_publishing_with_headers_keep_the_publish_queue_within_its_bytes_bound(mesh: dict[str, Any]) -> None:
    """Eight threads publish 100-byte messages with headers while the loop sends nothing,
    until the queue's bound (1 MiB) makes them give up. ``held_bytes += wire_size(body)``
    read the count before it called `wire_size`, so a thread switch in that call lost
    another thread's addition: the queue held 11-21 KB past its bound (115-208 messages,
    not one per thread; with the default switch interval, 8 threads lost 2,745 additions
    of 160,000)."""
    bound, threads = 1024 * KIB, 8
    release = threading.Event()
    errors: list[BaseException] = []
    switching = sys.getswitchinterval()
    with zmqmesh.Node("publisher", **{**mesh, "send_queue_max_bytes": bound, "push_timeout_s": 0.2}) as node:

        def publish() -> None:
            try:
                while True:
                    node.publish("t", b"x" * 100, headers={"k": "v"})
            except zmqmesh.MeshTimeoutError:
                pass
            except BaseException as exc:  # (reported below)
                errors.append(exc)

        sys.setswitchinterval(1e-5)  # (thread switches often, as on a busy host)
        try:
            hold_loop(node, release, 30)  # (the loop sends nothing meanwhile)
            workers = [threading.Thread(target=publish) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
        finally:
            sys.setswitchinterval(switching)
            queued = _queued_bytes(node)
            queue = node._engine.publisher.queue
            one = wire_size(queue[0][1]) if queue else 0  # (read while the loop is held: a message's bytes)
            release.set()
        assert not errors, errors
        assert one, "nothing was queued"
        assert queued <= bound + threads * one, f"the publish queue held {queued} bytes, {queued - bound} past its bound"


@pytest.mark.timeout(60)
def test_threads_calling_publish_many_at_once_share_the_room_the_bound_leaves(mesh: dict[str, Any]) -> None:
    """Sixteen threads each `publish_many` 9,000 messages of 500 bytes at once (4.3 MiB
    each, the bound is 4 MiB) while the loop sends nothing, four times. Each measured the
    room (`Publisher.fit`), then extended the queue, then added what it took: threads that
    measured before another added each took the whole room, and the queue held 8.0-13.4 MB
    (2 to 3.2 times its bound, 8,400-18,400 messages past it), not a message per thread
    past it."""
    bound, threads = 4 * KIB * KIB, 16
    release = threading.Event()
    items = [b"x" * 500] * 9000
    with zmqmesh.Node("publisher", **{**mesh, "send_queue_max_bytes": bound, "push_timeout_s": 0.3}) as node:
        publisher = node._engine.publisher

        def empty() -> None:
            publisher.queue.clear()
            publisher.held_bytes = 0

        try:
            hold_loop(node, release, 30)  # (the loop sends nothing meanwhile)
            outcomes, peak = _rounds_of_threads(threads, 4, lambda: node.publish_many("t", items),
                                                lambda: _queued_bytes(node), empty)
        finally:
            release.set()
        assert outcomes == {"timed out"}, outcomes
        assert peak <= bound + threads * 600, f"the publish queue held {peak} bytes, {peak - bound} past its bound"


@pytest.mark.timeout(60)
def test_threads_calling_push_many_at_once_share_the_room_the_bound_leaves(mesh: dict[str, Any]) -> None:
    """The same with `push_many` and headers (`Pusher.take` weighs them with `wire_size`, a
    call per message: time enough for another thread to measure the same room): sixteen
    threads queued 8-32 MiB against a 4 MiB bound (4 runs of 5 failed at a round)."""
    from zmqmesh._patterns.pipeline import bytes_queued

    bound, threads = 4 * KIB * KIB, 16
    release = threading.Event()
    items = [b"x" * 500] * 9000
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("q", lambda message: None)
    with puller, zmqmesh.Node("pusher", **{**mesh, "send_queue_max_bytes": bound, "push_timeout_s": 0.3}) as node:
        node.wait_for_pullers("q", timeout=15)
        node.push("q", b"first")  # (the queue's socket is made)
        wait_until(lambda: not node._engine.pusher.held_bytes, 5, "the first push sent")
        pusher = node._engine.pusher

        def empty() -> None:
            for q in pusher.queues.values():
                q.clear()
            pusher.held = pusher.held_bytes = 0

        try:
            hold_loop(node, release, 30)  # (the loop sends nothing meanwhile)
            outcomes, peak = _rounds_of_threads(threads, 3, lambda: node.push_many("q", items, headers={"k": "v"}),
                                                lambda: bytes_queued(list(pusher.queues.values())), empty)
        finally:
            release.set()
        assert outcomes == {"timed out"}, outcomes
        assert peak <= bound + threads * 600, f"the push queues held {peak} bytes, {peak - bound} past their bound"


@pytest.mark.timeout(30)
def test_a_publish_queue_full_of_messages_names_send_queue_max(mesh: dict[str, Any]) -> None:
    """A publish queue full by its count, not its bytes, raised "send queue full: the
    receivers are not keeping up", naming no option, where the XPUB never waits for a
    receiver: what is behind is the node's own loop."""
    release = threading.Event()
    with zmqmesh.Node("publisher", **{**mesh, "send_queue_max": 100, "push_timeout_s": 0.2}) as node:
        try:
            hold_loop(node, release, 10)  # (the loop sends nothing meanwhile)
            with pytest.raises(zmqmesh.MeshTimeoutError, match="send_queue_max=100"):
                for _ in range(101):
                    node.publish("t", b"small")
        finally:
            release.set()
        assert node.stats()["pubsub"]["refused_queue_full"] == 1
