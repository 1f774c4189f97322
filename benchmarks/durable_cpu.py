"""Durable batches' CPU per message, per process and thread, without wall time.

A sync `Node` pusher (``store=`` a temporary directory) sends ``push_many(QUEUE, 256
dicts of 64 B, durable=True)`` (``--flavor durable_batch``), ``push(..., durable=True)``
of one (``--flavor durable``: a commit each) or ``push`` in memory (``--flavor alo``) to a sync `Node`'s at-least-once ``def`` handler in another process,
as bench.py's ``durable/batch_vs_memory``. After a warm-up, each thread's CPU
(``/proc/<pid>/task/<tid>/schedstat``, ns) is read before and after ``--n`` messages (the
puller has handled the last one, and the pusher has forgotten them all) and reported per
message, in ns (and the system part of it, in clock ticks' worth), for the threads that
used any, and how many of every 1,000 messages stored over them spilled (stayed in the
store only, to be read back: ``durable_spilled``). ``--stall-ms``: the puller is stopped
(SIGSTOP) that long as the measured pushes begin, as a busy machine may hold it up;
``--pace-ms``: the pusher sleeps that long after each ``push_many``. ``--callgrind``: both
run under ``valgrind --tool=callgrind``, instrumented only over the measured messages:
instructions per message per thread (numbered as callgrind numbers them; the pipeline's
batching under valgrind is not the same as without).
With ``DURABLE_CPU_GC=1``, each process tells on stderr the garbage collector's runs
over the measured messages (by generation and thread). With ``DURABLE_CPU_PROFILE=<dir>``, each process writes yappi's profile (CPU clock) of
its busiest threads over the measured messages there; with
``DURABLE_CPU_MAIN_PROFILE=<file>``, the pusher writes cProfile's (thread CPU time) of
its pushing thread.

    PYTHONPATH=. python3 benchmarks/durable_cpu.py --n 200000 --rounds 3 --flavor durable_batch
"""

from __future__ import annotations

import argparse
import functools
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
PAYLOAD = "x" * 45  # {"id": i, "payload": PAYLOAD} packs to 62-64 bytes, as in bench.py
BATCH = 256




def _names() -> str:
    return ",".join(f"{t.native_id}={t.name}" for t in threading.enumerate())


def _profiling() -> Any:
    """yappi, started on SIGUSR1 and stopped on SIGUSR2 (dumped to DURABLE_CPU_PROFILE/<role>)."""
    out = os.environ.get("DURABLE_CPU_PROFILE")
    if not out:
        return None
    import yappi

    yappi.set_clock_type("cpu")
    signal.signal(signal.SIGUSR1, lambda *_: yappi.start(builtins=True))
    signal.signal(signal.SIGUSR2, lambda *_: yappi.stop())
    return out


def _dump_profile(out: str | None, role: str) -> None:
    if not out:
        return
    import yappi

    yappi.stop()
    with open(os.path.join(out, role + ".txt"), "w") as f:
        for thread in yappi.get_thread_stats():
            stats = yappi.get_func_stats(filter={"ctx_id": thread.id})
            total = sum(s.tsub for s in stats)
            if total < 0.05:
                continue
            f.write(f"=== thread {thread.name} {thread.tid} total tsub {total:.3f}s\n")
            stats.sort("tsub").print_all(out=f, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8),
                                                         3: ("ttot", 8)})


