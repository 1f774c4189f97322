"""A small fleet spread over several machines: one program, three roles.

    python3 fleet.py anchor            # host-a: watches the mesh, answers "fleet.status"
    python3 fleet.py worker            # every host: makes thumbnails from the "thumbnails" queue
    python3 fleet.py producer --jobs 60 --workers 6   # host-c: hands out jobs, collects results

The nodes are configured entirely by ZMQMESH_* environment variables, which
``zmqmesh launch host-X.toml`` sets from the file's [mesh] table: the mesh name, the
network interface to join (``ZMQMESH_INTERFACE``) and the seeds (``ZMQMESH_SEEDS``).

Across hosts the three patterns are used as follows:

* push/pull: the producer pushes jobs to "thumbnails" (each job to one worker, on any
  host); workers push results to "results", pulled by the producer;
* pub/sub: the producer publishes "fleet.progress"; the anchor prints it;
* request/reply: the producer asks the anchor for "fleet.status" (who runs where).

Every role stops cleanly on Ctrl-C or SIGTERM (``zmqmesh launch`` sends SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

import zmqmesh
from zmqmesh import StopFlag

STOP = StopFlag()  # (a signal handler raises it: a threading.Event set there can deadlock)


def say(role: str, text: str) -> None:
    print(f"{role}: {text}", flush=True)


def make_node(role: str) -> zmqmesh.Node:
    # No options here on purpose: mesh, interface and seeds come from the launch file.
    return zmqmesh.Node(f"{role}.{os.getpid()}@{socket.gethostname()}")


def address_of(node: zmqmesh.Node) -> str:
    """The address this node advertises (the interface's), from its mailbox endpoint."""
    return node.endpoints["mailbox"].removeprefix("tcp://").rsplit(":", 1)[0]


def anchor() -> None:
    node = make_node("anchor")
    node.on_join(lambda peer: say("anchor", f"+ {peer.name} at {peer.address}"))
    node.on_leave(lambda peer: say("anchor", f"- {peer.name} at {peer.address}"))
    node.subscribe("fleet.progress", lambda msg: say("anchor", f"progress {msg.data['done']}/{msg.data['of']}"))

    @node.service("fleet.status")
    def status(msg: zmqmesh.Message) -> dict[str, list[str]]:
        """Which nodes run on which address, this one included."""
        fleet: dict[str, list[str]] = {address_of(node): [node.name]}
        for peer in node.peers():
            fleet.setdefault(peer.address, []).append(peer.name)
        return {address: sorted(names) for address, names in sorted(fleet.items())}

    with node:
        say("anchor", f"ready, mailbox {node.endpoints['mailbox']} (other sites can use it as a seed)")
        STOP.wait()


def worker() -> None:
    node = make_node("worker")

    @node.pull("thumbnails")
    def thumbnail(msg: zmqmesh.Message) -> None:
        width, height = msg.data["size"]
        time.sleep(0.01)  # the "work"
        node.push("results", {"job": msg.data["job"], "size": [width // 4, height // 4], "by": node.name,
                              "at": address_of(node)})

    with node:
        say("worker", f"ready at {address_of(node)}")
        STOP.wait()


def producer(jobs: int, workers: int, timeout: float) -> int:
    node = make_node("producer")
    results: dict[int, dict[str, Any]] = {}
    all_done = threading.Event()
    lock = threading.Lock()

    @node.pull("results")
    def collect(msg: zmqmesh.Message) -> None:
        with lock:
            results[msg.data["job"]] = msg.data
            if len(results) == jobs:
                all_done.set()

    with node:
        say("producer", f"waiting for {workers} workers and the anchor")
        try:
            node.wait_for_pullers("thumbnails", workers, timeout=timeout)
            node.wait_for_service("fleet.status", 1, timeout=timeout)
            node.wait_for_subscribers("fleet.progress", 1, timeout=timeout)
        except zmqmesh.ZmqMeshError as exc:
            say("producer", f"gave up after {timeout:.0f} s: {exc} (is the seed right? see README.md)")
            return 1
        for job in range(jobs):
            node.push("thumbnails", {"job": job, "size": [4000, 3000]})
        while not all_done.wait(0.5):
            with lock:
                node.publish("fleet.progress", {"done": len(results), "of": jobs})
            if STOP.is_set():
                return 1
        node.publish("fleet.progress", {"done": jobs, "of": jobs})
        by_host = Counter(r["at"] for r in results.values())
        by_worker = {r["by"] + " at " + r["at"] for r in results.values()}
        spread = ", ".join(f"{address}={count}" for address, count in sorted(by_host.items()))
        say("producer", f"{jobs} jobs done by {len(by_worker)} workers on {len(by_host)} hosts: {spread}")
        fleet = node.request("fleet.status", timeout=10)
        for address, names in fleet.items():
            say("producer", f"  {address}: {', '.join(names)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="A fleet of nodes across machines.")
    parser.add_argument("role", choices=["anchor", "worker", "producer"])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=6, help="producer: workers to wait for")
    parser.add_argument("--timeout", type=float, default=60.0, help="producer: how long to wait for them")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, STOP.set)
    if args.role == "anchor":
        anchor()
    elif args.role == "worker":
        worker()
    else:
        return producer(args.jobs, args.workers, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
