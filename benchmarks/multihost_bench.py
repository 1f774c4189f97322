"""Multi-host benchmark: mesh formation and partition detection across virtual hosts.

    sudo python3 benchmarks/multihost_bench.py                  # 3 hosts x 8 nodes, 3 runs
    sudo python3 benchmarks/multihost_bench.py --hosts 3 --nodes-per-host 8 --runs 5

Each run builds a fresh virtual network with ``tests/netns.py``: one switch (a bridge in
its own network namespace) and ``--hosts`` hosts (namespaces, 10.205.0.<i>/24 on a veth
named eth0), then starts ``--nodes-per-host`` node processes in every host
(``ip netns exec HOST python3 tests/host_node.py``, ``interface="eth0"``, broadcast
discovery). Times come from the nodes' own join/leave events, stamped with
``time.monotonic()`` (CLOCK_MONOTONIC is one clock for every namespace of a machine).

1. formation: from the first spawn, and from the moment the last node was running, until
   every node has seen every other node join (N-1 peers each);
2. partition detection: the last host's cable is pulled out of the switch (its bridge port
   is detached; the host's interface stays up). For every (observer, departed) pair across
   the cut, the time from the cut until the observer reports the departure: the median of
   all pairs, and the max (when the partition is fully seen, on both sides);
3. heal (extra): the cable is plugged back in; the time until every pair across the cut has
   rejoined, and how many leaves happened after the heal (flapping; should be 0).

Every node loads zmqmesh from compiled ``.pyc`` files, as an installed package has them
(written first, removed at the end: an editable checkout where PYTHONDONTWRITEBYTECODE is
set would have each node compile the package, doubling what a start costs).

Every figure is reported as median [min-max] over the runs, in a table and as JSON lines
(``{"kind": "sample" | "summary" | "run", ...}``) on stdout; progress goes to stderr.

Needs root (network namespaces). Network hygiene: every interface is created inside the
run's own namespaces, nothing is sent on the root namespace's interfaces, and every
process and namespace is removed after each run, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netns  # noqa: E402  (tests/netns.py)
from mesh_bench import compiled_zmqmesh  # noqa: E402

METRICS = [
    ("form_spawn_s", "formation, from first spawn", "s"),
    ("form_last_ready_s", "formation, from last node running", "s"),
    ("spawn_to_last_ready_s", "  (first spawn -> last node running)", "s"),
    ("detect_median_s", "partition detection, median of pairs", "s"),
    ("detect_max_s", "partition detection, all pairs (max)", "s"),
    ("detect_min_s", "  (partition detection, fastest pair)", "s"),
    ("rejoin_s", "heal -> every pair rejoined", "s"),
    ("flaps", "leaves after the heal (flapping)", "count"),
]


def progress(*parts: object) -> None:
    sys.stderr.write(" ".join(str(p) for p in parts) + "\n")
    sys.stderr.flush()


def wired_hosts(lab: netns.Lab, count: int, subnet: str) -> tuple[Any, list[Any]]:
    """A switch and ``count`` hosts, host i at ``<subnet>.i/24`` on a cable (eth0) to it."""
    switch = lab.switch()
    hosts = [lab.host(f"h{i}") for i in range(1, count + 1)]
    for i, host in enumerate(hosts, start=1):
        lab.wire(host, "eth0", switch, f"{subnet}.{i}/24")
    return switch, hosts


def first_full_view(node: netns.HostNode, expected: set[str], after: float = 0.0) -> float | None:
    """When ``node``'s present peers (replaying its join/leave events after ``after``) first equal ``expected``."""
    present: set[str] = set()
    for event in list(node.events):
        if event["ev"] == "join":
            present.add(event["peer"]["id"])
        elif event["ev"] == "leave":
            present.discard(event["peer"]["id"])
        else:
            continue
        if event["t"] >= after and present == expected:
            return event["t"]
    return None


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "mesh": f"mhb-{uuid.uuid4().hex[:10]}",
        "interface": "eth0",
        "beacon_port": 5670,
        "heartbeat_interval_s": args.heartbeat,
        "peer_timeout_s": args.peer_timeout,
        "beacon_interval_s": args.beacon_interval,
    }
    with netns.Lab() as lab:
        switch, hosts = wired_hosts(lab, args.hosts, "10.205.0")
        total = args.hosts * args.nodes_per_host
        progress(f"run {index}: starting {total} nodes on {args.hosts} hosts")
        t_spawn = time.monotonic()
        nodes = [
            lab.node(host, f"{host.short}-n{k}", options, log_level="warning")
            for k in range(1, args.nodes_per_host + 1)
            for host in hosts
        ]
        for node in nodes:
            node.ready(timeout=120)
        last_ready = max(node.find("ready")[0]["t"] for node in nodes)
        everyone = {n.id for n in nodes}
        for node in nodes:
            node.wait_peers(everyone - {node.id}, 60)
        formed = max(first_full_view(n, everyone - {n.id}) or float("inf") for n in nodes)

        # Settle: the cut must find every heartbeat timer in its steady state.
        time.sleep(args.settle)
        cut_host = hosts[-1]
        inside = [n for n in nodes if n.host is cut_host]
        outside = [n for n in nodes if n.host is not cut_host]
        progress(f"run {index}: formed in {formed - t_spawn:.2f} s; pulling {cut_host.short}'s cable")
        t_cut = time.monotonic()
        switch.detach(cut_host, "eth0")
        deadline = args.peer_timeout + 20
        for node in nodes:
            side = inside if node in inside else outside
            node.wait_peers({n.id for n in side if n is not node}, deadline, "the partition")
        detections = []
        for observer in nodes:
            for gone in (outside if observer in inside else inside):
                leave = next(e for e in observer.find("leave", peer_id=gone.id) if e["t"] >= t_cut)
                detections.append(leave["t"] - t_cut)

        progress(f"run {index}: partition seen after {max(detections):.2f} s; plugging the cable back in")
        t_heal = time.monotonic()
        switch.attach(cut_host, "eth0")
        for node in nodes:
            node.wait_peers(everyone - {node.id}, 60, "the heal")
        rejoined = max(first_full_view(n, everyone - {n.id}, after=t_heal) or float("inf") for n in nodes)
        time.sleep(args.peer_timeout + 1.0)  # watch for flapping after the heal
        flaps = sum(1 for n in nodes for e in n.find("leave") if e["t"] > t_heal)
        sample = {
            "kind": "sample",
            "run": index,
            "form_spawn_s": formed - t_spawn,
            "form_last_ready_s": formed - last_ready,
            "spawn_to_last_ready_s": last_ready - t_spawn,
            "detect_median_s": statistics.median(detections),
            "detect_max_s": max(detections),
            "detect_min_s": min(detections),
            "detect_pairs": len(detections),
            "rejoin_s": rejoined - t_heal,
            "flaps": flaps,
        }
    return sample


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key, label, unit in METRICS:
        values = [s[key] for s in samples]
        out.append({"kind": "summary", "metric": key, "label": label, "unit": unit, "runs": len(values),
                    "median": statistics.median(values), "min": min(values), "max": max(values)})
    return out


