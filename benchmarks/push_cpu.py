"""Both sides' CPU per message of ``push_many`` of bare bytes, measured without wall time.

A pusher `Node` sends ``--n`` messages of 64 bare bytes with ``push_many(QUEUE, [b] * 256)``
in a loop to a puller `Node` in another process, whose ``@pull`` ``def`` handler (in
memory, not zero_copy) counts them: the figure ``push_many_bare`` of ``bench.py``. With
``--size`` (64 KiB or more: ``push_64k`` and ``push_1m``), one ``push`` per message of that
many random bytes, pulled ``zero_copy=True``.
Reported per round: every thread's CPU per message (``/proc/<pid>/task/<tid>/schedstat``,
in ns) of both processes, by thread name, from the first measured message to the last
one handled; with ``--callgrind pusher|puller``, that process runs under ``valgrind
--tool=callgrind`` (instructions counted only while the measured messages go) and its
instructions per message are reported per thread (their numbers in callgrind's dump).

    PYTHONPATH=. python3 benchmarks/push_cpu.py --n 2000000 --rounds 3
    PYTHONPATH=. python3 benchmarks/push_cpu.py --n 200000 --callgrind puller
    PYTHONPATH=. python3 benchmarks/push_cpu.py --size 65536 --n 30000 --warm 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
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




def _threads() -> str:
    return ",".join(f"{t.native_id}={t.name.replace(' ', '_')}" for t in threading.enumerate())


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

    node = zmqmesh.Node("cpu-puller", beacon_port=beacon_port, mesh=mesh)
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


def pusher(beacon_port: int, mesh: str, warm: int, n: int, size: int) -> None:
    """Says ``ready <pid>``; pushes ``warm`` messages, says ``warm <threads>``; on a line,
    pushes ``n`` more and says ``sent``; leaves when stdin closes."""
    import zmqmesh

    blob = os.urandom(size)

    def give(count: int) -> None:
        if size:
            for _ in range(count):
                node.push(QUEUE, blob)
            return
        for start in range(0, count, BATCH):
            node.push_many(QUEUE, [BARE] * (min(start + BATCH, count) - start))

    with zmqmesh.Node("cpu-pusher", beacon_port=beacon_port, mesh=mesh) as node:
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



def _names(parts: list[str]) -> dict[int, str]:
    return {int(tid): name for tid, name in (p.split("=", 1) for p in parts[1].split(","))} if len(parts) > 1 else {}


def one_round(args: argparse.Namespace) -> dict[str, float]:
    beacon_port, mesh = free_udp_port(), f"cpu-{os.getpid()}-{time.monotonic_ns()}"
    me = os.path.abspath(__file__)
    out_dir = tempfile.mkdtemp(prefix="push-cpu-")
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for role in ("puller", "pusher"):
            prefix: list[str] = []
            if args.callgrind == role:
                prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                          f"--callgrind-out-file={out_dir}/cg.out"]
            procs[role] = subprocess.Popen(
                [*prefix, sys.executable, me, "--role", role, "--beacon-port", str(beacon_port), "--mesh", mesh,
                 "--n", str(args.n), "--warm", str(args.warm), "--size", str(args.size)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                stderr=subprocess.DEVNULL if args.callgrind == role else None)
        pids = {role: int(expect(p, "ready")[1]) for role, p in procs.items()}
        names = {role: _names(expect(procs[role], "warm")) for role in ("pusher", "puller")}
        if args.callgrind:
            callgrind_control("-i", "on", pids[args.callgrind])
        before = {role: _thread_ns(pid) for role, pid in pids.items()}
        pusher_proc = procs["pusher"]
        assert pusher_proc.stdin is not None
        pusher_proc.stdin.write("go\n")
        pusher_proc.stdin.flush()
        expect(procs["puller"], "done")
        after = {role: _thread_ns(pid) for role, pid in pids.items()}
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
    result: dict[str, float] = {}
    for role in ("pusher", "puller"):
        for tid, ns in after[role].items():
            spent = (ns - before[role].get(tid, 0)) / args.n
            if spent >= 1:
                result[f"{role}:{names[role].get(tid, tid)}"] = spent
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
    parser.add_argument("--role", choices=["orchestrator", "pusher", "puller"], default="orchestrator")
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--warm", type=int, default=20_480)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", type=int, default=0,
                        help="bytes a message, one push each, pulled zero_copy (default: push_many of 64 bare bytes)")
    parser.add_argument("--callgrind", choices=["pusher", "puller"], default=None)
    parser.add_argument("--keep", action="store_true", help="keep callgrind's dumps (their directory is printed)")
    args = parser.parse_args()
    if args.role == "pusher":
        pusher(args.beacon_port, args.mesh, args.warm, args.n, args.size)
    elif args.role == "puller":
        puller(args.beacon_port, args.mesh, args.warm, args.n, args.size)
    else:
        for _ in range(args.rounds):
            r = one_round(args)
            print(" ".join(f"{k}={v:.0f}" for k, v in sorted(r.items())), flush=True)


if __name__ == "__main__":
    main()
