"""Many threads on one `Node`: registrations made and removed while messages for them
flow, and threads that come and go."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import pytest
from helpers import in_threads, wait_until

import zmqmesh


@pytest.mark.timeout(60)
def test_a_topic_subscribed_again_counts_nothing_published_meanwhile_as_lost(
        mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """What a publisher sent while a node did not subscribe (the publisher counts it as
    unrouted) is no loss at a high-water mark once the node subscribes again. (The gap in
    the topic's numbers was counted: unsubscribed, 100 published, subscribed again, and
    ``pubsub.dropped`` said 100, with a warning that the subscriber fell behind.)"""
    got: list[Any] = []

    def handler(msg: zmqmesh.Message) -> None:
        got.append(msg.data)

    sub = zmqmesh.Node("sub", **mesh)
    sub.subscribe("t", handler)
    pub = zmqmesh.Node("pub", **mesh)
    with caplog.at_level(logging.WARNING, logger="zmqmesh"):
        try:
            sub.start()
            pub.start()
            pub.wait_for_subscribers("t", 1, timeout=10)
            for i in range(10):
                pub.publish("t.x", i)
            wait_until(lambda: len(got) == 10, 10, "the first publications")
            sub.unsubscribe("t", handler)
            wait_until(lambda: not pub._engine.publisher.subscribers_ready("t", 1), 10, "the subscription gone")
            for i in range(100):
                pub.publish("t.x", i)
            wait_until(lambda: pub.stats()["pubsub"].get("unrouted", 0) == 100, 10, "the publications unrouted")
            sub.subscribe("t", handler)
            pub.wait_for_subscribers("t", 1, timeout=10)
            pub.publish("t.x", "again")
            wait_until(lambda: "again" in got, 10, "the publication after the subscription")
            stats = sub.stats()["pubsub"]
        finally:
            sub.stop()
            pub.stop()
    assert stats["dropped"] == 0, stats
    assert stats["received"] == 11, stats
    assert not [r for r in caplog.records if "high-water mark" in r.getMessage()], caplog.text



@pytest.mark.timeout(120)
def test_registrations_and_removals_from_many_threads_at_once_lose_none_and_bring_none_back(
        mesh: dict[str, Any]) -> None:
    """Threads that register services, subscriptions and callbacks while others register
    and remove their own, at once: every registration kept is there after, none removed is.
    (A removal took no lock: it copied a table, another thread's registration went in, and
    putting the copy back lost it, the call having returned; or brought back what a third
    thread had removed. 4 threads keeping 200 names each, 4 churning: 1 to 12 lost.)"""
    node = zmqmesh.Node("registrar", **mesh)
    rounds = 200

    def handler(msg: zmqmesh.Message) -> None:
        pass

    names = iter(range(1 << 20))

    def keep_or_churn() -> None:
        i = next(names)  # (one C call: unique per thread)
        for k in range(rounds):
            if i % 2:
                own = lambda msg: None  # noqa: E731  (a handler of its own, removed by identity)
                node.service(f"churn-{i}-{k}", own)
                node.unservice(f"churn-{i}-{k}")
                node.subscribe(f"churn-{i}", own)
                node.on_join(own)
                node.remove_handler(own)
            else:
                node.service(f"keep-{i}-{k}", handler)
                node.subscribe(f"keep-{i}-{k}", handler)
                node.on_join(handler)

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch often, as on a busy host)
    try:
        node.start()
        in_threads(keep_or_churn, 8, 60)
    finally:
        sys.setswitchinterval(switching)
        node.stop()
    registry = node._registry
    keepers = [i for i in range(8) if not i % 2]
    lost = [f"keep-{i}-{k}" for i in keepers for k in range(rounds)
            if f"keep-{i}-{k}" not in registry.services or f"keep-{i}-{k}" not in registry.topics]
    back = [n for n in (*registry.services, *registry.topics) if n.startswith("churn")]
    assert not lost, f"{len(lost)} registrations lost: {lost[:5]}"
    assert not back, f"{len(back)} removed registrations back: {back[:5]}"
    assert len(registry.callbacks["join"]) == len(keepers) * rounds


@pytest.mark.timeout(60)
def test_messages_for_a_queue_no_longer_pulled_are_logged_a_line_every_few_seconds_not_one_a_frame(
        mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Messages that reach a node after it stopped pulling their queue (their pushers had
    not heard yet) are dropped, counted, and logged at most a line every few seconds. (A
    line per frame: a thread unpulling a queue while 8 others pushed at full rate made
    3,882 lines in 4 s.)"""
    entered, release = threading.Event(), threading.Event()
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("block", lambda msg: (entered.set(), release.wait(30)))
    puller.pull("q", lambda msg: None)
    pusher = zmqmesh.Node("pusher", **mesh)
    frames = 200
    with caplog.at_level(logging.WARNING, logger="zmqmesh"):
        try:
            puller.start()
            pusher.start()
            pusher.wait_for_pullers("q", 1, timeout=10)
            pusher.wait_for_pullers("block", 1, timeout=10)
            pusher.push("block", 0)
            assert entered.wait(10), "the blocking handler was not called"
            for i in range(frames):  # (one frame each: sent before the next is queued)
                pusher.push("q", i)
                wait_until(lambda i=i: pusher.stats()["pipeline"]["sent"] == i + 2, 10, "the push sent")
            puller.unpull("q")  # (what waits in its socket now is for a queue it no longer pulls)
            release.set()
            wait_until(lambda: puller.stats()["pipeline"]["dropped"] == frames, 20, "every message counted dropped")
        finally:
            release.set()
            puller.stop()
            pusher.stop()
    lines = [r.getMessage() for r in caplog.records if "no longer pulls" in r.getMessage()]
    assert 1 <= len(lines) <= 3, f"{len(lines)} lines: {lines[:3]}"
    assert "'q'" in lines[0] and "pipeline.dropped" in lines[0], lines[0]
