"""Notification fan-out: one event, many subscribers, each doing its own job with it.

An account service publishes "events.user.signup"; email, sms, analytics and audit
processes each subscribe and react. The publisher waits until all four subscriptions
are in place, so the event cannot be lost to the slow-joiner problem.
Run: python examples/notification_fanout.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from typing import Any

import zmqmesh

MESH = f"fanout-{os.getpid()}"
CHANNELS = {
    "email": lambda e: f"sent welcome mail to {e['email']}",
    "sms": lambda e: f"texted {e['phone']}",
    "analytics": lambda e: f"counted a signup from {e['country']}",
    "audit": lambda e: f"recorded user {e['user']} created",
}


def channel(name: str, mesh: str, done: Any) -> None:
    node = zmqmesh.Node(name, mesh=mesh)

    @node.subscribe("events.user.")
    def react(msg: zmqmesh.Message) -> None:
        print(f"{name:>9}: {msg.topic} -> {CHANNELS[name](msg.data)}", flush=True)
        node.push("acks", name)  # tell the publisher this channel handled it

    with node:
        done.wait(30)


def main() -> None:
    ctx = mp.get_context("spawn")
    dones = {name: ctx.Event() for name in CHANNELS}
    procs = [ctx.Process(target=channel, args=(name, MESH, dones[name])) for name in CHANNELS]
    for p in procs:
        p.start()
    acks: list[str] = []
    all_acked = threading.Event()
    node = zmqmesh.Node("accounts", mesh=MESH)

    @node.pull("acks")
    def ack(msg: zmqmesh.Message) -> None:
        acks.append(msg.data)
        if len(acks) == len(CHANNELS):
            all_acked.set()

    with node:
        node.wait_for_subscribers("events.user.signup", len(CHANNELS), timeout=30)
        event = {"user": "u-42", "email": "ada@example.org", "phone": "+44 20 0000", "country": "UK"}
        print(f" accounts: publish events.user.signup {event}", flush=True)
        node.publish("events.user.signup", event)
        if not all_acked.wait(10):
            raise SystemExit(f"only {sorted(acks)} handled the event")
        sent = node.stats()["pubsub"]["sent"]
    for done in dones.values():
        done.set()
    for p in procs:
        p.join(10)
    print(f" accounts: published {sent} event; handled by {sorted(acks)}")


if __name__ == "__main__":
    main()
