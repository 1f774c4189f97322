"""Both sides' CPU per message of ``push_many`` of bare bytes, measured without wall time.

A pusher `Node` sends ``--n`` messages of 64 bare bytes with ``push_many(QUEUE, [b] * 256)``
in a loop to a puller `Node` in another process, whose ``@pull`` ``def`` handler (in
memory, not zero_copy) counts them: the figure ``push_many_bare`` of ``bench.py``. With
``--size`` (64 KiB or more: ``push_64k`` and ``push_1m``), one ``push`` per message of that
many random bytes, pulled ``zero_copy=True``. With ``--each bare`` or ``--each dict``, one
``push`` per message of the 64 bare bytes or of bench.py's small dict (``{"id": i,
"payload": 45 x}``, msgpack), pulled in memory: bench.py's ``push_bare`` and ``push``.
Reported per round: every thread's CPU per message (``/proc/<pid>/task/<tid>/schedstat``,
in ns) of both processes, by thread name, from the first measured message to the last
one handled; with ``--callgrind pusher|puller``, that process runs under ``valgrind
--tool=callgrind`` (instructions counted only while the measured messages go) and its
instructions per message are reported per thread (their numbers in callgrind's dump).

With ``--raw``, the same job done by raw pyzmq PUSH/PULL, as bench.py's ``raw_push`` and
``raw_pull`` do it (``send(copy=False)`` of one blob, ``recv(copy=False).buffer``), for the
same figures side by side. Also reported per process (``<role>.<name>``, per message):
minor and major page faults, user and system CPU (ns, from clock ticks), and the CPU of all
its threads together (``<role>:ALL``). ``PUSH_CPU_OPTIONS=queue_hwm=1000,...`` gives both
nodes options; ``--wrap``, ``--spy`` and ``--perf`` run one role under a command
(``strace -c -f -o F``), py-spy or ``perf record`` (``perf stat`` with ``--perf-events``)
while the measured messages go.

    PYTHONPATH=. python3 benchmarks/push_cpu.py --n 2000000 --rounds 3
    PYTHONPATH=. python3 benchmarks/push_cpu.py --n 200000 --callgrind puller
    PYTHONPATH=. python3 benchmarks/push_cpu.py --size 65536 --n 30000 --warm 2000 --rounds 3
    PYTHONPATH=. python3 benchmarks/push_cpu.py --size 1048576 --n 3000 --warm 10 --rounds 5 [--raw]
    PYTHONPATH=. python3 benchmarks/push_cpu.py --size 1048576 --n 3000 --warm 10 --perf puller=stat.txt \
        --perf-events page-faults,syscalls:sys_enter_madvise,syscalls:sys_enter_poll
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from _cpu_harness import (
    callgrind_control,
    callgrind_counts,
    expect,
    free_udp_port,
    say,
)

QUEUE = "jobs"
BARE = b"x" * 64
BATCH = 256
PAYLOAD = "x" * 45  # (as bench.py's: {"id": i, "payload": PAYLOAD} packs to 62-64 bytes)




def _threads() -> str:
    return ",".join(f"{t.native_id}={t.name.replace(' ', '_')}" for t in threading.enumerate()
                    if t.native_id is not None)  # (a thread not yet started has none)


def _node_options() -> dict[str, int]:
    """Options of both nodes from ``PUSH_CPU_OPTIONS`` (``name=int,name=int``), for experiments."""
    given = os.environ.get("PUSH_CPU_OPTIONS", "")
    return {name: int(value) for name, value in (item.split("=", 1) for item in given.split(",") if item)}


def puller(beacon_port: int, mesh: str, warm: int, n: int, size: int) -> None:
    """Says ``ready <pid>``, ``warm <threads>`` after ``warm`` messages, ``done`` after ``n`` more."""
    import zmqmesh

    warmed, done = threading.Event(), threading.Event()
    count = 0
    mark = warm

    def handler(msg: Any) -> None:  # (as bench.py's: a count and a test per message)
        nonlocal count, mark
        count += 1
        if count >= mark:
            (warmed if mark == warm else done).set()
            mark = warm + n if mark == warm else 1 << 62

    node = zmqmesh.Node("cpu-puller", beacon_port=beacon_port, mesh=mesh, **_node_options())
    node.pull(QUEUE, handler, zero_copy=bool(size))
    with node:
        say(f"ready {os.getpid()}")
        warmed.wait()
        profile_to = os.environ.get("PUSH_CPU_PROFILE")  # (a file: yappi's profile of the inbox thread)
        if profile_to:
            import yappi

            yappi.set_clock_type("cpu")
            yappi.start(builtins=True)
        say(f"warm {_threads()}")
        done.wait()
        if profile_to:
            yappi.stop()
            inbox = next(t for t in yappi.get_thread_stats() if t.name.startswith("Thread") or "inbox" in t.name)
            with open(profile_to, "w") as f:
                for t in yappi.get_thread_stats():
                    f.write(f"{t.name} {t.id} {t.ttot}\n")
                yappi.get_func_stats(ctx_id=inbox.id).sort("tsub").print_all(
                    out=f, columns={0: ("name", 70), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)})
        say("done")
        sys.stdin.read()


def raw_puller(warm: int, n: int, size: int) -> None:
    """Raw pyzmq PULL, as bench.py's ``raw_pull``: ``recv(copy=False).buffer`` per large
    message (``bare``: ``recv()``); says ``ready <pid> <endpoint>``, ``warm``, ``done``."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    say(f"ready {os.getpid()} tcp://127.0.0.1:{port}")

    def take(count: int) -> None:
        item: Any = None  # (each held until the next comes, as a raw user's loop holds it)
        for _ in range(count):
            item = sock.recv(copy=False).buffer if size else sock.recv()
        del item

    take(warm)
    say(f"warm {_threads()}")
    take(n)
    say("done")
    sys.stdin.read()
    sock.close(0)
    ctx.term()


