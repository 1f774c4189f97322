"""A publisher that keeps its topics, or a durable subscriber, in its own process (killed
at will) for the replay tests.

    python replay_process.py publisher STORE MESH PORT TOTAL RATE
        publish TOTAL messages {"n": i} on the topics app.0 .. app.2 (round robin), RATE
        per second, keeping them (history=), then print "published" and wait
    python replay_process.py subscriber STORE MESH PORT OUT [HANDLER_S [REPLAY]]
        subscribe to "app." with replay=REPLAY ("all", the default, "new" or seconds) and
        durable_name="collector"; append "<topic> <n> <redelivered 0|1> <gap>" per
        message to OUT (then take HANDLER_S seconds, default 0)

    python replay_process.py bursting_publisher STORE MESH PORT TOTAL
        keep "logs." (history=) with a send high-water mark of 5; once a peer is present
        and a line comes on stdin, publish TOTAL messages {"n": i, "pad": 1000 bytes} on
        logs.a at once, then print "published" and wait

All print "ready" once started and run until killed or their stdin closes.
"""

from __future__ import annotations

import os
import sys
import time

import zmqmesh


def publisher(store: str, mesh: str, port: int, total: int, rate: float) -> None:
    with zmqmesh.Node("publisher", mesh=mesh, beacon_port=port, store=store, history={"app.": 1_000_000}) as node:
        print("ready", flush=True)
        start = time.monotonic()
        for i in range(total):
            node.publish(f"app.{i % 3}", {"n": i})
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0.005:
                time.sleep(ahead)
        print("published", flush=True)
        sys.stdin.read()


def bursting_publisher(store: str, mesh: str, port: int, total: int) -> None:
    with zmqmesh.Node("publisher", mesh=mesh, beacon_port=port, store=store, history={"logs.": 10_000},
                      send_hwm=5) as node:
        print("ready", flush=True)
        node.wait_for_peers(1)
        sys.stdin.readline()
        for i in range(total):
            node.publish("logs.a", {"n": i, "pad": "x" * 1000})
        print("published", flush=True)
        sys.stdin.read()


def subscriber(store: str, mesh: str, port: int, out: str, handler_s: float = 0.0, replay: str | float = "all") -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    node = zmqmesh.Node("subscriber", mesh=mesh, beacon_port=port, store=store)

    @node.subscribe("app.", replay=replay, durable_name="collector")
    def collect(msg: zmqmesh.Message) -> None:
        os.write(fd, f"{msg.topic} {msg.data['n']} {int(msg.redelivered)} {msg.gap}\n".encode())
        if handler_s:
            time.sleep(handler_s)

    with node:
        print("ready", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "publisher":
        publisher(args[0], args[1], int(args[2]), int(args[3]), float(args[4]))
    elif role == "bursting_publisher":
        bursting_publisher(args[0], args[1], int(args[2]), int(args[3]))
    else:
        subscriber(args[0], args[1], int(args[2]), args[3], float(args[4]) if len(args) > 4 else 0.0,
                   "all" if len(args) < 6 or args[5] == "all" else "new" if args[5] == "new" else float(args[5]))
