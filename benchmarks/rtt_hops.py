"""Where a sync round trip's threads wake: per thread of both processes, context switches
and CPU per round trip, and (``--trace``) system calls by kind, for bench.py's
``req_sync`` (a `Node.request` loop to a ``def`` ``@service`` on a sync `Node`) or its
raw twin (``--pair raw``: a blocking DEALER against a blocking ROUTER echo, msgpack).

A server and a client process; after ``--warm`` round trips the orchestrator reads every
thread's ``/proc/<pid>/task/<tid>/status`` (voluntary and involuntary context switches)
and ``schedstat`` (CPU ns, times run on a CPU) before and after ``--n`` round trips, one
at a time. Printed per round: the client's median round trip (and its 10th/90th
percentiles, in us: wall time, noisy on a shared machine: alternate and repeat), and per
thread (named by its process's Python threads, ZeroMQ's by their ``comm``) the counts per
round trip. ``--trace`` runs ``perf trace -s`` over both processes while the measured
round trips run (then the wall times are not comparable): the system calls per round
trip of each thread, by kind. ``--trace strace`` runs ``strace -f -c`` instead (all
threads of a process together; much slower). ``--spin-us`` has the raw pair's threads
busy that long before each send (each side): what the round trip costs per microsecond
of CPU on its critical path, with the hops unchanged. ``--sched`` runs ``perf sched record`` over
``--sched-s`` of the measured round trips (``--n`` must outlast it): per thread, the
median delay from being woken to running (``delay``: an idle CPU's wake-up is most of
it), the median run per wake-up (``run``), and for the threads that send (a process's
Python threads), the median time from running to waking their process's ZeroMQ I/O
thread (``to_io``: for a provider, from its wake-up to its reply going out; for a
client, from the reply's arrival to the next request going out).

    PYTHONPATH=. python3 benchmarks/rtt_hops.py --pair zm --n 5000 --rounds 3
    PYTHONPATH=. python3 benchmarks/rtt_hops.py --pair raw --n 5000 --trace perf
    PYTHONPATH=. python3 benchmarks/rtt_hops.py --pair zm --n 8000 --sched
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from _cpu_harness import end_pair, expect, free_udp_port, say
from provider_cpu import PAYLOAD, SERVICE


def _thread_names() -> str:
    """This process's Python threads as ``tid=name`` words (ZeroMQ's threads are not among them)."""
    return " ".join(f"{t.native_id}={t.name.replace(' ', '_')}" for t in threading.enumerate())


def zm_server(beacon_port: int, mesh: str, _endpoint_file: str) -> None:
    """The echo provider on a sync `Node` (a ``def`` handler): says ``ready <pid>``,
    then its threads' names on ``names``, serves until stdin closes."""
    import zmqmesh

    node = zmqmesh.Node("rtt-provider", beacon_port=beacon_port, mesh=mesh)

    @node.service(SERVICE)
    def echo(msg: Any) -> Any:
        return msg.data

    with node:
        say(f"ready {os.getpid()} -")
        sys.stdin.readline()
        say(f"names {_thread_names()}")
        sys.stdin.read()