class _Collections:
    """With ``DURABLE_CPU_GC=1``: the cyclic garbage collector's runs over the measured
    messages, by generation and thread (count, thread CPU time), told on stderr at the end."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.on = bool(os.environ.get("DURABLE_CPU_GC"))
        self.runs: dict[tuple[int, str], list[int]] = {}  # (generation, thread) -> [count, ns]
        self._started = 0
        self._measuring = False
        if self.on:
            import gc

            gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self._measuring:
            return
        if phase == "start":
            self._started = time.thread_time_ns()
            return
        run = self.runs.setdefault((info["generation"], threading.current_thread().name), [0, 0])
        run[0] += 1
        run[1] += time.thread_time_ns() - self._started

    def measure(self, on: bool) -> None:
        self._measuring = on and self.on

    def tell(self, n: int) -> None:
        for (generation, thread), (count, ns) in sorted(self.runs.items()):
            sys.stderr.write(f"gc {self.role}: generation {generation} on {thread}: {count} runs of {ns / count / 1e3:.0f} us,"
                             f" {ns / n:.0f} ns/msg\n")


def puller(beacon_port: int, mesh: str, warm: int, n: int) -> None:
    """Counts messages; says ``warm`` after ``warm`` of them, ``done`` after ``n`` more."""
    import zmqmesh

    out = _profiling()
    seen = [0]
    warmed, done = threading.Event(), threading.Event()
    collections = _Collections("pull")

    def handle(msg: Any) -> None:
        seen[0] += 1
        if seen[0] == warm:
            collections.measure(True)
            warmed.set()
        elif seen[0] == warm + n:
            done.set()

    node = zmqmesh.Node("cpu-pull", beacon_port=beacon_port, mesh=mesh)
    node.pull(QUEUE, handle, at_least_once=True)
    with node:
        say(f"ready {os.getpid()}")
        warmed.wait(120)
        say(f"warm {_names()}")
        done.wait(600)
        say("done")
        sys.stdin.readline()
        collections.measure(False)
        collections.tell(n)
        _dump_profile(out, "puller")


def pusher(beacon_port: int, mesh: str, warm: int, n: int, flavor: str, pace_ms: float = 0.0) -> None:
    """Pushes ``warm`` messages, then on a line ``n`` more; says ``sent`` and, once the store
    holds none of them (durable), ``forgotten``."""
    import zmqmesh

    out = _profiling()
    collections = _Collections("push")
    store = tempfile.TemporaryDirectory(prefix="durable-cpu-") if flavor != "alo" else None
    options = {"store": store.name} if store is not None else {}
    node = zmqmesh.Node("cpu-push", beacon_port=beacon_port, mesh=mesh, **options)
    with node:
        node.wait_for_pullers(QUEUE, 1, timeout=60)

        def give(lo: int, hi: int) -> None:
            if flavor == "durable_batch":
                for start in range(lo, hi, BATCH):
                    node.push_many(QUEUE, [{"id": i, "payload": PAYLOAD} for i in range(start, min(start + BATCH, hi))],
                                   durable=True)
                    if pace_ms:
                        time.sleep(pace_ms / 1e3)
            else:
                push = functools.partial(node.push, durable=True) if flavor == "durable" else node.push
                for i in range(lo, hi):
                    push(QUEUE, {"id": i, "payload": PAYLOAD})

        give(0, warm)
        say(f"ready {os.getpid()} {_names()}")
        sys.stdin.readline()
        collections.measure(True)
        main_profile = os.environ.get("DURABLE_CPU_MAIN_PROFILE")  # (cProfile of the pushing thread, to this file)
        if main_profile:
            import cProfile

            profiler = cProfile.Profile(time.thread_time)  # (CPU: not the waits for the GIL or a lock)
            profiler.enable()
        stats_before = node.stats()["pipeline"]
        give(warm, warm + n)
        if main_profile:
            profiler.disable()
            profiler.dump_stats(main_profile)
        say(f"sent {_names()}")
        sys.stdin.readline()
        collections.measure(False)
        stats_after = node.stats()["pipeline"]
        say("stored " + " ".join(str(stats_after.get(k, 0) - stats_before.get(k, 0))
                                 for k in ("durable_stored", "durable_spilled")))
        collections.tell(n)
        if collections.on:
            pipeline = node.stats()["pipeline"]
            sys.stderr.write(f"push: durable_stored {pipeline.get('durable_stored')} durable_spilled "
                             f"{pipeline.get('durable_spilled')} (warm-up too)\n")
        _dump_profile(out, "pusher")
    if store is not None:
        store.cleanup()


def _threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (comm, CPU ns, system CPU in clock ticks) of each thread of ``pid``."""
    found = {}
    for tid_s in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid_s}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid_s}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid_s}/stat") as f:
                system = int(f.read().rsplit(")", 1)[1].split()[12])
        except OSError:
            continue
        found[int(tid_s)] = (comm, ns, system)
    return found



