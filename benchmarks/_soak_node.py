"""One node of the soak test (``soak.py``), in its own process. Not a benchmark by itself.

Usage (``soak.py`` starts it)::

    python3 _soak_node.py SPEC_JSON

SPEC: ``{"name", "role": "core"|"victim", "nodes": mesh size, "options": Node options,
"rates": {"pub", "work", "aq", "echo", "lookup"} per second, "max_life": seconds}``.

Every node subscribes to ``soak.``, pulls the plain queue ``work`` and the at-least-once
queue ``aq``, offers the service ``echo`` and the idempotent service ``lookup``, and once
the mesh is complete it publishes on ``soak.<name>``, pushes to ``work``, calls both
services and (``core`` nodes only) pushes to ``aq``. Only nodes that are never killed push
to ``aq``: the pusher holds what it has not had acknowledged, so messages held by a pusher
that is SIGKILLed are lost by design; the guarantee under test is the puller's side.

Control on stdin, one word a line: ``QUIESCE`` (stop the traffic, print totals), ``STOP``
(stop the node cleanly and exit). End of stdin or SIGTERM also stops it; ``max_life``
bounds the process in any case.

Lines printed, each flushed at once (``T`` is wall-clock ``time.time()``)::

    BOOT <id> <pid>               before start()
    READY <id> <T>                start() returned
    WAITED <T> <json>             the mesh is complete (or the waits timed out: json says)
    TRAFFIC <T>                   traffic threads started
    JOIN <name> <id> <T>          on_join
    LEAVE <name> <id> <T>         on_leave
    AQ <pusher> <seq> <redelivered 0|1>   an at-least-once message handled (before its ack)
    REQERR <service> <type> <T> <message>
    PUSHERR <queue> <type> <T>
    STATS <T> <json>              once a second: node.stats() and this process's counters
    QUIESCED <T> <json>           traffic stopped: final totals of what was sent
    FINAL <T> <json>              after node.stop(): counters and per-publisher pub/sub detail
    STOPPED <T>
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from _soak_common import Control, Pace, run_node, say, serve

import zmqmesh


def now() -> str:
    return repr(time.time())


class Counters:
    """What this process did, beyond node.stats(); written under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.published = 0
        self.pushed = {"work": 0, "aq": 0}
        self.push_errors = {"work": 0, "aq": 0}
        self.req_ok = {"echo": 0, "lookup": 0}
        self.req_err: dict[str, dict[str, int]] = {"echo": {}, "lookup": {}}
        self.handled = {"work": 0, "aq": 0, "aq_redelivered": 0, "echo": 0, "lookup": 0}
        # pub/sub as seen here, per publisher instance: [name, first seq, last seq, count, gaps, disorder]
        self.subs: dict[str, list] = {}
        self.sub_received = 0

    def totals(self) -> dict:
        with self.lock:
            gaps = sum(v[4] for v in self.subs.values())
            disorder = sum(v[5] for v in self.subs.values())
            return {
                "published": self.published,
                "pushed": dict(self.pushed),
                "push_errors": dict(self.push_errors),
                "req_ok": dict(self.req_ok),
                "req_err": {k: dict(v) for k, v in self.req_err.items()},
                "handled": dict(self.handled),
                "sub_received": self.sub_received,
                "sub_gaps": gaps,
                "sub_disorder": disorder,
            }


def paced(rate: float, quiesce: threading.Event, step) -> None:
    """Call ``step(i)`` ``rate`` times a second until ``quiesce``; never bursts to catch up."""
    if rate <= 0:
        return
    pace = Pace(rate, quiesce)
    i = 0
    while not quiesce.is_set():
        step(i)
        i += 1
        pace.after()