def _spin(seconds: float) -> None:
    """Busy this thread ``seconds`` (``--spin-us``)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def raw_server(_beacon_port: int, _mesh: str, _endpoint_file: str, spin_s: float = 0.0) -> None:
    """bench.py's raw ROUTER echo (`_bench_roles.raw_router`'s loop): says ``ready <pid>
    <endpoint>``, serves until stdin closes."""
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 100)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def control() -> None:
        sys.stdin.readline()
        say(f"names {_thread_names()}")
        sys.stdin.read()
        stop.set()

    threading.Thread(target=control, name="control", daemon=True).start()
    say(f"ready {os.getpid()} tcp://127.0.0.1:{port}")
    recv, send, more = sock.recv, sock.send, zmq.SNDMORE
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while not stop.is_set():
        try:
            ident = recv()
        except zmq.Again:
            continue
        body = recv()
        if spin_s:
            _spin(spin_s)
        send(ident, more)
        send(packb(unpackb(body)))
    sock.close(0)
    ctx.term()


def _client_loop(request: Any, n: int, warm: int) -> None:
    for i in range(warm):
        request({"id": i, "payload": PAYLOAD})
    say(f"warm {os.getpid()} {_thread_names()}")
    sys.stdin.readline()
    pc = time.perf_counter
    lats = []
    reply = None
    for i in range(n):
        t = pc()
        reply = request({"id": i, "payload": PAYLOAD})
        lats.append(pc() - t)
    assert isinstance(reply, dict) and reply["id"] == n - 1, reply
    lats.sort()
    say(f"done {statistics.median(lats) * 1e6:.1f} {lats[len(lats) // 10] * 1e6:.1f} "
        f"{lats[len(lats) * 9 // 10] * 1e6:.1f}")
    sys.stdin.readline()


def zm_client(beacon_port: int, mesh: str, _endpoint: str, n: int, warm: int) -> None:
    """`Node.request` in a loop from the main thread (bench.py's ``zm_req_sync``)."""
    import zmqmesh

    with zmqmesh.Node("rtt-client", beacon_port=beacon_port, mesh=mesh) as node:
        node.wait_for_service(SERVICE, timeout=60)
        request = node.request
        _client_loop(lambda data: request(SERVICE, data, timeout=10), n, warm)


def raw_client(_beacon_port: int, _mesh: str, endpoint: str, n: int, warm: int, spin_s: float = 0.0) -> None:
    """A blocking DEALER, packb/unpackb (bench.py's ``raw_req_sync``)."""
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    send, recv, packb, unpackb = sock.send, sock.recv, msgpack.packb, msgpack.unpackb

    def request(data: Any) -> Any:
        if spin_s:
            _spin(spin_s)
        send(packb(data))
        return unpackb(recv())

    _client_loop(request, n, warm)
    sock.close(0)
    ctx.term()


def _snapshot(pid: int) -> dict[int, tuple[str, int, int, int, int]]:
    """tid -> (comm, voluntary switches, involuntary switches, CPU ns, times run)."""
    out = {}
    for tid_s in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid_s}/status") as f:
                status = f.read()
            with open(f"/proc/{pid}/task/{tid_s}/schedstat") as f:
                ns, _wait, runs = (int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[int(tid_s)] = (fields["Name"].strip(), int(fields["voluntary_ctxt_switches"]),
                           int(fields["nonvoluntary_ctxt_switches"]), ns, runs)
    return out


def _names(words: list[str], pid: int, before: dict[int, tuple[str, int, int, int, int]]) -> dict[int, str]:
    names = {int(w.split("=", 1)[0]): w.split("=", 1)[1] for w in words if "=" in w}
    return {tid: names.get(tid, row[0]) + ("/main" if tid == pid and tid not in names else "")
            for tid, row in before.items()}


_PERF_THREAD = re.compile(r"^\s*(\S.*?) \((\d+)\), (\d+) events")
_PERF_ROW = re.compile(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+[\d.]+")


def _perf_summary(text: str) -> dict[int, dict[str, int]]:
    """tid -> system call -> count, from ``perf trace -s``'s summary."""
    out: dict[int, dict[str, int]] = {}
    tid = None
    for line in text.splitlines():
        m = _PERF_THREAD.match(line)
        if m:
            tid = int(m.group(2))
            out[tid] = {}
            continue
        m = _PERF_ROW.match(line)
        if m and tid is not None and m.group(1) != "syscall":
            out[tid][m.group(1)] = int(m.group(2))
    return out


def _strace_summary(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            out[parts[-1]] = int(parts[3])
    return out


_SCHED_NAME = re.compile(r"\[(\d+)(?:/(\d+))?\]$")
_SCHED_RUN = re.compile(r"^\s*([\d.]+)\s+\[\d+\]\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
_SCHED_WAKE = re.compile(r"^\s*([\d.]+)\s+\[\d+\]\s+(\S+)\s+awakened: (\S+)\s*$")


def _sched_summary(path: str, io_threads: dict[int, int]) -> dict[int, tuple[float, float, float | None]]:
    """tid -> (median delay from waking to running, median run, median time from running
    to waking its process's I/O thread (None if it never did)), in us, from
    ``perf sched timehist -w``; ``io_threads``: pid -> its ZeroMQ I/O thread."""
    text = subprocess.run(["perf", "sched", "timehist", "-w", "-i", path], capture_output=True, text=True).stdout

    def tid_pid(name: str) -> tuple[int, int]:
        m = _SCHED_NAME.search(name)
        if m is None:
            return -1, -1
        return int(m.group(1)), int(m.group(2) or m.group(1))

    delays: dict[int, list[float]] = defaultdict(list)
    runs: dict[int, list[float]] = defaultdict(list)
    to_io: dict[int, list[float]] = defaultdict(list)
    first_wake: dict[int, float] = {}
    for line in text.splitlines():
        wake = _SCHED_WAKE.match(line)
        if wake:
            waker, _ = tid_pid(wake.group(2))
            wakee, wakee_pid = tid_pid(wake.group(3))
            if io_threads.get(wakee_pid) == wakee and waker != wakee and waker not in first_wake:
                first_wake[waker] = float(wake.group(1))
            continue
        run = _SCHED_RUN.match(line)
        if run:
            tid, _ = tid_pid(run.group(2))
            end, delay_ms, run_ms = float(run.group(1)), float(run.group(4)), float(run.group(5))
            delays[tid].append(delay_ms * 1e3)
            runs[tid].append(run_ms * 1e3)
            woke = first_wake.pop(tid, None)
            if woke is not None and woke >= end - run_ms / 1e3 - 1e-6:
                to_io[tid].append((woke - (end - run_ms / 1e3)) * 1e6)
    return {tid: (statistics.median(delays[tid]), statistics.median(runs[tid]),
                  statistics.median(to_io[tid]) if to_io.get(tid) else None) for tid in runs}


def one_round(args: argparse.Namespace) -> None:
    """Start a server and a client, count their threads' switches over ``args.n`` round trips."""
    beacon_port, mesh = free_udp_port(), f"rtt-{os.getpid()}-{time.monotonic_ns()}"
    me = os.path.abspath(__file__)
    srv = subprocess.Popen([sys.executable, me, "--role", f"{args.pair}_server", "--beacon-port", str(beacon_port),
                            "--mesh", mesh, "--spin-us", str(args.spin_us)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cli = tracer = None
    try:
        _, spid_s, endpoint = expect(srv, "ready")
        spid = int(spid_s)
        cli = subprocess.Popen([sys.executable, me, "--role", f"{args.pair}_client", "--beacon-port", str(beacon_port),
                                "--mesh", mesh, "--endpoint", endpoint, "--n", str(args.n), "--warm", str(args.warm),
                                "--spin-us", str(args.spin_us)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        warm = expect(cli, "warm")
        cpid = int(warm[1])
        assert srv.stdin is not None and cli.stdin is not None
        srv.stdin.write("names\n")
        srv.stdin.flush()
        snames = expect(srv, "names")[1:]
        before = {spid: _snapshot(spid), cpid: _snapshot(cpid)}
        names = {spid: _names(snames, spid, before[spid]), cpid: _names(warm[2:], cpid, before[cpid])}
        if args.trace == "perf":
            tracer = subprocess.Popen(["perf", "trace", "-s", "-p", f"{spid},{cpid}", "-o", f"/tmp/rtt-perf-{os.getpid()}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif args.trace == "strace":
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", f"/tmp/rtt-strace-{os.getpid()}.c", "-p", str(spid)],
                                      stderr=subprocess.DEVNULL)
            ctracer = subprocess.Popen(["strace", "-f", "-c", "-o", f"/tmp/rtt-strace-{os.getpid()}.s", "-p", str(cpid)],
                                       stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        before = {spid: _snapshot(spid), cpid: _snapshot(cpid)}
        cli.stdin.write("go\n")
        cli.stdin.flush()
        sched_file = f"/tmp/rtt-sched-{os.getpid()}.data"
        if args.sched:
            subprocess.run(["perf", "sched", "record", "-o", sched_file, "--", "sleep", str(args.sched_s)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        done = expect(cli, "done")
        after = {spid: _snapshot(spid), cpid: _snapshot(cpid)}
        traced: dict[int, dict[str, int]] = {}  # (perf: by thread)
        straced: dict[int, dict[str, int]] = {}  # (strace: by process)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            if args.trace == "perf":
                with open(f"/tmp/rtt-perf-{os.getpid()}") as f:
                    traced = _perf_summary(f.read())
                os.unlink(f"/tmp/rtt-perf-{os.getpid()}")
            else:
                ctracer.send_signal(signal.SIGINT)
                ctracer.wait(30)
                for who, suffix in ((spid, "c"), (cpid, "s")):
                    path = f"/tmp/rtt-strace-{os.getpid()}.{suffix}"
                    with open(path) as f:
                        straced[who] = _strace_summary(f.read())
                    os.unlink(path)
        cli.stdin.write("bye\n")
        cli.stdin.flush()
        cli.wait(30)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        end_pair(cli, srv)
    sched: dict[int, tuple[float, float, float | None]] = {}
    if args.sched:
        io_threads = {pid: next(tid for tid, row in before[pid].items() if row[0].startswith("ZMQbg/IO"))
                      for pid in (spid, cpid)}
        sched = _sched_summary(sched_file, io_threads)
        os.unlink(sched_file)
    n = args.n
    print(f"{args.pair}{f' (spin {args.spin_us:g} us)' if args.spin_us else ''}: median {done[1]} us (p10 {done[2]}, p90 {done[3]})"
          + (" [traced: wall time not comparable]" if args.trace else ""), flush=True)
    totals: dict[str, float] = defaultdict(float)
    for pid, side in ((cpid, "client"), (spid, "server")):
        for tid, row in sorted(after[pid].items()):
            if tid not in before[pid]:
                continue
            b = before[pid][tid]
            vol, invol, cpu_us, runs = ((row[1] - b[1]) / n, (row[2] - b[2]) / n, (row[3] - b[3]) / 1e3 / n,
                                        (row[4] - b[4]) / n)
            totals[f"{side} vol"] += vol
            totals[f"{side} invol"] += invol
            if vol + invol + cpu_us < 0.005 and tid not in traced:
                continue
            if tid in sched:
                delay, run_us, to_io = sched[tid]
                calls_s = f"delay={delay:.0f}us run={run_us:.0f}us" + (f" to_io={to_io:.0f}us" if to_io is not None else "")
                print(f"  {side:6} {names[pid].get(tid, '?'):28} vol={vol:5.2f} invol={invol:5.2f} runs={runs:5.2f} "
                      f"cpu={cpu_us:6.1f}us {calls_s}", flush=True)
                continue
            calls = traced.get(tid, {})
            calls_s = " ".join(f"{k}={v / n:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v / n >= 0.01)
            print(f"  {side:6} {names[pid].get(tid, '?'):28} vol={vol:5.2f} invol={invol:5.2f} runs={runs:5.2f} "
                  f"cpu={cpu_us:6.1f}us {calls_s}", flush=True)
        if pid in straced:
            calls_s = " ".join(f"{k}={v / n:.2f}" for k, v in sorted(straced[pid].items(), key=lambda kv: -kv[1])
                               if v / n >= 0.01)
            print(f"  {side:6} {'(all threads, strace)':28} {calls_s}", flush=True)
    print("  per round trip: " + " ".join(f"{k}={v:.2f}" for k, v in totals.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["orchestrator", "zm_server", "raw_server", "zm_client", "raw_client"],
                        default="orchestrator")
    parser.add_argument("--pair", choices=["zm", "raw"], default="zm")
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--warm", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trace", choices=["perf", "strace"], default=None)
    parser.add_argument("--spin-us", type=float, default=0.0, help="raw pair: busy this long before each send")
    parser.add_argument("--sched", action="store_true", help="perf sched record: wake-up delays, runs, time to send")
    parser.add_argument("--sched-s", type=float, default=0.3)
    args = parser.parse_args()
    if args.role == "zm_server":
        zm_server(args.beacon_port, args.mesh, args.endpoint)
    elif args.role == "raw_server":
        raw_server(args.beacon_port, args.mesh, args.endpoint, args.spin_us / 1e6)
    elif args.role == "zm_client":
        zm_client(args.beacon_port, args.mesh, args.endpoint, args.n, args.warm)
    elif args.role == "raw_client":
        raw_client(args.beacon_port, args.mesh, args.endpoint, args.n, args.warm, args.spin_us / 1e6)
    else:
        for _ in range(args.rounds):
            one_round(args)


if __name__ == "__main__":
    main()
