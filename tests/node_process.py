"""A node in its own process, for the multi-process tests. Not a test module.

Usage: python node_process.py SPEC_JSON
SPEC: {"name": str, "options": {NodeConfig fields}, "subscribe": [prefix...],
       "pull": [queue...], "ack_pull": [at-least-once queue...], "service": [name...],
       "idempotent": [service...], "kind": "sync" | "async",
       "block_s": seconds a handler named "block" sleeps, "groups": [zre groups],
       "foreign_stats": true to answer the built-in stats service as another version might,
       "invented_names": N to answer it with N topics and N services more than a node keeps,
       "claims": {"id": ..., "name": ...} to answer it in another node's id and name,
       "stats_latency": {service: histogram} to answer it with these latency histograms,
       "latency_buckets": N to answer it with a latency histogram of N buckets and +Inf,
       "fat_names": [N, L] to answer it with N topics of L characters each, its name first (within a node's bounds),
       "stats_answer": any JSON value to answer it with}

It prints one line per event, flushed at once:
  READY <id> | JOIN <name> <id> | LEAVE <name> <id> | SUB <topic> <json> |
  PULL <queue> <json> | APULL <queue> <json> <redelivered 0|1> | SERVING <json> | WHISPER <json frames> | SHOUT <group> <json frames>
and stops cleanly on SIGTERM (printing STOPPED), or when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time

import zmqmesh
from zmqmesh import StopFlag


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def _json(data: object) -> str:
    return json.dumps(data, default=lambda b: b.decode("latin-1"), separators=(",", ":"))


def install(node: zmqmesh.Node | zmqmesh.AsyncNode, spec: dict) -> None:
    is_async = spec.get("kind") == "async"
    block_s = float(spec.get("block_s", 0))

    for prefix in spec.get("subscribe", []):
        node.subscribe(prefix, lambda msg: say("SUB", msg.topic, _json(msg.data)))
    for queue in spec.get("pull", []):
        node.pull(queue, lambda msg: say("PULL", msg.queue, _json(msg.data)))
    for queue in spec.get("ack_pull", []):
        node.pull(queue, lambda msg: say("APULL", msg.queue, _json(msg.data), int(msg.redelivered)), at_least_once=True)
    for name in spec.get("idempotent", []):
        def slow_idempotent(msg: zmqmesh.Message) -> str:
            say("SERVING", msg.data)
            time.sleep(float(spec.get("idempotent_delay_s", 1.0)))
            return node.name
        node.service(name, slow_idempotent, idempotent=True)
    for name in spec.get("service", []):
        if name == "block":
            def block(msg: zmqmesh.Message) -> str:
                say("BLOCKING")
                time.sleep(block_s)
                return "unblocked"
            node.service(name, block)
        elif name == "boom":
            def boom(msg: zmqmesh.Message) -> None:
                raise ValueError(f"boom {msg.data}")
            node.service(name, boom)
        elif name == "big":  # a reply of msg.data characters
            node.service(name, lambda msg: "x" * int(msg.data))
        elif name == "odd":  # a reply JSON has no strict form for: keys that are not text, NaN, infinities
            node.service(name, lambda msg: {b"k": 1, 7: [float("nan"), float("-inf")], (1, 2): "x"})
        elif is_async:
            async def echo_async(msg: zmqmesh.Message) -> object:
                await asyncio.sleep(0)
                return {"echo": msg.data, "by": node.name}
            node.service(name, echo_async)
        else:
            node.service(name, lambda msg: {"echo": msg.data, "by": node.name})
    node.on_join(lambda peer: say("JOIN", peer.name, peer.id))
    node.on_leave(lambda peer: say("LEAVE", peer.name, peer.id))
    node.on_whisper(lambda msg: say("WHISPER", _json(msg.data)))
    node.on_shout(lambda msg: say("SHOUT", msg.group, _json(msg.data)))


def main() -> None:
    spec = json.loads(sys.argv[1])
    options = spec.get("options", {})
    if "seeds" in options:
        options["seeds"] = tuple(options["seeds"])
    stop = StopFlag()  # (a signal handler raises it: a threading.Event set there can deadlock)
    signal.signal(signal.SIGTERM, stop.set)
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    if spec.get("kind") == "async":
        asyncio.run(run_async(spec, options, stop))
        return
    node = zmqmesh.Node(spec["name"], **options)
    install(node, spec)
    if spec.get("invented_names"):  # plays a stranger whose counters name more topics and services than a node keeps
        invented, described = int(spec["invented_names"]), node._engine.describe

        def describe() -> dict:
            counters = described()
            counters["names"] = {"pubsub": {"received": {f"t{i}": 1 for i in range(invented)}}}
            counters["latency"] = {f"s{i}": {"buckets": [[0.1, 1], ["+Inf", 0]], "sum": 0.05, "count": 1}
                                   for i in range(invented)}
            return counters
        node._engine.describe = describe  # type: ignore[method-assign]
    if "stats_latency" in spec or spec.get("latency_buckets"):  # plays a stranger whose latency histograms
        latency, buckets, told = spec.get("stats_latency"), int(spec.get("latency_buckets", 0)), node._engine.describe

        def timed() -> dict:  # are shaped as given, or have as many buckets as given
            many = [[i / 1000, 1] for i in range(buckets)] + [["+Inf", buckets]]
            return {**told(), "latency": latency if latency is not None else
                    {"s": {"buckets": many, "sum": 0.5, "count": buckets}}}
        node._engine.describe = timed  # type: ignore[method-assign]
    if spec.get("fat_names"):  # plays a stranger whose counters are as large as a node's may be
        (count, length), told = spec["fat_names"], node._engine.describe

        def fat() -> dict:
            return {**told(), "names": {"pubsub": {"received": {f"{spec['name']}-{i:08d}".ljust(length, "t"): 1
                                                              for i in range(count)}}}}
        node._engine.describe = fat  # type: ignore[method-assign]
    if "stats_answer" in spec:  # plays a stranger that answers the stats service with what it likes
        node._engine.describe = lambda: spec["stats_answer"]  # type: ignore[method-assign]
    if spec.get("claims"):  # plays a stranger that answers the stats service in another node's name
        claimed, described = spec["claims"], node._engine.describe
        node._engine.describe = lambda: {**described(), **claimed, "pubsub": {"sent": 999_999}}  # type: ignore[method-assign]
    if spec.get("foreign_stats"):  # plays a node of another version: its counters are shaped otherwise
        node._engine.describe = lambda: {"id": node.id, "name": node.name, "pubsub": "elsewhere"}  # type: ignore[method-assign]
    node.start()
    for group in spec.get("groups", []):
        node.join(group)
    say("ENDPOINTS", json.dumps(node.endpoints))
    say("READY", node.id, node.endpoints["mailbox"])
    stop.wait()
    node.stop()
    say("STOPPED")


async def run_async(spec: dict, options: dict, stop: threading.Event) -> None:
    node = zmqmesh.AsyncNode(spec["name"], **options)
    install(node, spec)
    async with node:
        for group in spec.get("groups", []):
            await node.join(group)
        say("READY", node.id, node.endpoints["mailbox"])
        while not stop.is_set():
            await asyncio.sleep(0.05)
    say("STOPPED")


if __name__ == "__main__":
    main()
