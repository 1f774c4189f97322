#!/usr/bin/env python3
"""Throughput, latency and memory of zmqmesh against raw pyzmq doing the same job.

    python3 benchmarks/bench.py                         # everything (~2-3 min on an idle 2-core box)
    python3 benchmarks/bench.py --quick                 # smaller counts (~1 min)
    python3 benchmarks/bench.py --only push_sync,req_sync --repeats 5
    python3 benchmarks/bench.py --list                  # the scenarios
    python3 benchmarks/bench.py --json out.jsonl        # also write the JSON lines to a file
    python3 benchmarks/bench.py --wait-quiet 60         # on a shared box: wait for other load to pass
    python3 benchmarks/bench.py --only push_sync --py-spy /tmp/prof   # where zmqmesh's time goes

Every figure is measured ``--repeats`` times (at least 3), zmqmesh and raw pyzmq
alternating within each repeat, each run in fresh processes (sender and receiver are
separate processes, started with multiprocessing "spawn"). The table gives the median and
min-max of each, and zmqmesh/raw (ratio of the medians; in brackets the range of the
per-repeat paired ratios). One JSON line per figure follows the table.

How things are measured (identically for zmqmesh and raw):

* push/pull throughput: after a warm-up the receiver has acknowledged, the sender notes
  ``t0 = time.monotonic()`` and sends N messages; the receiver notes the time the N-th
  was handled. rate = N / (t_done - t0). Both are CLOCK_MONOTONIC, which every process
  on the host shares; this is measured at the receiver, so a zmqmesh ``push`` that
  returns once queued gains nothing.
* request latency: the client times each call; median and p99 of the calls of a run.
  In-flight throughput: calls / wall time of the whole run at the client.
* pub/sub: publisher ``t0`` to the last subscriber's arrival of the end marker (sent
  after the data, on another topic, repeated every ms until all have it); delivered =
  the data messages counted by all subscribers.
* memory: peak RSS (VmHWM) of each process at the end of the run.

Each run also records how much of the machine's CPU other processes used meanwhile
(/proc/stat minus this benchmark's own processes); figures taken on a busy machine are
marked NOISY. Sanity checks: the last message a receiver handled must be the last one
sent, and echo replies must match their request; a run that fails them fails.

Everything is on 127.0.0.1; each zmqmesh run gets its own free UDP beacon port and mesh
name. Every run has a deadline; children are stopped, then killed, in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _bench_proc import Trial, TrialError, free_udp_port

# ============================================================================ parameters ==

FULL = {
    "push_n": 1_000_000,
    "push_warm": 2_000,
    "n_64k": 60_000,
    "n_1m": 3_000,
    "req_n": 5_000,
    "req_warm": 300,
    "inflight_n": 50_000,
    "window": 64,
    "pub_n": 300_000,
    "burst_n": 1_000_000,
    "outstanding_n": 10_000,
    "slow_first_s": 1.0,
    "timeout": 60.0,
}
QUICK = {
    **FULL,
    "push_n": 40_000,
    "push_warm": 1_000,
    "n_64k": 2_000,
    "n_1m": 200,
    "req_n": 1_000,
    "req_warm": 100,
    "inflight_n": 4_000,
    "pub_n": 40_000,
    "burst_n": 200_000,
    "outstanding_n": 10_000,
    "timeout": 30.0,
}

# ============================================================================ trials ==



def mesh_options() -> dict[str, Any]:
    return {"beacon_port": free_udp_port(), "mesh": f"bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"}


def _mib(kb: int) -> float:
    return kb / 1024.0


def trial_push(t: Trial, impl: str, mode: str, n: int, warm: int, size: int = 0, use_async: bool = False,
               hwm: int | None = None, flavor: str = "plain") -> dict[str, Any]:
    """Sender and receiver processes; throughput measured at the receiver (see module doc).

    ``flavor`` (zmqmesh only): ``plain`` push/pull, ``alo`` in-memory at-least-once, or
    ``durable`` pushes committed to the sender's store (a temporary directory), one
    transaction each, or ``durable_batch`` (``push_many`` of 256, one transaction each).
    """
    common: dict[str, Any] = {"mode": mode, "n": n, "warm": warm, "size": size, "flavor": flavor}
    if impl == "raw":
        t.spawn("recv", "raw_pull", **common, hwm=hwm)
        t.spawn("send", "raw_push", **common, hwm=hwm)
    else:
        mesh = mesh_options()
        t.spawn("recv", "zm_pull", **common, **mesh, use_async=use_async)
        t.spawn("send", "zm_push", **common, **mesh, use_async=use_async)
    ready = t.expect("recv", "ready")
    t.tell("send", "go", **ready)
    t.expect("recv", "warm")
    t.tell("send", "warm")
    sent = t.expect("send", "result")
    last = t.expect("recv", "check")["last"]
    got = t.expect("recv", "result")
    # the last message handled must be the last one sent (one sender, one receiver: in order)
    want = {"len": size} if mode == "large" else ({"len": 64} if mode == "bare" else {"id": warm + n - 1})
    if last != want:
        raise TrialError(f"content check failed: the last message handled was {last}, expected {want}")
    elapsed = got["t_done"] - sent["t0"]
    payload = size if mode == "large" else 64
    return {
        "msgs_per_s": n / elapsed,
        "mb_per_s": n * payload / elapsed / 1e6,
        "elapsed_s": elapsed,
        "send_returned_s": sent["t_sent"] - sent["t0"],
        "rss_send_mib": _mib(sent["rss_peak_kb"]),
        "rss_recv_mib": _mib(got["rss_peak_kb"]),
        "rss_send_base_mib": _mib(sent["rss_base_kb"]),
        "rss_recv_base_mib": _mib(got["rss_base_kb"]),
        "recv_stats": got.get("stats"),
    }


def trial_req(t: Trial, impl: str, mode: str, n: int, warm: int, window: int = 1, slow_first_s: float = 0.0) -> dict[str, Any]:
    """An echo service process and a client process; the client measures."""
    if impl == "raw":
        t.spawn("service", "raw_router", slow_first_s=slow_first_s, slow_at=warm)
        t.spawn("client", "raw_req_client", mode=mode, n=n, warm=warm, window=window)
    else:
        mesh = mesh_options()
        t.spawn("service", "zm_service", slow_first_s=slow_first_s, slow_at=warm, **mesh)
        t.spawn("client", "zm_req_client", mode=mode, n=n, warm=warm, window=window, **mesh)
    ready = t.expect("service", "ready")
    t.tell("client", "go", **ready)
    res = t.expect("client", "result")
    t.tell("service", "stop")
    served = t.expect("service", "result")
    out = {k: v for k, v in res.items() if k not in ("rss_peak_kb", "rss_now_kb", "rss_base_kb")}
    out["rss_client_mib"] = _mib(res["rss_peak_kb"])
    out["rss_service_mib"] = _mib(served["rss_peak_kb"])
    if "rss_base_kb" in res:
        out["rss_client_base_mib"] = _mib(res["rss_base_kb"])
    out["rss_service_base_mib"] = _mib(served["rss_base_kb"])
    out["served"] = served["served"]
    return out


def trial_req_clients(t: Trial, impl: str, clients: int, n: int, warm: int, window: int) -> dict[str, Any]:
    """One echo service process and ``clients`` client processes, each with ``window``
    requests in flight (raw DEALERs, or `Node.request_many`): requests per second, all
    clients together, from the first start to the last finish."""
    mode = "inflight" if impl == "raw" else "many"
    if impl == "raw":
        t.spawn("service", "raw_router", slow_first_s=0.0, slow_at=warm)
    else:
        mesh = mesh_options()
        t.spawn("service", "zm_service", slow_first_s=0.0, slow_at=warm, **mesh)
    for k in range(clients):
        if impl == "raw":
            t.spawn(f"client{k}", "raw_req_client", mode=mode, n=n, warm=warm, window=window)
        else:
            t.spawn(f"client{k}", "zm_req_client", mode=mode, n=n, warm=warm, window=window, **mesh)
    ready = t.expect("service", "ready")
    for k in range(clients):
        t.tell(f"client{k}", "go", **ready)
    results = [t.expect(f"client{k}", "result") for k in range(clients)]
    t.tell("service", "stop")
    served = t.expect("service", "result")
    elapsed = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    return {"per_s": clients * n / elapsed, "elapsed_s": elapsed, "served": served["served"],
            "rss_service_mib": _mib(served["rss_peak_kb"])}


def trial_replay(t: Trial, n: int) -> dict[str, Any]:
    """A publisher keeps ``n`` messages nobody received; then a subscriber process with
    ``replay="all"`` gets them all: msgs/s from its first replayed message to the last."""
    mesh = mesh_options()
    t.spawn("pub", "zm_history_pub", n=n, **mesh)
    t.expect("pub", "published")
    t.spawn("sub", "zm_replay_sub", n=n, **mesh)
    got = t.expect("sub", "result")
    t.tell("sub", "stop")
    t.tell("pub", "stop")
    if got["last"] != n - 1:
        raise TrialError(f"content check failed: the last message replayed was {got['last']}, expected {n - 1}")
    elapsed = got["t_last"] - got["t_first"]
    return {"delivered_per_s": (n - 1) / elapsed, "elapsed_s": elapsed, "start_to_last_s": got["t_last"] - got["t0"]}


def _write_bytecode(module: str, statement: str | None = None) -> None:
    """Run ``import <module>`` (or ``statement``) once in a fresh interpreter that may write
    its bytecode cache, as an installed package has it (a stale cache would charge
    compiling to the figures)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", statement or f"import {module}"], env=env, capture_output=True, timeout=60,
                   check=True)