def _line(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _named(pid: int, names: str) -> dict[int, str]:
    table = dict(item.split("=", 1) for item in names.split(",") if "=" in item)
    return {int(k): v for k, v in table.items()}


def one_round(args: argparse.Namespace) -> dict[str, float]:
    beacon_port, mesh = free_udp_port(), f"dcpu-{os.getpid()}-{time.monotonic_ns()}"
    me = os.path.abspath(__file__)
    common = ["--beacon-port", str(beacon_port), "--mesh", mesh, "--warm", str(args.warm), "--n", str(args.n)]
    out_dir = tempfile.mkdtemp(prefix="durable-cpu-cg-") if args.callgrind else ""

    def under(role: str) -> list[str]:
        if not args.callgrind:
            return []
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                f"--callgrind-out-file={out_dir}/{role}.out"]

    pull = subprocess.Popen([*under("pull"), sys.executable, me, "--role", "puller", *common], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL if args.callgrind else None)
    push = None
    try:
        pull_pid = int(expect(pull, "ready")[1])
        push = subprocess.Popen([*under("push"), sys.executable, me, "--role", "pusher", "--flavor", args.flavor,
                                 "--pace-ms", str(args.pace_ms), *common], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL if args.callgrind else None)
        _, push_pid_s, push_names = expect(push, "ready")
        push_pid = int(push_pid_s)
        pull_names = expect(pull, "warm")[1]
        time.sleep(0.3)  # (the warm-up's acknowledgements settle)
        if os.environ.get("DURABLE_CPU_PROFILE"):
            os.kill(push_pid, signal.SIGUSR1)
            os.kill(pull_pid, signal.SIGUSR1)
            time.sleep(0.2)
        if args.callgrind:
            callgrind_control("-i", "on", push_pid)
            callgrind_control("-i", "on", pull_pid)
        before = {"push": _threads(push_pid), "pull": _threads(pull_pid)}
        _line(push)
        if args.stall_ms:  # (the puller stopped a while as the measured pushes begin: the pusher gets ahead)
            os.kill(pull_pid, signal.SIGSTOP)
            time.sleep(args.stall_ms / 1e3)
            os.kill(pull_pid, signal.SIGCONT)
        push_names = expect(push, "sent")[1]
        expect(pull, "done")
        time.sleep(1.0 if args.callgrind else 0.15)  # (the pusher forgets what was acknowledged within 50 ms)
        after = {"push": _threads(push_pid), "pull": _threads(pull_pid)}
        if args.callgrind:
            callgrind_control("-d", push_pid)
            callgrind_control("-d", pull_pid)
        names = {"push": _named(push_pid, push_names), "pull": _named(pull_pid, pull_names)}
        result: dict[str, float] = {}
        for side in ("push", "pull"):
            total = 0
            tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
            for tid, (comm, ns, system) in after[side].items():
                was = before[side].get(tid, (comm, 0, 0))
                used = ns - was[1]
                if used <= 0:
                    continue
                total += used
                label = f"{side}:{names[side].get(tid, comm)}"
                result[label] = result.get(label, 0.0) + used / args.n
                result[label + " (sys)"] = result.get(label + " (sys)", 0.0) + (system - was[2]) * tick_ns / args.n
            result[f"{side}:TOTAL"] = total / args.n
        _line(push)
        _, stored_s, spilled_s = expect(push, "stored")
        result["push:spilled (of 1000 msgs)"] = 1000 * int(spilled_s) / max(1, int(stored_s))
        _line(pull)
        push.wait(120)
        pull.wait(120)
        if args.callgrind:
            for side in ("push", "pull"):
                counts = _instructions(out_dir, side)
                for number, count in counts.items():
                    result[f"{side}:instr thread {number}"] = count / args.n
                result[f"{side}:instr TOTAL"] = sum(counts.values()) / args.n
        if args.keep:
            say(f"callgrind's dumps kept in {out_dir}")
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
        return result
    finally:
        for proc in (push, pull):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()



def _instructions(out_dir: str, role: str) -> dict[str, int]:
    """Thread number -> the instructions callgrind counted on it over the measured messages."""
    return callgrind_counts(f"{out_dir}/{role}.out.1-*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="main", choices=["main", "puller", "pusher"])
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--flavor", default="durable_batch", choices=["durable_batch", "durable", "alo"])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--warm", type=int, default=20_480)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stall-ms", type=float, default=0.0, help="stop the puller (SIGSTOP) this long as the "
                        "measured pushes begin, as a busy machine may: the pusher gets ahead of it")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="durable_batch: sleep this long after each "
                        "push_many (a steady producer slower than its puller)")
    parser.add_argument("--callgrind", action="store_true", help="run both under valgrind --tool=callgrind: "
                        "instructions per message, per thread (numbered as callgrind numbers them)")
    parser.add_argument("--keep", action="store_true", help="with --callgrind: keep the dumps (for callgrind_annotate)")
    args = parser.parse_args()
    if args.role == "puller":
        puller(args.beacon_port, args.mesh, args.warm, args.n)
        return
    if args.role == "pusher":
        pusher(args.beacon_port, args.mesh, args.warm, args.n, args.flavor, args.pace_ms)
        return
    rounds = [one_round(args) for _ in range(args.rounds)]
    labels = sorted({k for r in rounds for k in r}, key=lambda k: (k.split(":")[0], -max(r.get(k, 0) for r in rounds)))
    for label in labels:
        values = sorted(r.get(label, 0.0) for r in rounds)
        if values[-1] < 20 and "spilled" not in label:
            continue
        unit = "instr/msg" if "instr" in label else "" if "spilled" in label else "ns/msg"
        say(f"{label:45s} median {values[len(values) // 2]:8.0f} {unit:9s} rounds {' '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
