"""What one join costs the nodes already in a mesh, in CPU.

    python3 benchmarks/join_cost.py                    # 48 nodes, 8 newcomers 0.4 s apart
    python3 benchmarks/join_cost.py --nodes 32 --newcomers 16

Starts ``--nodes`` node processes on loopback (each a plain `Node` with a join callback),
waits until they have met and settled, then measures their CPU (user + system, every
thread, from /proc) while ``--newcomers`` more nodes start ``--gap`` seconds apart. The
idle cost is measured settled (beacons read every 0.5 s), and just after a join (every
0.1 s for 10 s, as during the newcomers' arrival) both before the newcomers and after
them: the mean of those two is taken off the window (one of them alone moved the result
by 0.7 ms a join from run to run). The result, CPU per join per established node, is
what a launch of N nodes pays about N(N-1)/2 times over (docs/multihost.md, "How big a
full mesh").

Loopback only; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

from _bench_proc import free_udp_port
from mesh_bench import cpu_ticks

_TICK = os.sysconf("SC_CLK_TCK")

_NODE = """
import signal, sys, threading, zmqmesh
node = zmqmesh.Node(sys.argv[2], mesh=sys.argv[1], beacon_port=int(sys.argv[3]))
node.on_join(lambda peer: None)
node.start()
print("ready", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait()
node.stop()
"""


def cpu_s(procs: list[subprocess.Popen[str]]) -> float:
    """CPU seconds used so far by ``procs`` (user + system, every thread)."""
    return sum(cpu_ticks(proc.pid) or 0 for proc in procs) / _TICK


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=48, help="established nodes (default 48)")
    ap.add_argument("--newcomers", type=int, default=8, help="nodes that join them (default 8)")
    ap.add_argument("--gap", type=float, default=0.4, help="seconds between newcomers (default 0.4)")
    args = ap.parse_args()
    mesh, port = f"joincost-{uuid.uuid4().hex[:8]}", str(free_udp_port())
    procs: list[subprocess.Popen[str]] = []

    def spawn(name: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _NODE, mesh, name, port], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    def ready(proc: subprocess.Popen[str]) -> None:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a node process did not start")

    try:
        old = [spawn(f"old{i}") for i in range(args.nodes)]
        for proc in old:
            ready(proc)
        time.sleep(25)  # met, and past the 10 s of quick beacon reads after the last join
        before = cpu_s(old)
        time.sleep(6)
        settled = (cpu_s(old) - before) / 6
        ready(spawn("trigger"))  # one join: the beacons are read every 0.1 s again
        time.sleep(2.5)
        before = cpu_s(old)
        time.sleep(4)
        quick = (cpu_s(old) - before) / 4
        started, before = time.monotonic(), cpu_s(old)
        for i in range(args.newcomers):
            ready(spawn(f"new{i}"))
            time.sleep(args.gap)
        time.sleep(3)
        elapsed, used = time.monotonic() - started, cpu_s(old) - before
        before = cpu_s(old)  # the quick reads once more, with the newcomers in: the idle cost of
        time.sleep(4)  # the window lies between the two (it varied by 50 % run to run, 0.7 ms a join)
        quick_after = (cpu_s(old) - before) / 4
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    per_join = (used - (quick + quick_after) / 2 * elapsed) / args.newcomers / args.nodes
    print(f"{args.nodes} established nodes, {args.newcomers} newcomers {args.gap} s apart, {os.cpu_count()} CPUs")
    print(f"idle CPU per node: {settled / args.nodes * 1000:.2f} ms/s settled, {quick / args.nodes * 1000:.2f} ms/s "
          f"reading beacons every 0.1 s ({quick_after / args.nodes * 1000:.2f} ms/s after the newcomers)")
    print(f"CPU per join per established node: {per_join * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