def trial_import(t: Trial, module: str) -> dict[str, Any]:
    """Milliseconds ``import <module>`` takes in a fresh interpreter, as Python reports it
    (``-X importtime``), with the bytecode cache written first, as an installed package has it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, "-X", "importtime", "-c", f"import {module}"]
    _write_bytecode(module)
    report = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True).stderr
    totals = [int(line.split("|")[1]) for line in report.splitlines() if line.split("|")[-1].strip() == module]
    if not totals:
        raise TrialError(f"python -X importtime reported no line for {module}")
    return {"import_ms": totals[-1] / 1000}


def trial_import_timed(t: Trial, module: str, statement: str) -> dict[str, Any]:
    """Milliseconds ``statement`` (imports) takes in a fresh interpreter, timed around it
    there (``-X importtime`` does not report what a module's ``__getattr__`` imports), with
    the bytecode cache written first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    _write_bytecode(module, statement)
    timed = f"import time; t = time.perf_counter(); exec({statement!r}); print((time.perf_counter() - t) * 1000)"
    out = subprocess.run([sys.executable, "-c", timed], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return {"import_ms": float(out.split()[-1])}


def trial_cold(t: Trial, impl: str) -> dict[str, Any]:
    """Milliseconds from spawning a sender process (``python -c``: import, connect or join
    the mesh, send one message) to that message's delivery to a receiver already waiting."""
    from _bench_roles import COLD_SENDERS, QUEUE

    mesh = mesh_options()
    _write_bytecode("zmq") if impl == "raw" else _write_bytecode("zmqmesh", "from zmqmesh import Node")
    t.spawn("receiver", "raw_cold_recv" if impl == "raw" else "zm_cold_recv", **({} if impl == "raw" else mesh))
    ready = t.expect("receiver", "ready")
    args = [ready.get("endpoint", ""), mesh["mesh"], str(mesh["beacon_port"]), QUEUE]
    began = time.time()
    sender = subprocess.run([sys.executable, "-c", COLD_SENDERS[impl], *args], capture_output=True, text=True,
                            timeout=max(t.deadline - time.monotonic(), 1))
    if sender.returncode != 0:
        raise TrialError(f"the sender process failed: {sender.stderr.strip()[-300:]}")
    got = t.expect("receiver", "result")
    t.tell("receiver", "stop")
    return {"cold_ms": (got["at"] - began) * 1000}


def trial_pubsub(t: Trial, impl: str, n: int, nsubs: int, history: bool = False) -> dict[str, Any]:
    """One publisher process and ``nsubs`` subscriber processes (``history``: the publisher
    keeps what it publishes)."""
    names = [f"sub{i}" for i in range(nsubs)]
    if impl == "raw":
        t.spawn("pub", "raw_pub", n=n, nsubs=nsubs)
        for name in names:
            t.spawn(name, "raw_sub")
    else:
        mesh = mesh_options()
        t.spawn("pub", "zm_pub", n=n, nsubs=nsubs, history=history, **mesh)
        for name in names:
            # distinct names: same-named nodes started together on one host evict each other
            # for seconds at start-up (see the report); start-up is not what is measured here
            t.spawn(name, "zm_sub", name=f"bench-{name}", **mesh)
    ready = t.expect("pub", "ready")
    for name in names:
        t.tell(name, "go", **ready)
    for name in names:
        t.expect(name, "ready")
    pub = t.expect("pub", "result")
    subs = [t.expect(name, "result") for name in names]
    t.tell("pub", "stop")
    delivered = sum(s["count"] for s in subs)
    elapsed = max(s["t_end"] for s in subs) - pub["t0"]
    dropped = [s["dropped"] for s in subs]
    return {
        "delivered_per_s": delivered / elapsed,
        "delivered": delivered,
        "lost": n * nsubs - delivered,
        "dropped_stats": None if dropped[0] is None else sum(dropped),
        "elapsed_s": elapsed,
        "publish_returned_s": pub["t_sent"] - pub["t0"],
        "pub_stats": pub.get("stats"),
    }


@dataclass
class Measurement:
    key: str
    run: Callable[[Trial, dict[str, Any]], dict[str, Any]]
    describe: str
    timeout_scale: float = 1.0


def _m(key: str, describe: str, run: Callable[[Trial, dict[str, Any]], dict[str, Any]], scale: float = 1.0) -> Measurement:
    return Measurement(key, run, describe, scale)


MEASUREMENTS: dict[str, Measurement] = {
    m.key: m
    for m in [
        _m("raw_push_msgpack", "pyzmq PUSH/PULL, packb/unpackb per message",
           lambda t, p: trial_push(t, "raw", "msgpack", p["push_n"], p["push_warm"])),
        _m("raw_push_bare", "pyzmq PUSH/PULL, 64 bare bytes",
           lambda t, p: trial_push(t, "raw", "bare", p["push_n"], p["push_warm"])),
        _m("zm_push_sync", "Node.push -> @pull (def)",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"])),
        _m("zm_push_many", "Node.push_many(256 msgs) -> @pull (def)",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"], flavor="many")),
        _m("zm_push_bare", "Node.push 64 bare bytes -> @pull (def)",
           lambda t, p: trial_push(t, "zm", "bare", p["push_n"], p["push_warm"])),
        _m("zm_push_many_bare", "Node.push_many(256 x 64 bare bytes) -> @pull (def)",
           lambda t, p: trial_push(t, "zm", "bare", p["push_n"], p["push_warm"], flavor="many")),
        _m("zm_push_async", "await AsyncNode.push -> @pull (async def)",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"], use_async=True)),
        _m("raw_push_64k", "pyzmq PUSH/PULL 64 KiB, copy=False",
           lambda t, p: trial_push(t, "raw", "large", p["n_64k"], 100, size=64 * 1024)),
        _m("zm_push_64k", "Node.push 64 KiB bytes, pulled zero_copy",
           lambda t, p: trial_push(t, "zm", "large", p["n_64k"], 100, size=64 * 1024)),
        _m("zm_push_32k", "Node.push 32 KiB bytes, pulled zero_copy",
           lambda t, p: trial_push(t, "zm", "large", p["n_64k"], 100, size=32 * 1024)),
        _m("zm_push_alo_32k", "Node.push 32 KiB bytes -> @pull(at_least_once=True), in memory",
           lambda t, p: trial_push(t, "zm", "large", p["n_64k"], 100, size=32 * 1024, flavor="alo")),
        _m("raw_push_1m", "pyzmq PUSH/PULL 1 MiB, copy=False",
           lambda t, p: trial_push(t, "raw", "large", p["n_1m"], 10, size=1024 * 1024)),
        _m("zm_push_1m", "Node.push 1 MiB bytes, pulled zero_copy",
           lambda t, p: trial_push(t, "zm", "large", p["n_1m"], 10, size=1024 * 1024)),
        _m("raw_req_sync", "blocking DEALER -> ROUTER, msgpack",
           lambda t, p: trial_req(t, "raw", "sync_lat", p["req_n"], p["req_warm"])),
        _m("zm_req_sync", "Node.request -> @service (Node)",
           lambda t, p: trial_req(t, "zm", "sync_lat", p["req_n"], p["req_warm"])),
        _m("raw_req_async", "zmq.asyncio DEALER -> blocking ROUTER, msgpack",
           lambda t, p: trial_req(t, "raw", "async_lat", p["req_n"], p["req_warm"])),
        _m("zm_req_async", "await AsyncNode.request -> @service (Node)",
           lambda t, p: trial_req(t, "zm", "async_lat", p["req_n"], p["req_warm"])),
        _m("raw_req_inflight", "blocking DEALER, 64 outstanding",
           lambda t, p: trial_req(t, "raw", "inflight", p["inflight_n"], p["req_warm"], window=p["window"])),
        _m("zm_req_inflight", "AsyncNode, 64 coroutines calling in a loop",
           lambda t, p: trial_req(t, "zm", "inflight", p["inflight_n"], p["req_warm"], window=p["window"])),
        _m("raw_req_coroutines", "zmq.asyncio DEALER, 64 coroutines each awaiting its reply (a future per request)",
           lambda t, p: trial_req(t, "raw", "coroutines", p["inflight_n"], p["req_warm"], window=p["window"])),
        _m("zm_req_many", "Node.request_many, 64 in flight from one thread",
           lambda t, p: trial_req(t, "zm", "many", p["inflight_n"], p["req_warm"], window=p["window"])),
        _m("zm_req_amany", "await AsyncNode.request_many, 64 in flight from one coroutine",
           lambda t, p: trial_req(t, "zm", "amany", p["inflight_n"], p["req_warm"], window=p["window"])),
        _m("raw_req_clients", "3 client processes, each a blocking DEALER with 64 outstanding",
           lambda t, p: trial_req_clients(t, "raw", 3, p["inflight_n"], p["req_warm"], p["window"]), 2.0),
        _m("zm_req_clients", "3 client processes, each Node.request_many with 64 in flight",
           lambda t, p: trial_req_clients(t, "zm", 3, p["inflight_n"], p["req_warm"], p["window"]), 2.0),
        _m("raw_pubsub_1", "XPUB -> 1 SUB process, msgpack",
           lambda t, p: trial_pubsub(t, "raw", p["pub_n"], 1)),
        _m("zm_pubsub_history_1", "Node(history=...).publish -> 1 subscriber process",
           lambda t, p: trial_pubsub(t, "zm", p["pub_n"], 1, history=True)),
        _m("zm_replay", "replay='all' of N kept messages by a late subscriber process",
           lambda t, p: trial_replay(t, p["pub_n"])),
        _m("zm_pubsub_1", "Node.publish -> 1 subscriber process",
           lambda t, p: trial_pubsub(t, "zm", p["pub_n"], 1)),
        _m("raw_pubsub_4", "XPUB -> 4 SUB processes, msgpack",
           lambda t, p: trial_pubsub(t, "raw", p["pub_n"], 4), 1.5),
        _m("zm_pubsub_4", "Node.publish -> 4 subscriber processes",
           lambda t, p: trial_pubsub(t, "zm", p["pub_n"], 4), 1.5),
        _m("zm_push_alo", "Node.push -> @pull(at_least_once=True), in memory",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"], flavor="alo")),
        _m("zm_push_durable", "Node.push(durable=True) -> @pull(at_least_once=True), SQLite WAL NORMAL",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"] // 5, p["push_warm"], flavor="durable")),  # (a commit each: 1 M would take most of a run's deadline)
        _m("zm_push_durable_batch", "Node.push_many(256 msgs, durable=True) -> @pull(at_least_once=True)",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"], flavor="durable_batch")),
        _m("zm_push_alo_tasks", "64 tasks awaiting AsyncNode.push -> @pull(at_least_once=True), in memory",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"], use_async=True,
                                   flavor="alo_tasks")),
        _m("zm_push_durable_tasks", "64 tasks awaiting AsyncNode.push(durable=True) (group commit) -> @pull(at_least_once=True)",
           lambda t, p: trial_push(t, "zm", "msgpack", p["push_n"], p["push_warm"], use_async=True,
                                   flavor="durable_tasks")),
        _m("raw_mem_burst", "pyzmq PUSH/PULL msgpack burst (default HWM)",
           lambda t, p: trial_push(t, "raw", "msgpack", p["burst_n"], p["push_warm"]), 2.0),
        _m("zm_mem_burst", "Node.push burst -> @pull",
           lambda t, p: trial_push(t, "zm", "msgpack", p["burst_n"], p["push_warm"]), 2.0),
        _m("raw_cold", "python -c: PUSH connect, send one message",
           lambda t, p: trial_cold(t, "raw")),
        _m("zm_cold", "python -c: Node start, wait_for_pullers, push one message",
           lambda t, p: trial_cold(t, "zm")),
        _m("raw_import", "import zmq", lambda t, p: trial_import(t, "zmq")),
        _m("zm_import", "import zmqmesh", lambda t, p: trial_import(t, "zmqmesh")),
        _m("raw_import_timed", "import zmq, timed in the process",
           lambda t, p: trial_import_timed(t, "zmq", "import zmq")),
        _m("zm_import_node", "from zmqmesh import Node, timed in the process",
           lambda t, p: trial_import_timed(t, "zmqmesh", "from zmqmesh import Node")),
        _m("raw_mem_outstanding", "zmq.asyncio DEALER, all requests outstanding, one future each",
           lambda t, p: trial_req(t, "raw", "outstanding", p["outstanding_n"], 10, slow_first_s=p["slow_first_s"])),
        _m("zm_mem_outstanding", "AsyncNode.request, all outstanding (gather)",
           lambda t, p: trial_req(t, "zm", "outstanding", p["outstanding_n"], 10, slow_first_s=p["slow_first_s"])),
    ]
}

# ============================================================================ figures ==


SPREAD_RUNS = 5
"""Runs a stability figure needs for a verdict."""


@dataclass
class Figure:
    name: str
    what: str
    zm: str
    raw: str
    metric: str
    unit: str
    higher_is_better: bool
    target: float | None = None
    extra: Callable[[list[dict[str, Any]], list[dict[str, Any]]], str] | None = None
    spread: bool = False  # the figure is how far the runs stray from their median (%), target absolute


def _drops(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    zd = [r["dropped_stats"] for r in zm]
    zl = [r["lost"] for r in zm]
    rl = [r["lost"] for r in raw]
    return f"drops per run: zmqmesh stats()['pubsub']['dropped'] {zd}, not delivered {zl}; raw not delivered {rl}"


def _push_extra(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    zs = [f"{r['send_returned_s']:.2f}" for r in zm]
    rs = [f"{r['send_returned_s']:.2f}" for r in raw]
    return f"sender loop returned after (s): zmqmesh {zs}, raw {rs}; elapsed to last delivery (s): zmqmesh {[round(r['elapsed_s'], 2) for r in zm]}"


def _at_least_200k(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    if not zm:
        return "-"
    rate = statistics.median(r["delivered_per_s"] for r in zm)
    return f"absolute target >= 200 k msgs/s: {'meets' if rate >= 200_000 else 'MISSES'} ({rate / 1e3:.1f} k)"


def _at_least_100k(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    if not zm:
        return "-"
    rate = statistics.median(r["msgs_per_s"] for r in zm)
    return f"absolute target >= 100 k msgs/s: {'meets' if rate >= 100_000 else 'MISSES'} ({rate / 1e3:.1f} k)"


def _at_most_30ms(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    if not zm:
        return "-"
    ms = statistics.median(r["import_ms"] for r in zm)
    return f"absolute target <= 30 ms: {'meets' if ms <= 30 else 'MISSES'} ({ms:.1f} ms)"


def _burst_extra(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    def f(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "-"
        med = statistics.median
        return (f"{med(r['msgs_per_s'] for r in rs) / 1e3:.0f} k msgs/s; RSS before burst send "
                f"{med(r['rss_send_base_mib'] for r in rs):.0f} MiB, recv {med(r['rss_recv_base_mib'] for r in rs):.0f} MiB")
    return f"zmqmesh {f(zm)} | raw {f(raw)}"


def _outstanding_extra(zm: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    def f(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "-"
        return (f"max in flight {[r['max_in_flight'] for r in rs]}, all done in "
                f"{[round(r['elapsed_s'], 2) for r in rs]} s, client RSS before "
                f"{statistics.median(r['rss_client_base_mib'] for r in rs):.0f} MiB")
    return f"zmqmesh {f(zm)} | raw {f(raw)}"


SCENARIOS: dict[str, list[Figure]] = {
    "push_sync": [
        Figure("push_sync/msgpack", "64 B msgpack dict: Node.push -> @pull vs pyzmq+msgpack", "zm_push_sync", "raw_push_msgpack", "msgs_per_s", "msgs/s", True, 0.9, _push_extra),
        # (info: issue 16 sets the bare-bytes targets on bare bytes both sides: push_bare, push_many_bare)
        Figure("push_sync/bare", "64 B msgpack dict: Node.push -> @pull vs pyzmq bare 64 B", "zm_push_sync", "raw_push_bare", "msgs_per_s", "msgs/s", True),
    ],
    "push_bare": [
        Figure("push_bare", "64 bare bytes: Node.push -> @pull vs pyzmq bare 64 B", "zm_push_bare", "raw_push_bare", "msgs_per_s", "msgs/s", True, 0.8),
        Figure("push_many_bare", "64 bare bytes: Node.push_many(256) -> @pull vs pyzmq bare 64 B single sends",
               "zm_push_many_bare", "raw_push_bare", "msgs_per_s", "msgs/s", True, 2.0),
    ],
    "push_many": [
        Figure("push_many/bare", "64 B msgpack dicts: Node.push_many(256) -> @pull vs pyzmq bare 64 B single sends",
               "zm_push_many", "raw_push_bare", "msgs_per_s", "msgs/s", True),
    ],
    "push_async": [
        Figure("push_async/msgpack", "64 B: await AsyncNode.push -> async handler vs pyzmq+msgpack", "zm_push_async", "raw_push_msgpack", "msgs_per_s", "msgs/s", True, 0.9, _push_extra),
        Figure("push_async/bare", "64 B: await AsyncNode.push -> async handler vs pyzmq bare 64 B", "zm_push_async", "raw_push_bare", "msgs_per_s", "msgs/s", True),
    ],
    "push_64k": [
        Figure("push_64k", "64 KiB bytes: Node.push vs pyzmq copy=False", "zm_push_64k", "raw_push_64k", "mb_per_s", "MB/s", True, 0.85),
    ],
    "push_1m": [
        Figure("push_1m", "1 MiB bytes: Node.push vs pyzmq copy=False", "zm_push_1m", "raw_push_1m", "mb_per_s", "MB/s", True, 0.85),
    ],
    "req_sync": [
        Figure("req_sync/median", "round trip: Node.request vs blocking DEALER/ROUTER, median", "zm_req_sync", "raw_req_sync", "median_us", "us", False, 1.1),
        Figure("req_sync/p99", "round trip: Node.request vs blocking DEALER/ROUTER, p99", "zm_req_sync", "raw_req_sync", "p99_us", "us", False, 1.5),
    ],
    "req_async": [
        Figure("req_async/median", "round trip: await AsyncNode.request vs zmq.asyncio DEALER, median", "zm_req_async", "raw_req_async", "median_us", "us", False, 1.0),
        Figure("req_async/p99", "round trip: await AsyncNode.request vs zmq.asyncio DEALER, p99", "zm_req_async", "raw_req_async", "p99_us", "us", False, 1.5),
    ],
    "req_inflight": [
        Figure("req_inflight", "64 requests in flight: AsyncNode (64 coroutines) vs DEALER 64 outstanding", "zm_req_inflight", "raw_req_inflight", "per_s", "req/s", True, 0.8),
        Figure("req_inflight/sync", "64 requests in flight: Node.request_many (one thread) vs DEALER 64 outstanding", "zm_req_many", "raw_req_inflight", "per_s", "req/s", True, 0.8),
        Figure("req_inflight/async_many", "64 requests in flight: AsyncNode.request_many (one coroutine) vs DEALER "
               "64 outstanding", "zm_req_amany", "raw_req_inflight", "per_s", "req/s", True, 0.8),
        Figure("req_inflight/asyncio", "64 coroutines each awaiting its reply: AsyncNode vs zmq.asyncio with a future "
               "per request (the same model, raw)", "zm_req_inflight", "raw_req_coroutines", "per_s", "req/s", True, None),
    ],
    "req_clients": [
        Figure("req_clients", "3 client processes x 64 in flight to one provider: Node.request_many vs DEALERs (sum)",
               "zm_req_clients", "raw_req_clients", "per_s", "req/s", True, None),
    ],
    "pubsub_1": [
        Figure("pubsub_1", "64 B msgpack, 1 subscriber process: delivered", "zm_pubsub_1", "raw_pubsub_1", "delivered_per_s", "msgs/s", True, 0.8, _drops),
    ],
    "history": [
        Figure("history/publish_cost", "64 B msgpack, 1 subscriber: publishing with history= vs without",
               "zm_pubsub_history_1", "zm_pubsub_1", "delivered_per_s", "msgs/s", True, 0.7, _drops),
        Figure("history/replay", "replay='all' of the kept messages vs live delivery to 1 subscriber",
               "zm_replay", "zm_pubsub_1", "delivered_per_s", "msgs/s", True, None, _at_least_200k),
    ],
    "pubsub_4": [
        Figure("pubsub_4", "64 B msgpack, 4 subscriber processes: delivered (sum)", "zm_pubsub_4", "raw_pubsub_4", "delivered_per_s", "msgs/s", True, 0.8, _drops),
    ],
    "alo_32k": [
        # no target: a guard. Batches of at-least-once payloads under BATCH_BYTES are cut by
        # their bytes: a way of cutting them that looks at every payload the count allows
        # (256) for each batch of one or two showed here as a collapse (7.6 ms a message)
        Figure("alo_32k", "32 KiB bytes: Node.push at least once vs in memory", "zm_push_alo_32k", "zm_push_32k",
               "mb_per_s", "MB/s", True, None),
    ],
    "durable": [
        # the targets (>= 100 k msgs/s and >= 0.5x in memory) are for batched commits. Beside
        # them, with no target: group commit of 64 tasks (each push waits for the end of a
        # pass of the loop, which a push in memory never does) and one transaction per push
        Figure("durable/batch_vs_memory", "64 B: durable push_many(256) -> at-least-once pull vs in memory",
               "zm_push_durable_batch", "zm_push_alo", "msgs_per_s", "msgs/s", True, 0.5, _at_least_100k),
        Figure("durable/tasks_vs_memory", "64 B: 64 tasks' durable pushes (group commit) vs the same tasks in memory",
               "zm_push_durable_tasks", "zm_push_alo_tasks", "msgs_per_s", "msgs/s", True, None),
        Figure("durable/single_vs_memory", "64 B: one thread's durable push, a commit each, vs in memory",
               "zm_push_durable", "zm_push_alo", "msgs_per_s", "msgs/s", True, None),
    ],
    "cold_start": [
        Figure("cold_start", "spawn a sender process -> its first message delivered to a waiting receiver",
               "zm_cold", "raw_cold", "cold_ms", "ms", False, 1.2),
    ],
    "stability": [
        Figure("stability/push_sync", f"Node.push -> @pull: the runs' largest distance from their median ({SPREAD_RUNS} runs asked)",
               "zm_push_sync", "raw_push_msgpack", "msgs_per_s", "%", False, 20, spread=True),
        Figure("stability/pubsub_4", "Node.publish -> 4 subscribers: the runs' largest distance from their median",
               "zm_pubsub_4", "raw_pubsub_4", "delivered_per_s", "%", False, 20, spread=True),
    ],
    "import": [
        Figure("import", "python -X importtime: import zmqmesh vs import zmq (absolute target <= 30 ms)",
               "zm_import", "raw_import", "import_ms", "ms", False, None, _at_most_30ms),
        Figure("import/node", "from zmqmesh import Node (what a sync node loads: the package imports it on "
               "first use) vs import zmq, timed in the process", "zm_import_node", "raw_import_timed", "import_ms", "ms",
               False, None, _at_most_30ms),
    ],
    "mem_burst": [
        Figure("mem_burst/sender", "burst of N x 64 B push: peak RSS of the sender", "zm_mem_burst", "raw_mem_burst", "rss_send_mib", "MiB", False, None, _burst_extra),
        Figure("mem_burst/receiver", "burst of N x 64 B push: peak RSS of the receiver", "zm_mem_burst", "raw_mem_burst", "rss_recv_mib", "MiB", False, None),
    ],
    "mem_outstanding": [
        Figure("mem_outstanding/client", "N async requests outstanding to a slow service: peak RSS of the client", "zm_mem_outstanding", "raw_mem_outstanding", "rss_client_mib", "MiB", False, None, _outstanding_extra),
        Figure("mem_outstanding/service", "the same: peak RSS of the service", "zm_mem_outstanding", "raw_mem_outstanding", "rss_service_mib", "MiB", False, None),
    ],
}

# ============================================================================ running ==


@dataclass
class Outcome:
    ok: list[dict[str, Any]] = field(default_factory=list)
    by_repeat: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


PROFILE_DIR: str | None = None  # --py-spy DIR
_CLK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall, machine busy CPU-seconds, hypervisor steal seconds, CPU-seconds of this process and its reaped children)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        busy, steal = (fields[0] + fields[1] + fields[2]) / _CLK, fields[7] / _CLK
    except (OSError, ValueError, IndexError):
        busy = steal = 0.0
    t = os.times()
    return time.monotonic(), busy, steal, t.user + t.system + t.children_user + t.children_system


def other_load(before: tuple[float, float, float, float], after: tuple[float, float, float, float]) -> tuple[float, float]:
    """% of the machine's CPU used by other processes between two snapshots, and % stolen by the hypervisor."""
    wall = max(after[0] - before[0], 1e-6) * (os.cpu_count() or 1)
    other = (after[1] - before[1]) - (after[3] - before[3])
    return max(other, 0.0) / wall * 100.0, (after[2] - before[2]) / wall * 100.0


def wait_quiet(max_wait: float, threshold: float = 15.0) -> None:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` % of the CPUs."""
    if max_wait <= 0:
        return
    end = time.monotonic() + max_wait
    waited = False
    while True:
        before = cpu_snapshot()
        time.sleep(0.5)
        busy, _steal = other_load(before, cpu_snapshot())
        if busy < threshold:
            if waited:
                log(f"  machine quiet again ({busy:.0f} % busy)")
            return
        if time.monotonic() > end:
            log(f"  machine still {busy:.0f} % busy after waiting {max_wait:.0f} s; measuring anyway")
            return
        if not waited:
            log(f"  machine {busy:.0f} % busy with other work; waiting up to {max_wait:.0f} s for it to calm down")
            waited = True


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_measurement(m: Measurement, params: dict[str, Any], repeat: int, log_dir: str, out: Outcome, quiet_wait: float = 0.0) -> None:
    wait_quiet(quiet_wait)
    timeout = params["timeout"] * m.timeout_scale
    cpu_before = cpu_snapshot()
    label = f"{m.key}.r{repeat}"
    started = time.monotonic()
    profile_dir = PROFILE_DIR if m.key.startswith("zm_") else None
    trial = Trial(label, timeout, log_dir, profile_dir=profile_dir)
    try:
        failed = True
        try:
            result = m.run(trial, params)
            failed = False
        finally:
            trial.close(grace=2.0 if failed else 8.0)
        result["_wall_s"] = time.monotonic() - started
        result["_other_cpu_pct"], result["_steal_pct"] = other_load(cpu_before, cpu_snapshot())
        out.ok.append(result)
        out.by_repeat[repeat] = result
        brief = ", ".join(
            f"{k}={_short(v)}" for k, v in result.items() if isinstance(v, (int, float)) and not k.startswith(("rss_", "_"))
        )
        first = trial.timeline[0][0] if trial.timeline else 0.0
        result["_first_reply_s"] = first
        result["_close_s"] = trial.close_s
        log(
            f"  [{repeat + 1}] {m.key:<22} ok   {time.monotonic() - started:5.1f} s (first reply {first:.1f} s, stop {trial.close_s:.1f} s,"
            f" other load {result['_other_cpu_pct']:.0f} %)  {brief}"
        )
        if time.monotonic() - started > 2.5 + result.get("elapsed_s", 0.0) + (1.0 if "outstanding" in m.key else 0.0):
            # a slow run: say where the time went (messages from the children, seconds since spawn)
            line = ", ".join(f"{name}:{tag}@{at:.2f}" for at, name, tag in trial.timeline)
            log(f"      slow run; timeline: {line}")
    except Exception as exc:  # noqa: BLE001  TrialError, or a bug in a trial function: record and go on
        text = str(exc) if isinstance(exc, TrialError) else "".join(traceback.format_exception(exc)).strip()
        out.errors.append(f"run {repeat + 1}: {text}")
        first = text.splitlines()[0] if text else type(exc).__name__
        log(f"  [{repeat + 1}] {m.key:<22} FAIL {time.monotonic() - started:5.1f} s  {first}")
    out.notes.extend(f"run {repeat + 1}: {n}" for n in trial.notes)


def _short(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


# ============================================================================ reporting ==


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("msgs/s", "req/s"):
        return f"{value / 1e6:.3f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"
    if unit == "us":
        return f"{value:.0f}"
    if unit in ("MB/s", "MiB"):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    return f"{value:.3g}"


def stats_of(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def evaluate(fig: Figure, outcomes: dict[str, Outcome], repeats: int) -> dict[str, Any]:
    zo, ro = outcomes[fig.zm], outcomes[fig.raw]
    zv = [r[fig.metric] for r in zo.ok]
    rv = [r[fig.metric] for r in ro.ok]
    runs = {"zmqmesh": len(zv), "raw": len(rv), "requested": repeats}
    paired: list[float] = []
    if fig.spread:  # one value per side: the largest distance of a run from the median, in %
        zv, rv = [v for v in (_spread_pct(zv),) if v is not None], [v for v in (_spread_pct(rv),) if v is not None]
    else:
        paired = [zo.by_repeat[i][fig.metric] / ro.by_repeat[i][fig.metric] for i in range(repeats)
                  if i in zo.by_repeat and i in ro.by_repeat and ro.by_repeat[i][fig.metric]]
    zs, rs = stats_of(zv), stats_of(rv)
    ratio = zs["median"] / rs["median"] if zs and rs and rs["median"] else None
    if not zv:
        status = "failed"
    elif zo.errors:
        status = "partial"
    elif not rv:
        status = "no baseline"
    else:
        status = "ok"
    meets = None
    if fig.spread:
        meets = zs["median"] <= fig.target if zs and fig.target is not None and runs["zmqmesh"] >= SPREAD_RUNS else None
    elif fig.target is not None and ratio is not None:
        meets = ratio >= fig.target if fig.higher_is_better else ratio <= fig.target
    loads = [r.get("_other_cpu_pct", 0.0) for r in zo.ok + ro.ok]
    extra = ""
    if fig.extra is not None:
        try:
            extra = fig.extra(zo.ok, ro.ok)
        except Exception as exc:  # noqa: BLE001  a summary line must not sink the report
            extra = f"(extra info unavailable: {exc})"
    return {
        "figure": fig.name,
        "what": fig.what,
        "unit": fig.unit,
        "better": "higher" if fig.higher_is_better else "lower",
        "zmqmesh": zs,
        "raw": rs,
        "ratio": ratio,
        "ratio_paired_min": min(paired) if paired else None,
        "ratio_paired_max": max(paired) if paired else None,
        "target": None if fig.target is None else ((">= " if fig.higher_is_better else "<= ") + f"{fig.target}"
                                                   + (f" % ({SPREAD_RUNS} runs)" if fig.spread else "")),
        "spread": fig.spread,
        "meets_target": meets,
        "status": status,
        "runs": runs,
        "errors": {"zmqmesh": zo.errors, "raw": ro.errors},
        "notes": zo.notes + [f"raw: {n}" for n in ro.notes],
        "extra": extra,
        "measured": {"zmqmesh": MEASUREMENTS[fig.zm].describe, "raw": MEASUREMENTS[fig.raw].describe},
        "other_load_pct_max": max(loads) if loads else None,
    }


def _spread_pct(values: list[float]) -> float | None:
    """How far the farthest run is from the runs' median, in % of it."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    return max(abs(v - med) for v in values) / med * 100 if med else None


NOISY_PCT = 15.0  # other processes using more than this share of the CPUs during a run make it noisy


def render_table(rows: list[dict[str, Any]]) -> str:
    head = ["figure", "unit", "zmqmesh median [min-max]", "raw median [min-max]", "zm/raw [paired]", "target", "verdict", "other load"]
    lines = []
    for r in rows:
        unit = r["unit"]

        def cell(s: dict[str, Any] | None, unit: str = unit) -> str:
            if s is None:
                return "-"
            return f"{fmt(s['median'], unit)} [{fmt(s['min'], unit)}-{fmt(s['max'], unit)}]"

        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r["ratio_paired_min"] is not None:
            ratio += f" [{r['ratio_paired_min']:.2f}-{r['ratio_paired_max']:.2f}]"
        if r["status"] == "failed":
            verdict = "FAILED"
        elif r["meets_target"] is None:
            verdict = "(info)" if r["target"] is None else (f"needs {SPREAD_RUNS} runs" if r["spread"] else "no baseline")
        else:
            verdict = "meets" if r["meets_target"] else "MISSES"
        if r["status"] == "partial":
            verdict += f" ({r['runs']['zmqmesh']}/{r['runs']['requested']} runs ok)"
        load = r["other_load_pct_max"]
        load_cell = "-" if load is None else f"{load:.0f} %" + (" NOISY" if load > NOISY_PCT else "")
        lines.append([r["figure"], unit, cell(r["zmqmesh"]), cell(r["raw"]), ratio, r["target"] or "-", verdict, load_cell])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    details = []
    for r in rows:
        bits = []
        if r["extra"]:
            bits.append(r["extra"])
        for side in ("zmqmesh", "raw"):
            for e in r["errors"][side]:
                first = e.strip().splitlines()
                bits.append(f"{side} error: " + " / ".join(x.strip() for x in first[:1] + first[-3:] if x.strip()))
        bits.extend(r["notes"])
        if bits:
            details.append(f"  {r['figure']}: " + "\n    ".join(bits))
    out.append("")
    out.append(
        "other load: the largest share of the machine's CPU used by processes outside this benchmark during any run of the"
        f" figure (from /proc/stat); above {NOISY_PCT:.0f} % the figure is NOISY."
    )
    if details:
        out.append("")
        out.append("details:")
        out.extend(details)
    return "\n".join(out)


# ============================================================================ main ==


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated scenarios (see --list); default: all")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure (at least 3; default 3)")
    ap.add_argument("--quick", action="store_true", help="smaller message counts (~1 min)")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON lines to PATH")
    ap.add_argument("--logs", metavar="DIR", help="keep the children's stderr logs in DIR (default: a temp dir, kept only on failure)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every run's deadline")
    ap.add_argument("--child-log-level", metavar="LEVEL", help="log the library at LEVEL (e.g. DEBUG) into the children's log files")
    ap.add_argument("--py-spy", metavar="DIR", dest="py_spy", help="sample every zmqmesh process with py-spy (raw collapsed stacks, per thread) into DIR; slows them down, so for diagnosis only")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS", help="before each run, wait up to SECONDS for other processes to leave the CPUs (<15 %% busy)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be at least 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, figs in SCENARIOS.items():
            print(f"{name:<16} " + "; ".join(f.what for f in figs))
        return 0
    selected = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.child_log_level:
        os.environ["ZMQMESH_BENCH_LOG_LEVEL"] = args.child_log_level
    if args.py_spy:
        global PROFILE_DIR
        os.makedirs(args.py_spy, exist_ok=True)
        PROFILE_DIR = os.path.abspath(args.py_spy)
        log(f"profiling zmqmesh processes with py-spy into {PROFILE_DIR} (figures are not representative)")
    params = dict(QUICK if args.quick else FULL)
    params["timeout"] *= args.timeout_scale

    # the measurements needed, grouped by scenario so zmqmesh and raw runs alternate
    groups: list[list[str]] = []
    seen: set[str] = set()
    for name in selected:
        keys = []
        for fig in SCENARIOS[name]:
            for key in (fig.raw, fig.zm):
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
        if keys:
            groups.append(keys)

    log_dir = args.logs or tempfile.mkdtemp(prefix="zmqmesh-bench-")
    os.makedirs(log_dir, exist_ok=True)
    import msgpack
    import zmq
    import zmqmesh

    env = {
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "zmqmesh": zmqmesh.__version__,
        "cpus": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "quick": args.quick,
        "repeats": args.repeats,
    }
    if float(env["loadavg_start"].split()[0]) > 0.5 if env["loadavg_start"] != "?" else False:
        log(f"warning: the machine is busy (load average {env['loadavg_start']}); figures will be noisy")
    log(f"zmqmesh bench: {', '.join(selected)}; {args.repeats} repeats{' (quick)' if args.quick else ''}; logs in {log_dir}")
    log("  " + ", ".join(f"{k} {v}" for k, v in env.items()))
    t_start = time.monotonic()
    outcomes = {key: Outcome() for group in groups for key in group}
    for repeat in range(args.repeats):
        log(f"repeat {repeat + 1}/{args.repeats}")
        for group in groups:
            # alternate which goes first, so neither side always runs on a "warmer" machine
            order = group if repeat % 2 == 0 else list(reversed(group))
            for key in order:
                run_measurement(MEASUREMENTS[key], params, repeat, log_dir, outcomes[key], args.wait_quiet)
    wall = time.monotonic() - t_start
    env["loadavg_end"] = _loadavg()

    rows = [evaluate(fig, outcomes, args.repeats) for name in selected for fig in SCENARIOS[name]]
    print()
    print(f"zmqmesh vs raw pyzmq - {', '.join(f'{k} {v}' for k, v in env.items())}")
    print(f"counts: {', '.join(f'{k}={v}' for k, v in params.items() if k != 'timeout')}")
    print()
    print(render_table(rows))
    print()
    print(f"total run time: {wall:.0f} s")
    print()
    print("JSON lines (one per figure):")
    lines = [json.dumps({**row, "env": env, "params": params}, sort_keys=True) for row in rows]
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write("\n".join(lines) + "\n")
    failed = any(o.errors for o in outcomes.values())
    if failed:
        log(f"some runs failed; children's stderr logs are in {log_dir}")
    elif not args.logs:
        for name in os.listdir(log_dir):
            os.unlink(os.path.join(log_dir, name))
        os.rmdir(log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
