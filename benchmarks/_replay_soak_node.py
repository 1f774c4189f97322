"""One node of the replay soak (``soak_replay.py``), in its own process. Not a benchmark by itself.

Usage (``soak_replay.py`` starts it)::

    python3 _replay_soak_node.py SPEC_JSON

SPEC: ``{"name", "role": "publisher"|"subscriber", "options": Node options, "store":
directory or null, "verbose": bool, "max_life": seconds}`` and, for a publisher,
``"topics"``, ``"history"`` (the ``history=`` option), ``"mode"`` (``"one"``: `publish`
one message at a time, round robin over the topics; ``"many"``: `publish_many` of 1 to
``"batch"`` messages to one topic at a time), ``"rate"`` (messages a second); for a
subscriber, ``"prefix"``, ``"replay"``, ``"durable_name"`` (or null) and ``"work_s"``
(seconds each handler takes).

A publisher numbers its messages per topic, ``{"p": name, "t": topic, "i": n}``, and goes
on, after a restart, from the number its store will give the topic's next message (read
with `zmqmesh.inspect_store` before the node starts: a message whose ``publish`` returned
but that the loop had not yet kept when the process was killed was given no number, and
its number goes to the next message), so that ``i`` is ``msg.sequence`` for every message
a subscriber gets.

Control on stdin, one word a line: ``QUIESCE`` (a publisher stops publishing), ``STOP``
(stop the node cleanly and exit). End of stdin or SIGTERM also stops it; ``max_life``
bounds the process in any case.

Lines printed, each flushed at once::

    READY <node id> <pid>
    FIRST <topic> <n>                    a publisher's first number in the topic, from its store
    PUB <topic> <first> <end>            numbers first..end-1 queued (publish returned)
    PUBERR <type> <message>
    H <msg id> <topic> <sequence> <p> <i> <gap> <redelivered 0|1>   before the handler returns
    STATS <json>                         every 2 s: the node's pubsub and rejected counters
    QUIESCED
    STOPPED <json>                       after node.stop(): the same counters
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from typing import Any

from _soak_common import Control, Pace, run_node, say, serve

import zmqmesh


def numbers_kept(store: str, topics: list[str]) -> dict[str, int]:
    """The number the store gives each topic's next message (0 for a topic it never kept)."""
    try:
        kept = zmqmesh.inspect_store(store)["topics"]
    except zmqmesh.StoreError:  # (no store yet: a first start)
        kept = {}
    return {t: int(kept[t]["next_seq"]) if t in kept else 0 for t in topics}


def publish_numbered(node: zmqmesh.Node, spec: dict[str, Any], nxt: dict[str, int], quiesce: threading.Event) -> None:
    """Publish until ``quiesce``, paced at spec["rate"]; ``nxt[topic]`` is the topic's next number."""
    name, topics, rate = spec["name"], list(spec["topics"]), float(spec["rate"])
    many, batch = spec["mode"] == "many", int(spec.get("batch", 1))
    rng = random.Random()
    pace = Pace(rate, quiesce)
    turn = 0
    while not quiesce.is_set():
        topic = rng.choice(topics) if many else topics[turn % len(topics)]
        turn += 1
        count = rng.randint(1, batch) if many else 1
        first = nxt[topic]
        items = [{"p": name, "t": topic, "i": i} for i in range(first, first + count)]
        try:
            if many:
                node.publish_many(topic, items)
            else:
                node.publish(topic, items[0])
        except zmqmesh.ZmqMeshError as exc:
            say("PUBERR", type(exc).__name__, str(exc).replace("\n", " ")[:200])
            quiesce.wait(0.5)
            continue
        nxt[topic] = first + count
        say("PUB", topic, first, first + count)
        pace.after(count)


def subscribe(node: zmqmesh.Node, spec: dict[str, Any]) -> None:
    work_s = float(spec.get("work_s", 0.0))

    def handle(msg: zmqmesh.Message) -> None:
        data = msg.data
        say("H", msg.id, msg.topic, msg.sequence, data["p"], data["i"], msg.gap, int(msg.redelivered))
        if work_s:
            time.sleep(work_s)

    node.subscribe(spec["prefix"], handle, replay=spec["replay"], durable_name=spec.get("durable_name"))


def counters(node: zmqmesh.Node) -> str:
    stats = node.stats()
    return json.dumps({"pubsub": stats.get("pubsub", {}), "rejected": stats.get("rejected", {})},
                      separators=(",", ":"), default=str)


def main() -> None:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.DEBUG if spec.get("verbose") else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    control = Control()

    publisher = spec["role"] == "publisher"
    nxt = numbers_kept(spec["store"], spec["topics"]) if publisher else {}
    node = zmqmesh.Node(spec["name"], store=spec.get("store"), history=spec.get("history") or (), **spec["options"])
    if not publisher:
        subscribe(node, spec)
    node.start()
    say("READY", node.id, os.getpid())
    workers: list[threading.Thread] = []
    if publisher:
        for topic, n in nxt.items():
            say("FIRST", topic, n)
        workers.append(threading.Thread(target=publish_numbered, args=(node, spec, nxt, control.quiesce),
                                        name="soak-publish", daemon=True))
        workers[0].start()

    serve(control, float(spec.get("max_life", 900)), lambda: counters(node), workers=workers)
    node.stop(timeout=5.0)
    say("STOPPED", counters(node))
    sys.stdout.flush()
    os._exit(0)  # the stdin reader must not hold the exit


if __name__ == "__main__":
    run_node(main)
