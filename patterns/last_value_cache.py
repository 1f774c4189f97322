"""Late-joining subscribers catch up through a last-value cache.

Pub/sub delivers only what is published after a subscription is in place. A cache node
subscribes to "prices." and keeps the last value of every topic; it answers
"prices.snapshot". A subscriber that joins late asks for the snapshot, then takes live
updates, and so starts with the full picture. Run: python patterns/last_value_cache.py
"""

from __future__ import annotations

import os
import time

import zmqmesh

MESH = f"pattern-lvc-{os.getpid()}"


def main() -> None:
    cache_node = zmqmesh.Node("cache", mesh=MESH)
    last: dict[str, object] = {}
    cache_node.subscribe("prices.", lambda msg: last.__setitem__(msg.topic, msg.data))
    cache_node.service("prices.snapshot", lambda msg: dict(last))

    with cache_node, zmqmesh.Node("publisher", mesh=MESH) as pub:
        pub.wait_for_subscribers("prices.x", 1, timeout=10)
        for topic, price in (("prices.eur", 1.08), ("prices.gbp", 1.27), ("prices.eur", 1.09)):
            pub.publish(topic, price)
        deadline = time.monotonic() + 5
        while last.get("prices.eur") != 1.09 and time.monotonic() < deadline:
            time.sleep(0.01)
        print("publisher: published eur 1.08, gbp 1.27, eur 1.09 before anyone else listened")

        live: dict[str, object] = {}
        with zmqmesh.Node("late-joiner", mesh=MESH) as late:
            late.subscribe("prices.", lambda msg: live.__setitem__(msg.topic, msg.data))
            pub.wait_for_subscribers("prices.x", 2, timeout=10)
            live.update(late.request("prices.snapshot", None, timeout=5))
            print("late-joiner: snapshot from the cache:", dict(sorted(live.items())))
            pub.publish("prices.gbp", 1.28)
            deadline = time.monotonic() + 5
            while live.get("prices.gbp") != 1.28 and time.monotonic() < deadline:
                time.sleep(0.01)
            print("late-joiner: after a live update:", dict(sorted(live.items())))
    assert live == {"prices.eur": 1.09, "prices.gbp": 1.28}
    print("last_value_cache: OK")


if __name__ == "__main__":
    main()
