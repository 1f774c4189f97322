"""One node of the durable soak (``soak_durable.py``), in its own process. Not a benchmark by itself.

Usage (``soak_durable.py`` starts it)::

    python3 _durable_soak_node.py SPEC_JSON

SPEC: ``{"name", "role": "pusher"|"puller"|"keeper", "queue", "options": Node options,
"store": directory or null, "first": the pusher's first number, "rate": messages a second,
"batch": largest push_many, "dedupe": bool, "concurrency": handler_concurrency,
"work_s": seconds a handler takes, "poison_every", "ack_timeout_s", "max_deliveries", "verbose": bool,
"max_life": seconds}``.

* ``pusher`` pushes ``{"p": name, "i": n}`` durably, numbered from ``first``: single
  ``push``es and ``push_many``s of up to ``batch``, paced at ``rate``; it prints the
  numbers whose call returned (committed).
* ``puller`` pulls ``queue`` at least once (``dedupe`` with its store), prints each message
  before its handler returns; the numbers ``n % poison_every == poison_every - 1`` are
  poison: their handler raises, every time.
* ``keeper`` keeps ``queue`` (``Node.keep``) in its store.

Control on stdin, one word a line: ``QUIESCE`` (a pusher stops pushing), ``BURSTSTOP N``
(a pusher pushes N more in one ``push_many`` and stops at once: what is not yet
acknowledged goes to a keeper), ``STOP`` (stop the node cleanly and exit). End of stdin or
SIGTERM also stops it; ``max_life`` bounds the process in any case.

Lines printed, each flushed at once::

    READY <id> <pid>
    PUSHED <first> <end>                 numbers first..end-1 committed (push returned)
    PUSHERR <type> <message>
    H <pusher> <n> <msg id> <redelivered 0|1> <attempts> <sender's name>   before the handler returns
    X <pusher> <n> <msg id> <attempts> <redelivered> <T>   a poison message, before its handler raises
    STATS <json>                         every 2 s: the node's pipeline counters
    QUIESCED <next number>
    STOPPED <json>                       after node.stop(): its stats' pipeline and rejected
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


def burst_asked(control: Control) -> int | None:
    """How many a ``BURSTSTOP N`` line asked to push before the stop (None: no such line)."""
    word, _, arg = (control.ended_by or "").partition(" ")
    return int(arg) if word == "BURSTSTOP" else None


def push_numbered(node: zmqmesh.Node, spec: dict[str, Any], quiesce: threading.Event, nxt: list[int]) -> None:
    """Push until ``quiesce``, paced at spec["rate"]; ``nxt[0]`` is the next number to push."""
    name, queue, rate, batch = spec["name"], spec["queue"], float(spec["rate"]), int(spec["batch"])
    rng = random.Random()
    pace = Pace(rate, quiesce)
    while not quiesce.is_set():
        n = rng.choice((1, rng.randint(1, batch)))
        first = nxt[0]
        items = [{"p": name, "i": i} for i in range(first, first + n)]
        try:
            if n == 1:
                node.push(queue, items[0], durable=True)
            else:
                node.push_many(queue, items, durable=True)
        except zmqmesh.ZmqMeshError as exc:
            say("PUSHERR", type(exc).__name__, str(exc).replace("\n", " ")[:200])
            quiesce.wait(0.5)
            continue
        nxt[0] = first + n
        say("PUSHED", first, first + n)
        pace.after(n)


def build(spec: dict[str, Any]) -> zmqmesh.Node:
    role, queue = spec["role"], spec["queue"]
    node = zmqmesh.Node(spec["name"], store=spec.get("store"), handler_concurrency=int(spec.get("concurrency", 1)),
                        **spec["options"])
    if role == "keeper":
        node.keep(queue)
    elif role == "puller":
        work_s = float(spec.get("work_s", 0.0))
        poison = int(spec.get("poison_every") or 0)

        def handle(msg: zmqmesh.Message) -> None:
            data = msg.data
            if poison and data["i"] % poison == poison - 1:
                say("X", data["p"], data["i"], msg.id, msg.attempts, int(msg.redelivered), repr(time.time()))
                raise RuntimeError("poison")
            via = msg.sender.name if msg.sender is not None else "?"
            say("H", data["p"], data["i"], msg.id, int(msg.redelivered), msg.attempts, via)
            if work_s:
                time.sleep(work_s)

        node.pull(queue, handle, at_least_once=True, dedupe=bool(spec.get("dedupe")),
                  ack_timeout_s=spec.get("ack_timeout_s"), max_deliveries=int(spec.get("max_deliveries", 5)))
    return node


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("verbose"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")
    control = Control(enders=("STOP", "BURSTSTOP"))

    node = build(spec)
    node.start()
    say("READY", node.id, os.getpid())
    nxt = [int(spec.get("first", 0))]
    pushing = None
    if spec["role"] == "pusher":
        pushing = threading.Thread(target=push_numbered, args=(node, spec, control.quiesce, nxt), name="soak-push",
                                   daemon=True)
        pushing.start()

    serve(control, float(spec.get("max_life", 900)),
          lambda: json.dumps(node.stats()["pipeline"], separators=(",", ":")),
          workers=[pushing] if pushing is not None else [], quiesced=lambda: (nxt[0],))
    if pushing is not None:
        burst = burst_asked(control)
        if burst is not None:
            first = nxt[0]
            node.push_many(spec["queue"], [{"p": spec["name"], "i": i} for i in range(first, first + burst)],
                           durable=True)
            say("PUSHED", first, first + burst)
    node.stop(timeout=5.0)
    stats = node.stats()
    say("STOPPED", json.dumps({"pipeline": stats["pipeline"], "rejected": stats.get("rejected", {})},
                              separators=(",", ":"), default=str))
    sys.stdout.flush()
    os._exit(0)  # the stdin reader must not hold the exit


if __name__ == "__main__":
    run_node(main)
