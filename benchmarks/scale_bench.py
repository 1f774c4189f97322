"""Scale: one full mesh of 16, 32, 64 and 128 node processes on 8 virtual hosts.

    sudo python3 benchmarks/scale_bench.py                     # 16, 32, 64, 128 nodes
    sudo python3 benchmarks/scale_bench.py --sizes 16,32 --idle 5

For each size, a fresh virtual network (``tests/netns.py``: a switch and ``--hosts``
hosts, 10.206.0.<i>/24) gets that many node processes, spread evenly over the hosts, with
the library's default timings (beacons, heartbeats). It measures:

1. formation: from the moment the last node was running (and from the first spawn) until
   every node has seen every other join;
2. then, after ``--settle`` seconds, over ``--idle`` seconds of silence, per node: CPU
   used (user + system, % of one CPU), resident memory, and open sockets (from /proc).

Every node loads zmqmesh from compiled ``.pyc`` files, as an installed package has them
(``--bytecode source`` writes none first: in an editable checkout without them, where
PYTHONDONTWRITEBYTECODE is set, each node then compiles the package, which doubles
what a start costs).

The table shows how each grows with the mesh, and the verdicts of the targets: at 128
nodes, formation within 0.5 s of the last start and idle CPU per node of at most 0.5 %.
Needs root (network namespaces); nothing is sent outside the run's own namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import netns  # noqa: E402  (tests/netns.py)
from mesh_bench import compiled_zmqmesh, cpu_ticks, rss_mib  # noqa: E402
from multihost_bench import first_full_view, progress, wired_hosts  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def sockets(pid: int) -> int:
    """Open sockets of process ``pid`` (TCP and UDP, ZeroMQ's internal ones included)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def one_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"mesh": f"scale-{uuid.uuid4().hex[:10]}", "interface": "eth0", "beacon_port": 5670}
    for option, value in (("heartbeat_interval_s", args.heartbeat), ("peer_timeout_s", args.peer_timeout),
                          ("beacon_interval_s", args.beacon_interval)):
        if value is not None:
            options[option] = value
    per_host = [size // args.hosts + (1 if i < size % args.hosts else 0) for i in range(args.hosts)]
    with netns.Lab() as lab:
        _switch, hosts = wired_hosts(lab, args.hosts, "10.206.0")
        progress(f"{size} nodes: starting on {args.hosts} hosts")
        t_spawn = time.monotonic()
        nodes = [lab.node(host, f"{host.short}-n{k}", options, log_level=args.log_level)
                 for host, count in zip(hosts, per_host) for k in range(1, count + 1)]
        start_deadline = time.monotonic() + args.timeout
        try:
            for node in nodes:
                node.ready(timeout=max(start_deadline - time.monotonic(), 0.1))
        except netns.NodeError:
            started = sum(1 for n in nodes if n.find("ready"))
            progress(f"{size} nodes: only {started} started within {args.timeout:.0f} s; measuring what runs")
            return {"kind": "size", "nodes": size, "hosts": args.hosts, "formed": False, "started": started,
                    "spawn_to_last_ready_s": float("nan"), **_idle_cost(nodes, args)}
        last_ready = max(node.find("ready")[0]["t"] for node in nodes)
        everyone = {n.id for n in nodes}
        deadline = time.monotonic() + args.form_timeout
        while time.monotonic() < deadline and any(n.joined_ids() != everyone - {n.id} for n in nodes):
            time.sleep(0.5)
        views = [len(n.joined_ids()) for n in nodes]
        complete = all(n.joined_ids() == everyone - {n.id} for n in nodes)
        formed = max(first_full_view(n, everyone - {n.id}) or float("inf") for n in nodes) if complete else float("nan")
        if complete:
            progress(f"{size} nodes: full mesh {formed - last_ready:.2f} s after the last start; "
                     f"settling {args.settle:.0f} s, then {args.idle:.0f} s idle")
        else:
            progress(f"{size} nodes: NO full mesh {args.form_timeout:.0f} s after the last start (peers seen per "
                     f"node: median {statistics.median(views)}, min {min(views)} of {size - 1}); measuring anyway")
        cost = _idle_cost(nodes, args)
        still = sum(1 for n in nodes if n.find("leave"))
        reasons = _leave_reasons(nodes)
    return {
        "kind": "size", "nodes": size, "hosts": args.hosts, "formed": complete, "started": size,
        "peers_seen_median": statistics.median(views), "peers_seen_min": min(views),
        "form_last_ready_s": formed - last_ready, "form_spawn_s": formed - t_spawn,
        "spawn_to_last_ready_s": last_ready - t_spawn, **cost,
        "nodes_that_saw_a_leave": still, **reasons,
    }


def _leave_reasons(nodes: list[netns.HostNode]) -> dict[str, Any]:
    """Why peers were declared gone, counted over all nodes, and how many nodes found their
    own loop running late (from the library's log lines: ``--log-level info``)."""
    reasons: dict[str, int] = {}
    late = 0
    for node in nodes:
        lines = [line for line in node.raw if line.startswith("log ")]
        late += any("event loop ran" in line for line in lines)
        for line in lines:
            if " gone: " in line:
                reason = line.split(" gone: ", 1)[1].split(" for ")[0].split(" (")[0].strip()
                reasons[reason] = reasons.get(reason, 0) + 1
    return {"leave_reasons": reasons, "nodes_whose_loop_ran_late": late} if reasons or late else {}


def _idle_cost(nodes: list[netns.HostNode], args: argparse.Namespace) -> dict[str, Any]:
    """After ``--settle`` seconds, each node process's CPU over ``--idle`` seconds, its RSS
    and its sockets (medians and maxima)."""
    time.sleep(args.settle)
    pids = [n.proc.pid for n in nodes]
    before = [cpu_ticks(p) or 0 for p in pids]
    t0 = time.monotonic()
    time.sleep(args.idle)
    after = [cpu_ticks(p) or 0 for p in pids]
    elapsed = time.monotonic() - t0
    cpu = [(b - a) / _TICK / elapsed * 100 for a, b in zip(before, after)]
    rss = [rss_mib(p) or 0.0 for p in pids]
    socks = [sockets(p) for p in pids]
    return {
        "idle_cpu_pct_median": statistics.median(cpu), "idle_cpu_pct_max": max(cpu),
        "rss_mib_median": statistics.median(rss), "rss_mib_max": max(rss),
        "sockets_median": statistics.median(socks), "sockets_max": max(socks),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,32,64,128", help="mesh sizes, comma-separated (default 16,32,64,128)")
    parser.add_argument("--hosts", type=int, default=8, help="virtual hosts (default 8)")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds after formation before measuring idle cost (default 12: a node reads beacons "
                             "every 0.1 s until 10 s after the last peer came or went, then every 0.5 s)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds over which idle cost is measured")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for all nodes of a size to start")
    parser.add_argument("--form-timeout", type=float, default=60.0,
                        help="seconds allowed for the full mesh after the last start (default 60)")
    parser.add_argument("--heartbeat", type=float, help="heartbeat_interval_s (default: the library's)")
    parser.add_argument("--peer-timeout", type=float, help="peer_timeout_s (default: the library's)")
    parser.add_argument("--beacon-interval", type=float, help="beacon_interval_s (default: the library's)")
    parser.add_argument("--bytecode", choices=("compiled", "source"), default="compiled",
                        help="compiled (default): zmqmesh's .pyc files are written first, as installed; "
                             "source: none are written first (the nodes load those there are, and compile the rest)")
    parser.add_argument("--log-level", default="warning",
                        help="the nodes' library log level; with info, the results count why peers were declared gone")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.hosts < 2 or not sizes or min(sizes) < args.hosts:
        parser.error("needs at least 2 hosts, and at least one node per host")
    reason = netns.unavailable_reason()
    if reason is not None:
        progress(f"scale benchmark not run: {reason}")
        return 2
    netns.sweep_stale()
    # a SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that each size's lab stops its
    # node processes and removes its namespaces
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows = []
    with compiled_zmqmesh(args.bytecode == "compiled"):
        for size in sizes:
            rows.append(one_size(size, args))
            progress("  " + json.dumps(rows[-1]))
    print()
    timings = ", ".join(f"{k}={v}" for k, v in (("heartbeat_interval_s", args.heartbeat), ("peer_timeout_s", args.peer_timeout),
                                                  ("beacon_interval_s", args.beacon_interval)) if v is not None)
    print(f"full mesh on {args.hosts} virtual hosts, {timings or 'default timings'}, {os.cpu_count()} CPUs; "
          f"idle cost over {args.idle:.0f} s, {args.settle:.0f} s after formation; zmqmesh bytecode {args.bytecode}")
    head = ("nodes", "formed after last start", "after first spawn", "idle CPU/node median [max]",
            "RSS/node median [max]", "sockets/node median [max]")
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for r in rows:
        if r["started"] < r["nodes"]:
            print(f"{r['nodes']:>5} | {'NOT STARTED: ' + str(r['started']) + ' ready':>24} | {'-':>17} | "
                  f"{r['idle_cpu_pct_median']:>6.2f} % [{r['idle_cpu_pct_max']:.2f}] | "
                  f"{r['rss_mib_median']:>5.1f} MiB [{r['rss_mib_max']:.1f}] | {r['sockets_median']:>5.0f} [{r['sockets_max']}]")
            continue
        if not r["formed"]:
            print(f"{r['nodes']:>5} | {'NOT FORMED':>24} | {'peers seen: median ' + str(r['peers_seen_median']):>17} | "
                  f"{r['idle_cpu_pct_median']:>6.2f} % [{r['idle_cpu_pct_max']:.2f}] | "
                  f"{r['rss_mib_median']:>5.1f} MiB [{r['rss_mib_max']:.1f}] | {r['sockets_median']:>5.0f} [{r['sockets_max']}]")
            continue
        print(f"{r['nodes']:>5} | {r['form_last_ready_s']:>22.2f} s | {r['form_spawn_s']:>15.1f} s | "
              f"{r['idle_cpu_pct_median']:>6.2f} % [{r['idle_cpu_pct_max']:.2f}] | "
              f"{r['rss_mib_median']:>5.1f} MiB [{r['rss_mib_max']:.1f}] | "
              f"{r['sockets_median']:>5.0f} [{r['sockets_max']}]")
    largest = rows[-1]
    print()
    formation = f"{largest['form_last_ready_s']:.2f} s" if largest["formed"] else (
        "not formed" if largest["started"] == largest["nodes"] else f"only {largest['started']} nodes started")
    formed_in_time = largest["formed"] and largest["form_last_ready_s"] <= 0.5
    idle_ok = largest["started"] == largest["nodes"] and largest["idle_cpu_pct_median"] <= 0.5
    print(f"targets at {largest['nodes']} nodes: formation within 0.5 s of the last start: "
          f"{'meets' if formed_in_time else 'MISSES'} ({formation}); idle CPU per node <= 0.5 %: "
          f"{'meets' if idle_ok else 'MISSES'} ({largest['idle_cpu_pct_median']:.2f} % median)")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
