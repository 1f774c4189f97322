"""One short-lived peer process of ``churn.py``: rounds of several `Node`s (each its own
peer id) that join the mesh, use every pattern towards the long-lived node for a moment,
and leave. Between rounds they stop politely; the harness may SIGKILL the process at any
moment. Not a benchmark by itself.

Argument: a JSON spec ``{"mesh": {...node options...}, "rounds": n, "nodes": k,
"stay_s": seconds, "seed": n, "tmp": dir}`` (the peers' stores go under ``tmp``). Prints
one line per round: ``ROUND <ids>`` when its nodes
met the long-lived node, ``LEFT <n>`` after they stopped, ``ERROR <text>`` on a failure.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import zmqmesh


def say(line: str) -> None:
    """One flushed line for the harness."""
    print(line, flush=True)


def make_peer(mesh: dict[str, Any], store: str, index: int, drains_kept: bool) -> zmqmesh.Node:
    """A peer node: offers ``peer.echo`` (the long-lived node calls it), subscribes to
    ``news.`` with replay (a replay from the long-lived node's history), pulls ``kept``
    when it drains the long-lived node's keeper; every other one keeps a history of what
    it publishes (the long-lived node's replaying and durable subscriptions follow it)."""
    history = {"news.peer.": 20} if index % 2 else None
    node = zmqmesh.Node(f"churn-peer-{index}", store=store, history=history, **mesh)

    @node.service("peer.echo")
    def echo(msg: zmqmesh.Message) -> Any:
        return msg.data

    @node.subscribe("news.", replay="all")
    def on_news(msg: zmqmesh.Message) -> None:
        pass

    if drains_kept:
        @node.pull("kept", at_least_once=True)
        def on_kept(msg: zmqmesh.Message) -> None:
            pass

    return node.start()


def use_everything(node: zmqmesh.Node, rng: random.Random, stay_s: float) -> None:
    """Every pattern towards the long-lived node for ``stay_s`` seconds."""
    node.wait_for_service("hub.echo", timeout=15)
    node.wait_for_pullers("jobs", timeout=15)
    node.wait_for_pullers("orders", timeout=15)
    deadline = time.monotonic() + stay_s
    n = 0
    while True:
        n += 1
        one_pass(node, n, f"news.peer.{rng.randrange(4)}")
        if time.monotonic() >= deadline:
            return
        time.sleep(rng.uniform(0.05, 0.2))


def one_pass(node: zmqmesh.Node, n: int, topic: str) -> None:
    """Each pattern once (a call that fails, e.g. as the long-lived node is busy, is let go)."""
    for call in (
        lambda: node.request("hub.echo", {"n": n}, timeout=5),
        lambda: node.submit("hub.echo", {"n": n}, timeout=5).result(timeout=6),
        lambda: node.request_many("hub.echo", [n, n + 1, n + 2], timeout=5),
        lambda: node.push("jobs", {"n": n}, timeout=5),
        lambda: node.push("orders", {"n": n}, timeout=5),
        lambda: node.push("orders", {"n": n, "durable": True}, durable=True),
        lambda: node.push("kept", {"n": n}, durable=True),
        lambda: node.publish(topic, {"n": n}),
    ):
        try:
            call()
        except zmqmesh.ZmqMeshError:
            pass


def one_round(mesh: dict[str, Any], k: int, stay_s: float, rng: random.Random, serial: int, tmp: str) -> None:
    """``k`` peers join, work side by side for ``stay_s`` seconds, stop politely."""
    stores = [tempfile.mkdtemp(prefix="peer-", dir=tmp) for _ in range(k)]
    nodes: list[zmqmesh.Node] = []
    try:
        for i, store in enumerate(stores):
            nodes.append(make_peer(mesh, store, serial * 100 + i, drains_kept=(i == 0)))
        say("ROUND " + " ".join(n.id for n in nodes))
        workers = [threading.Thread(target=use_everything, args=(n, random.Random(rng.random()), stay_s),
                                    daemon=True) for n in nodes]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=stay_s + 60)
    finally:
        for node in nodes:
            node.stop(timeout=3)
        for store in stores:
            shutil.rmtree(store, ignore_errors=True)
    say(f"LEFT {len(nodes)}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    rng = random.Random(spec["seed"])
    for serial in range(spec["rounds"]):
        one_round(spec["mesh"], spec["nodes"], spec["stay_s"], rng, serial, spec["tmp"])
    say("DONE")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        say(f"ERROR {type(exc).__name__}: {exc}")
        raise