def raw_pusher(endpoint: str, warm: int, n: int, size: int) -> None:
    """Raw pyzmq PUSH, as bench.py's ``raw_push``: one blob ``send(copy=False)`` per
    message (without ``--size``: one ``send`` of 64 bytes each, where `pusher` sends
``push_many`` of 256); the line protocol of `pusher`."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    blob = os.urandom(size) if size else BARE
    say(f"ready {os.getpid()}")

    def give(count: int) -> None:
        for _ in range(count):
            sock.send(blob, copy=not size)

    give(warm)
    say(f"warm {_threads()}")
    sys.stdin.readline()
    give(n)
    say("sent")
    sys.stdin.read()
    sock.close(0)
    ctx.term()


def pusher(beacon_port: int, mesh: str, warm: int, n: int, size: int, each: str) -> None:
    """Says ``ready <pid>``; pushes ``warm`` messages, says ``warm <threads>``; on a line,
    pushes ``n`` more and says ``sent``; leaves when stdin closes."""
    import zmqmesh

    blob = os.urandom(size)

    def give(count: int) -> None:
        if size:
            for _ in range(count):
                node.push(QUEUE, blob)
            return
        push = node.push  # (as bench.py's zm_push calls it)
        if each == "bare":
            for _ in range(count):
                push(QUEUE, BARE)
            return
        if each == "dict":
            for i in range(count):
                push(QUEUE, {"id": i, "payload": PAYLOAD})
            return
        for start in range(0, count, BATCH):
            node.push_many(QUEUE, [BARE] * (min(start + BATCH, count) - start))

    with zmqmesh.Node("cpu-pusher", beacon_port=beacon_port, mesh=mesh, **_node_options()) as node:
        say(f"ready {os.getpid()}")
        node.wait_for_pullers(QUEUE, 1, timeout=60)
        give(warm)
        say(f"warm {_threads()}")
        sys.stdin.readline()
        give(n)
        say("sent")
        sys.stdin.read()


def _thread_ns(pid: int) -> dict[int, int]:
    out = {}
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                out[int(path.split("/")[4])] = int(f.read().split()[0])
        except OSError:
            pass
    return out



def _process_counts(pid: int) -> dict[str, int]:
    """Minor and major page faults, user and system clock ticks of the whole process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return {"minflt": int(fields[7]), "majflt": int(fields[9]), "utime": int(fields[11]), "stime": int(fields[12])}


def _names(parts: list[str]) -> dict[int, str]:
    return {int(tid): name for tid, name in (p.split("=", 1) for p in parts[1].split(","))} if len(parts) > 1 else {}


