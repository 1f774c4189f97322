"""Topic pub/sub with prefixes: every subscriber whose prefix matches gets the message.

A publisher sends weather and sports news; one subscriber takes all weather
("weather."), one only Paris ("weather.paris"), one sports. The publisher waits until
the subscriptions are in place (XPUB subscription events) so nothing is lost to the
slow-joiner problem. Run: python patterns/pubsub_topics.py
"""

from __future__ import annotations

import os
import time

import zmqmesh

MESH = f"pattern-pubsub-{os.getpid()}"


def main() -> None:
    received: dict[str, list[str]] = {"all-weather": [], "paris-only": [], "sports-fan": []}
    subscribers = []
    for name, prefix in (("all-weather", "weather."), ("paris-only", "weather.paris"), ("sports-fan", "sports.")):
        node = zmqmesh.Node(name, mesh=MESH)
        node.subscribe(prefix, lambda msg, name=name: received[name].append(f"{msg.topic}={msg.data}"))
        subscribers.append(node.start())

    with zmqmesh.Node("newsroom", mesh=MESH) as pub:
        pub.wait_for_subscribers("weather.paris", 2, timeout=10)  # all-weather and paris-only
        pub.wait_for_subscribers("sports.football", 1, timeout=10)
        news = [("weather.london", "rain"), ("weather.paris", "sun"), ("sports.football", "2-1"), ("weather.paris", "wind")]
        for topic, text in news:
            print(f"newsroom: publish {topic} {text!r}")
            pub.publish(topic, text)
        deadline = time.monotonic() + 10
        while sum(map(len, received.values())) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    for node in subscribers:
        node.stop()
    for name, got in received.items():
        print(f"{name:>11} got {got}")
    assert received == {
        "all-weather": ["weather.london=rain", "weather.paris=sun", "weather.paris=wind"],
        "paris-only": ["weather.paris=sun", "weather.paris=wind"],
        "sports-fan": ["sports.football=2-1"],
    }
    print("pubsub_topics: OK")


if __name__ == "__main__":
    main()
