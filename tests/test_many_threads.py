"""Many threads on one `Node`: registrations made and removed while messages for them
flow, and threads that come and go."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import wait_until

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

