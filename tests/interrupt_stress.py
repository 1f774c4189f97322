"""Ctrl-C stress: a KeyboardInterrupt in the main thread at random moments while a caller
node (in this process, on loopback) makes one kind of call in a loop to a provider node
(beside it), then checks the caller: later calls work, stop() is prompt, its tables are
back to idle, its request counters add up, no accepted message was lost.

Usage: python3 tests/interrupt_stress.py CALL [N [MAX_DELAY_S]]
CALL: request, submit, request_many, push, push_many, publish, wait, durable,
durable_many, startstop. A thread sends SIGINT to the main thread every 0 to MAX_DELAY_S
(default 0.002); the handler raises KeyboardInterrupt only while a call runs. Caller
options as JSON in KBI_OPTS (e.g. '{"send_queue_max": 2}' makes pushes wait for room).
Prints how often the calls were interrupted, where (the innermost zmqmesh frame),
interrupts lost in finalizers, then OK or the problems found. Not a test: a tool.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any

from helpers import free_udp_port

import zmqmesh

CALL = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
MAX_DELAY = float(sys.argv[3]) if len(sys.argv) > 3 else 0.002
MAIN = threading.main_thread().ident
armed = [False]
landed: collections.Counter[str] = collections.Counter()
lost_in_finalizer = [0]


def handler(signum: int, frame: Any) -> None:
    if armed[0]:
        armed[0] = False
        raise KeyboardInterrupt


def where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "zmqmesh" in f.filename]
    if not frames:
        return "(harness)"
    f = frames[-1]
    return f"{f.filename.split('zmqmesh/')[-1]}:{f.lineno} {f.name}"


def unraisable(u: Any) -> None:
    lost_in_finalizer[0] += 1
    landed[f"FINALIZER {u.object!r:.60}"] += 1


sys.unraisablehook = unraisable


class Interrupter(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.go = threading.Event()
        self.done = False

    def run(self) -> None:
        while not self.done:
            time.sleep(random.uniform(0, MAX_DELAY))
            signal.pthread_kill(MAIN, signal.SIGINT)


def main() -> None:
    mesh = {"beacon_port": free_udp_port(), "mesh": f"kbi-{uuid.uuid4().hex[:8]}",
            "heartbeat_interval_s": 0.5, "peer_timeout_s": 2.0}
    store = tempfile.mkdtemp(prefix="interrupt-stress-store-")
    got: collections.Counter[str] = collections.Counter()
    provider = zmqmesh.Node("provider", **mesh)
    provider.service("echo", lambda m: m.data)
    provider.pull("q", lambda m: got.update(["q"]))
    provider.pull("dq", lambda m: got.update(["dq"]), at_least_once=True)
    provider.subscribe("t", lambda m: got.update(["t"]))
    provider.start()
    opts = dict(mesh)
    opts.update(json.loads(os.environ.get("KBI_OPTS", "{}")))
    if CALL.startswith("durable"):
        opts["store"] = store
    caller = zmqmesh.Node("caller", **opts).start()
    caller.wait_for_service("echo", timeout=10)
    caller.wait_for_pullers("q", timeout=10)
    caller.wait_for_pullers("dq", timeout=10)
    caller.wait_for_subscribers("t", 1, timeout=10)
    signal.signal(signal.SIGINT, handler)
    itr = Interrupter()
    itr.start()
    ok = interrupted = 0
    futures: list[Any] = []
    errors: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    for i in range(N):
        armed[0] = True
        try:
            if CALL == "request":
                caller.request("echo", i, timeout=10)
            elif CALL == "submit":
                futures.append(caller.submit("echo", i, timeout=10))
            elif CALL == "request_many":
                caller.request_many("echo", [i, i, i], timeout=10)
            elif CALL == "push":
                caller.push("q", i, timeout=10)
            elif CALL == "push_many":
                caller.push_many("q", [i, i, i], timeout=10)
            elif CALL == "publish":
                caller.publish("t", i)
            elif CALL == "wait":
                caller.wait_for_service("echo", timeout=10)
                caller.wait_for_peers(1, timeout=10)
            elif CALL == "durable":
                caller.push("dq", i, durable=True)
            elif CALL == "durable_many":
                caller.push_many("dq", [i, i, i], durable=True)
            elif CALL == "stats":
                caller.stats()
            armed[0] = False
            ok += 1
        except KeyboardInterrupt as exc:
            armed[0] = False
            interrupted += 1
            landed[where(exc)] += 1
        except zmqmesh.ZmqMeshError as exc:
            armed[0] = False
            errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        finally:
            armed[0] = False
    itr.done = True
    if errors:
        print("ERRORS in the loop:", dict(errors), flush=True)
    itr.join()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"{CALL}: {N} calls, {ok} completed, {interrupted} interrupted, {lost_in_finalizer[0]} in finalizers, "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    for w, n in landed.most_common(40):
        print(f"  {n:5d} {w}", flush=True)
    # checks
    problems = []
    t = time.monotonic()
    try:
        assert caller.request("echo", "x", timeout=5) == "x"
    except Exception as exc:
        problems.append(f"request after: {exc!r}")
    print(f"  request after: {time.monotonic() - t:.3f} s", flush=True)
    t = time.monotonic()
    try:
        f = caller.submit("echo", "y", timeout=5)
        assert f.result(6) == "y"
    except Exception as exc:
        problems.append(f"submit after: {exc!r}")
    print(f"  submit after: {time.monotonic() - t:.3f} s", flush=True)
    try:
        caller.push("q", -1, timeout=5)
        caller.publish("t", -1)
        caller.request_many("echo", [1, 2, 3], timeout=5)
    except Exception as exc:
        problems.append(f"push/publish/request_many after: {exc!r}")
    undone = 0
    for f in futures:
        try:
            f.result(15)
        except Exception as exc:
            undone += 1
            if undone < 3:
                problems.append(f"a submitted future failed: {exc!r}")
    engine = caller._engine
    reqs = engine.requests
    sub = reqs._submitter
    time.sleep(1.0)
    state = {
        "waiters": len(engine.waiters._entries),
        "long_timers": sum(1 for tm in engine.loop._timers if not tm[2].cancelled() and tm[0] - engine.loop.time() > 60),
        "push_queues": {k: len(v) for k, v in engine.pusher.queues.items()},
        "pusher.held": engine.pusher.held,
        "submit_in_flight": sub._in_flight() if sub is not None else None,
        "submit_inflight": len(sub._pipelined) if sub is not None else None,
        "requester_pipelined": [len(r._pipelined) for r in reqs._all if r._pipelined is not None],
        "requester_in_use_free": [r.in_use.acquire(blocking=False) and (r.in_use.release() or True) for r in reqs._all],
        "gauges": engine.counters()["gauges"],
    }
    print("  state:", state, flush=True)
    st = caller.stats()
    r = st["request"]
    print("  request counts:", {k: r.get(k) for k in ("sent", "received", "errors", "abandoned", "dropped")},
          "provider's service received:", provider.stats()["service"].get("received"), flush=True)
    if r.get("sent", 0) != r.get("received", 0) + r.get("errors", 0) + r.get("abandoned", 0):
        problems.append(f"request counts do not add up: {r}")
    if sub is not None and sub._in_flight() != 0:
        problems.append(f"submit room leaked: {sub._in_flight()}")
    if state["waiters"] or state["long_timers"]:
        problems.append(f"waiters/timers left: {state['waiters']}, {state['long_timers']}")
    if not all(state["requester_in_use_free"]):
        problems.append("a requester's in_use is held")
    time.sleep(1.0)
    pushed_ok = {"push": ok, "push_many": 3 * ok, "durable": ok, "durable_many": 3 * ok, "publish": ok}.get(CALL)
    key = {"push": "q", "push_many": "q", "durable": "dq", "durable_many": "dq", "publish": "t"}.get(CALL)
    if key is not None:
        extra = 0 if CALL.startswith("durable") else 1
        if CALL.startswith("durable"):
            deadline = time.monotonic() + 20
            while got[key] < ok and time.monotonic() < deadline:
                time.sleep(0.2)
        received = got[key] - extra
        upper = pushed_ok + interrupted * (3 if CALL.endswith("_many") else 1)
        print(f"  {key}: received {received}, returned {pushed_ok}, at most {upper}", flush=True)
        if received < pushed_ok or received > upper:
            problems.append(f"{key}: received {received} of {pushed_ok} returned (at most {upper})")
        print("  caller pipeline/pubsub stats:", st.get("pipeline"), st.get("pubsub"), flush=True)
    t = time.monotonic()
    caller.stop()
    stop_s = time.monotonic() - t
    print(f"  stop: {stop_s:.3f} s", flush=True)
    if stop_s > 3:
        problems.append(f"stop took {stop_s:.1f} s")
    provider.stop()
    left = caller._engine.durable is not None and stored_rows(store)
    if left:
        problems.append(f"{left} message(s) left in the store")
    shutil.rmtree(store, ignore_errors=True)
    print("PROBLEMS:" if problems else "OK", *problems, sep="\n  ", flush=True)


def stored_rows(store: str) -> int:
    import sqlite3

    db = sqlite3.connect(f"{store}/zmqmesh.db")
    try:
        return int(db.execute("SELECT coalesce(sum(count), 0) FROM outbox").fetchone()[0])
    finally:
        db.close()


def startstop() -> None:
    mesh = {"beacon_port": free_udp_port(), "mesh": f"kbi-{uuid.uuid4().hex[:8]}",
            "heartbeat_interval_s": 0.5, "peer_timeout_s": 2.0}
    signal.signal(signal.SIGINT, handler)
    itr = Interrupter()
    itr.start()
    interrupted = 0
    slow = []
    for i in range(N):
        node = zmqmesh.Node(f"n{i}", **mesh)
        armed[0] = True
        try:
            node.start()
            time.sleep(random.uniform(0, 0.003))
            node.stop()
            armed[0] = False
        except KeyboardInterrupt as exc:
            armed[0] = False
            interrupted += 1
            landed[where(exc)] += 1
        armed[0] = False
        t = time.monotonic()
        node.stop()
        if time.monotonic() - t > 3:
            slow.append(time.monotonic() - t)
        if node._thread is not None:
            end = time.monotonic() + 5
            while node._thread.is_alive() and time.monotonic() < end:
                time.sleep(0.01)
            if node._thread.is_alive():
                slow.append(("io thread alive", i))
    itr.done = True
    itr.join()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"startstop: {N}, {interrupted} interrupted, {lost_in_finalizer[0]} in finalizers, slow: {slow[:5]}")
    for w, n in landed.most_common(40):
        print(f"  {n:5d} {w}")
    alive = [t.name for t in threading.enumerate() if t.name.startswith("zmqmesh")]
    print("threads left:", len(alive), alive[:10])


if __name__ == "__main__":
    if CALL == "startstop":
        startstop()
    else:
        main()