def one_round(args: argparse.Namespace) -> dict[str, float]:
    beacon_port, mesh = free_udp_port(), f"cpu-{os.getpid()}-{time.monotonic_ns()}"
    me = os.path.abspath(__file__)
    out_dir = tempfile.mkdtemp(prefix="push-cpu-")
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        endpoint = ""
        pids: dict[str, int] = {}
        for role in ("puller", "pusher"):
            prefix: list[str] = []
            if args.wrap and args.wrap.split("=", 1)[0] == role:
                prefix = args.wrap.split("=", 1)[1].split()
            elif args.callgrind == role:
                prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                          f"--callgrind-out-file={out_dir}/cg.out"]
            procs[role] = subprocess.Popen(
                [*prefix, sys.executable, me, "--role", ("raw_" if args.raw else "") + role,
                 "--beacon-port", str(beacon_port), "--mesh", mesh, "--endpoint", endpoint,
                 "--n", str(args.n), "--warm", str(args.warm), "--size", str(args.size), "--each", args.each],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                stderr=subprocess.DEVNULL if args.callgrind == role else None)
            ready = expect(procs[role], "ready")
            pids[role] = int(ready[1])
            endpoint = ready[2] if len(ready) > 2 else ""
        names = {role: _names(expect(procs[role], "warm")) for role in ("pusher", "puller")}
        if args.callgrind:
            callgrind_control("-i", "on", pids[args.callgrind])
        spies: list[subprocess.Popen[bytes]] = []
        if args.spy:  # (py-spy on one role for the measured messages alone)
            spied, to = args.spy.split("=", 1)
            spies.append(subprocess.Popen(["py-spy", "record", "--pid", str(pids[spied]), "-r", "1000", "--threads",
                                           "--native", "--format", "raw", "-o", to], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # (its attach)
        if args.perf:  # (perf record, or with --perf-events perf stat, on one role for the measured messages alone)
            spied, to = args.perf.split("=", 1)
            command = ["stat", "-e", args.perf_events, "--per-thread"] if args.perf_events else \
                ["record", "-q", "-g", "-F", "2000", "--per-thread"]
            spies.append(subprocess.Popen(["perf", *command, "-p", str(pids[spied]), "-o", to],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        before = {role: _thread_ns(pid) for role, pid in pids.items()}
        counts_before = {role: _process_counts(pid) for role, pid in pids.items()}
        pusher_proc = procs["pusher"]
        assert pusher_proc.stdin is not None
        started = time.monotonic()
        pusher_proc.stdin.write("go\n")
        pusher_proc.stdin.flush()
        expect(procs["puller"], "done")
        elapsed = time.monotonic() - started
        after = {role: _thread_ns(pid) for role, pid in pids.items()}
        counts_after = {role: _process_counts(pid) for role, pid in pids.items()}
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        if args.callgrind:
            callgrind_control("-d", pids[args.callgrind])
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result: dict[str, float] = {"wall_us": elapsed * 1e6 / args.n}  # (wall time a message: not a measure on shared cores)
    for role in ("pusher", "puller"):
        for tid, ns in after[role].items():
            spent = (ns - before[role].get(tid, 0)) / args.n
            if spent >= 1:
                result[f"{role}:{names[role].get(tid, tid)}"] = spent
        result[f"{role}:ALL"] = sum(after[role].values()) - sum(before[role].values())
        result[f"{role}:ALL"] /= args.n
        tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
        for key, value in counts_after[role].items():
            scale = tick_ns if key.endswith("time") else 1.0
            result[f"{role}.{key}"] = (value - counts_before[role][key]) * scale / args.n
    if args.callgrind:
        for thread, count in sorted(callgrind_counts(f"{out_dir}/cg.out.1-*").items()):
            result[f"instr:{args.callgrind}:{thread}"] = count / args.n
    if args.keep:
        result["kept:" + out_dir] = 1
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["orchestrator", "pusher", "puller", "raw_pusher", "raw_puller"],
                        default="orchestrator")
    parser.add_argument("--raw", action="store_true", help="raw pyzmq PUSH/PULL instead of zmqmesh (as bench.py's raw_*)")
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--perf-events", default="", help="with --perf: perf stat of these events instead of a record")
    parser.add_argument("--perf", default="", help="ROLE=FILE: perf record -g of that role while the measured messages go")
    parser.add_argument("--spy", default="", help="ROLE=FILE: py-spy's raw samples of that role while the measured messages go")
    parser.add_argument("--wrap", default="", help="ROLE=COMMAND: run that role under COMMAND (e.g. 'pusher=strace -c -f -o F')")
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--warm", type=int, default=20_480)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", type=int, default=0,
                        help="bytes a message, one push each, pulled zero_copy (default: push_many of 64 bare bytes)")
    parser.add_argument("--each", choices=["", "bare", "dict"], default="",
                        help="one push per message of 64 bare bytes or of a small dict (default: push_many; "
                        "not with --raw, whose pusher sends 64 bare bytes one send each)")
    parser.add_argument("--callgrind", choices=["pusher", "puller"], default=None)
    parser.add_argument("--keep", action="store_true", help="keep callgrind's dumps (their directory is printed)")
    args = parser.parse_args()
    if args.role == "pusher":
        pusher(args.beacon_port, args.mesh, args.warm, args.n, args.size, args.each)
    elif args.role == "puller":
        puller(args.beacon_port, args.mesh, args.warm, args.n, args.size)
    elif args.role == "raw_pusher":
        raw_pusher(args.endpoint, args.warm, args.n, args.size)
    elif args.role == "raw_puller":
        raw_puller(args.warm, args.n, args.size)
    else:
        for _ in range(args.rounds):
            r = one_round(args)
            print(("raw " if args.raw else "zm ") + " ".join(f"{k}={v:.0f}" if v >= 10 else f"{k}={v:.2f}"
                                                           for k, v in sorted(r.items())), flush=True)


if __name__ == "__main__":
    main()