def main() -> None:
    spec = json.loads(sys.argv[1])
    name: str = spec["name"]
    role: str = spec["role"]
    nodes: int = int(spec["nodes"])
    rates: dict = spec["rates"]
    max_life = float(spec.get("max_life", 600))

    control = Control()
    stop, quiesce = control.stop, control.quiesce

    counters = Counters()
    node = zmqmesh.Node(name, **spec["options"])
    my_id = node.id

    def on_sub(msg: zmqmesh.Message) -> None:
        data = msg.data
        src, i = data["s"], data["i"]
        with counters.lock:
            counters.sub_received += 1
            track = counters.subs.get(src)
            if track is None:
                counters.subs[src] = [data["n"], i, i, 1, 0, 0]
                return
            if i == track[2] + 1:
                pass
            elif i > track[2] + 1:
                track[4] += i - track[2] - 1
            else:
                track[5] += 1
            track[2] = max(track[2], i)
            track[3] += 1

    def on_work(msg: zmqmesh.Message) -> None:
        with counters.lock:
            counters.handled["work"] += 1

    def on_aq(msg: zmqmesh.Message) -> None:
        data = msg.data
        say("AQ", data["p"], data["i"], int(msg.redelivered))  # printed (and flushed) before the ack
        with counters.lock:
            counters.handled["aq"] += 1
            counters.handled["aq_redelivered"] += int(msg.redelivered)

    def on_echo(msg: zmqmesh.Message) -> object:
        with counters.lock:
            counters.handled["echo"] += 1
        return {"echo": msg.data, "by": name}

    def on_lookup(msg: zmqmesh.Message) -> object:
        with counters.lock:
            counters.handled["lookup"] += 1
        return {"key": msg.data, "by": name}

    node.subscribe("soak.", on_sub)
    node.pull("work", on_work)
    node.pull("aq", on_aq, at_least_once=True)
    node.service("echo", on_echo)
    node.service("lookup", on_lookup, idempotent=True)
    node.on_join(lambda peer: say("JOIN", peer.name, peer.id, now()))
    node.on_leave(lambda peer: say("LEAVE", peer.name, peer.id, now()))

    say("BOOT", my_id, os.getpid())
    node.start()
    say("READY", my_id, now())

    # wait for the whole mesh before sending anything (no slow-joiner loss to explain away)
    topic = f"soak.{name}"
    waits = {}
    for what, fn in (
        ("peers", lambda t: node.wait_for_peers(nodes - 1, t)),
        ("aq", lambda t: node.wait_for_pullers("aq", nodes, t)),
        ("work", lambda t: node.wait_for_pullers("work", nodes, t)),
        ("echo", lambda t: node.wait_for_service("echo", nodes, t)),
        ("lookup", lambda t: node.wait_for_service("lookup", nodes, t)),
        ("subscribers", lambda t: node.wait_for_subscribers(topic, nodes, t)),
    ):
        try:
            fn(30.0)
            waits[what] = "ok"
        except zmqmesh.ZmqMeshError as exc:
            waits[what] = f"{type(exc).__name__}: {exc}"
        if stop.is_set():
            break
    say("WAITED", now(), json.dumps(waits, separators=(",", ":")))

    def publish(i: int) -> None:
        node.publish(topic, {"n": name, "s": my_id, "i": i, "t": time.time()})
        with counters.lock:
            counters.published += 1

    def pusher(queue: str):
        seq = [0]

        def step(_i: int) -> None:
            try:
                node.push(queue, {"p": name, "i": seq[0], "pad": "x" * 64}, timeout=5.0)
            except zmqmesh.ZmqMeshError as exc:  # not queued: the same seq is tried next time
                with counters.lock:
                    counters.push_errors[queue] += 1
                say("PUSHERR", queue, type(exc).__name__, now())
                return
            seq[0] += 1
            with counters.lock:
                counters.pushed[queue] = seq[0]

        return step

    def requester(service: str):
        def step(i: int) -> None:
            try:
                reply = node.request(service, i, timeout=5.0)
                ok = isinstance(reply, dict) and reply.get("echo", reply.get("key")) == i
                kind = None if ok else "WrongReply"
            except zmqmesh.ZmqMeshError as exc:
                kind, reply = type(exc).__name__, exc
            with counters.lock:
                if kind is None:
                    counters.req_ok[service] += 1
                else:
                    errs = counters.req_err[service]
                    errs[kind] = errs.get(kind, 0) + 1
            if kind is not None:
                say("REQERR", service, kind, now(), str(reply).replace("\n", " ")[:200])

        return step

    threads = [
        threading.Thread(target=paced, args=(rates["pub"], quiesce, publish), name="soak-pub", daemon=True),
        threading.Thread(target=paced, args=(rates["work"], quiesce, pusher("work")), name="soak-work", daemon=True),
        threading.Thread(target=paced, args=(rates["echo"], quiesce, requester("echo")), name="soak-echo", daemon=True),
        threading.Thread(target=paced, args=(rates["lookup"], quiesce, requester("lookup")), name="soak-lookup", daemon=True),
    ]
    if role == "core":
        threads.append(threading.Thread(target=paced, args=(rates["aq"], quiesce, pusher("aq")), name="soak-aq", daemon=True))
    if not quiesce.is_set():
        for t in threads:
            t.start()
        say("TRAFFIC", now())

    def stats_line() -> str:
        s = node.stats()
        keep = {k: s[k] for k in ("pubsub", "pipeline", "request", "service")}
        keep["rejected"] = s.get("rejected", {})
        keep["mine"] = counters.totals()
        return json.dumps(keep, separators=(",", ":"))

    def quiesced() -> tuple[str]:
        alive = [t.name for t in threads if t.is_alive()]
        return (json.dumps({**counters.totals(), "alive": alive}, separators=(",", ":")),)

    # a push or request in progress ends within its 5 s timeout
    serve(control, max_life, stats_line, workers=threads, quiesced=quiesced, stats_every_s=1.0, join_s=12.0,
          stamp=lambda: (now(),))
    node.stop(timeout=5.0)
    with counters.lock:
        detail = {src: list(v) for src, v in counters.subs.items()}
    final = json.loads(stats_line())
    final["subs"] = detail
    say("FINAL", now(), json.dumps(final, separators=(",", ":")))
    say("STOPPED", now())
    sys.stdout.flush()
    os._exit(0)  # daemon threads and the stdin reader must not hold the exit


if __name__ == "__main__":
    run_node(main)
