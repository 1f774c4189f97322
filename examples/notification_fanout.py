"""Notification fan-out: one event, many subscribers, each doing its own job with it.

An account service publishes "events.user.signup"; email, sms, analytics and audit
processes each subscribe and react. The publisher waits until all four subscriptions
are in place, so the event cannot be lost to the slow-joiner problem.

Then the durable way, for notifications that must not be lost while a channel is down:
the account service pushes each event durably to one queue per channel
("notify.email", ...); every channel pulls its queue at-least-once. The sms worker is
killed (SIGKILL) mid-stream and started again: its notifications wait in the account
service's store meanwhile, and every channel ends with every event (the restarted one
may handle a few twice: what it had not acknowledged when it died comes again).
Run: python examples/notification_fanout.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
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


def durable_channel(name: str, mesh: str, log_dir: str, stop: Any) -> None:
    """Pull ``notify.<name>`` at-least-once; note each event handled in a file (once per id)."""
    node = zmqmesh.Node(name, mesh=mesh)
    path = os.path.join(log_dir, name)

    @node.pull(f"notify.{name}", at_least_once=True)
    def notify(msg: zmqmesh.Message) -> None:
        with open(path, "a") as f:
            f.write(f"{msg.data['event']}\n")

    with node:
        while not stop.is_set():  # polled: a killed sibling must not leave us waiting
            time.sleep(0.05)


def durable_fanout(events: int = 300) -> None:
    ctx = mp.get_context("spawn")
    mesh = f"{MESH}-durable"
    log_dir = tempfile.mkdtemp(prefix="zmqmesh-fanout-")
    stops = {name: ctx.Event() for name in CHANNELS}

    def start(name: str) -> Any:
        proc = ctx.Process(target=durable_channel, args=(name, mesh, log_dir, stops[name]))
        proc.start()
        return proc

    procs = {name: start(name) for name in CHANNELS}
    with zmqmesh.Node("accounts", mesh=mesh, store=os.path.join(log_dir, "store")) as node:
        for name in CHANNELS:
            node.wait_for_pullers(f"notify.{name}", timeout=30)
        for i in range(events):
            for name in CHANNELS:
                node.push(f"notify.{name}", {"event": i}, durable=True)
            if i == events // 3:
                os.kill(procs["sms"].pid, signal.SIGKILL)  # the sms worker crashes
                procs["sms"].join(10)
                print(" accounts: sms worker killed; its notifications wait in the store", flush=True)
            if i == 2 * events // 3:
                procs["sms"] = start("sms")
                print(" accounts: sms worker started again", flush=True)

        def handled(name: str) -> set[int]:
            path = os.path.join(log_dir, name)
            return {int(line) for line in open(path)} if os.path.exists(path) else set()

        deadline = time.monotonic() + 30
        while any(len(handled(n)) < events for n in CHANNELS) and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = {name: len(handled(name)) for name in CHANNELS}
    for stop in stops.values():
        stop.set()
    for proc in procs.values():
        proc.join(10)
    if any(count != events for count in counts.values()):
        raise SystemExit(f"notifications missing: {counts} of {events}; the logs and the store are in {log_dir}")
    shutil.rmtree(log_dir, ignore_errors=True)
    print(f" accounts: {events} events reached every channel durably, the restarted sms worker included: {counts}")


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
    durable_fanout()


if __name__ == "__main__":
    main()