def fmt(value: float, unit: str) -> str:
    return f"{value:.0f}" if unit == "count" else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--nodes-per-host", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=0.5, help="heartbeat_interval_s (default 0.5)")
    parser.add_argument("--peer-timeout", type=float, default=2.0, help="peer_timeout_s (default 2.0)")
    parser.add_argument("--beacon-interval", type=float, default=1.0, help="beacon_interval_s (default 1.0)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between formation and the cut")
    args = parser.parse_args()
    if args.hosts < 2 or args.nodes_per_host < 1 or args.runs < 1:
        parser.error("needs at least 2 hosts, 1 node per host and 1 run")

    reason = netns.unavailable_reason()
    if reason is not None:
        progress(f"multihost benchmark not run: {reason}")
        return 2
    netns.sweep_stale()
    # a SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: each run's lab stops its node
    # processes and removes its namespaces, and the .pyc files written here are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    samples = []
    with compiled_zmqmesh():
        for index in range(1, args.runs + 1):
            samples.append(one_run(index, args))
            progress("  " + json.dumps(samples[-1]))
    summary = summarize(samples)
    elapsed = time.monotonic() - started

    total = args.hosts * args.nodes_per_host
    print()
    print(f"multi-host benchmark: {args.hosts} hosts x {args.nodes_per_host} nodes = {total} node processes, "
          f"{args.runs} runs (heartbeat_interval_s={args.heartbeat}, peer_timeout_s={args.peer_timeout}, "
          f"beacon_interval_s={args.beacon_interval})")
    width = max(len(label) for _k, label, _u in METRICS)
    header = f"{'metric':<{width}} | {'unit':<5} | {'median':>8} | {'min':>8} | {'max':>8}"
    print(header)
    print("-" * len(header))
    for row in summary:
        print(f"{row['label']:<{width}} | {row['unit']:<5} | {fmt(row['median'], row['unit']):>8} | "
              f"{fmt(row['min'], row['unit']):>8} | {fmt(row['max'], row['unit']):>8}")
    print()
    print(f"notes: median [min-max] over runs; detection pairs per run: {samples[0]['detect_pairs']} "
          f"(every node on one side x every node on the other).")
    print(f"       The cut is at the switch, so a departure is seen only by silence: peer_timeout_s "
          f"({args.peer_timeout} s) after the last traffic,")
    print("       which precedes the cut by up to about one heartbeat interval (hence pairs below the timeout).")
    print(f"       {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"total {elapsed:.1f} s")
    print()
    for sample in samples:
        print(json.dumps(sample))
    for row in summary:
        print(json.dumps(row))
    print(json.dumps({"kind": "run", "hosts": args.hosts, "nodes_per_host": args.nodes_per_host, "runs": args.runs,
                      "heartbeat_interval_s": args.heartbeat, "peer_timeout_s": args.peer_timeout,
                      "beacon_interval_s": args.beacon_interval, "cpus": os.cpu_count(), "elapsed_s": elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
