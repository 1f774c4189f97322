"""Mesh benchmark: formation, crash detection, idle cost of N node processes, zmqmesh vs pyre.

    python3 benchmarks/mesh_bench.py                       # 16 nodes, 3 repetitions, with pyre
    python3 benchmarks/mesh_bench.py --nodes 16 --repeat 3 --no-pyre --idle-seconds 10

Per repetition, for each implementation, N node processes (``_mesh_node.py``) are spawned
and the parent parses the lines they print (wall-clock times; one host, one clock):

1. formation: (a) from spawn - t0 is taken just before the first process is spawned, until
   every process has seen N-1 peers; (b) from last start - from the moment the last node's
   ``start()`` returned (time reported by that process) until every process has seen N-1;
2. idle cost: after formation and a short settle, utime+stime from /proc/PID/stat over
   ``--idle-seconds``, as % of one CPU, and VmRSS from /proc/PID/status (median over nodes);
3. SIGKILL-to-leave: one node is SIGKILLed; the time until each other node reports its
   departure (median and max over the N-1 observers).

Every figure is repeated (``--repeat``) and reported as median [min-max] over repetitions,
in a table and as JSON lines (``{"kind": "sample"|"summary", ...}``).

Network hygiene: zmqmesh nodes stay on loopback (their default) with a fresh UDP beacon port
and a fresh mesh name per repetition. pyre cannot beacon on loopback, so its part re-executes
this script under ``unshare -n`` (a private network namespace holding only a veth pair
zre0<->zre0p, 10.77.0.1/24) and runs its nodes there; it refuses to run in a namespace with
any other interface. If ``unshare`` is not possible, pyre is skipped and the reason printed.
pyre notices a SIGKILLed peer only at its 30 s expiry, so that figure is measured once
(bounded at 45 s) unless ``--pyre-kill-repeat`` asks for more.

Bytecode: pyre is installed with compiled ``.pyc`` files, as pip installs every package. An
editable zmqmesh checkout has none, and where PYTHONDONTWRITEBYTECODE is set every node
process would compile zmqmesh from source, which costs time and about 2 MiB of RSS per
process. By default (``--bytecode compiled``) the benchmark therefore compiles zmqmesh's
``.pyc`` files first, as an installed package has them (removing the ones it created at the
end); ``--bytecode source`` writes none first, which measures the uncompiled case only in
a checkout that has none (where some are there, the nodes load them).

Every wait is bounded; every process started is killed in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _bench_proc import free_udp_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns  # noqa: E402  (tests/netns.py: the veth pyre needs)

HERE = Path(__file__).resolve().parent
NODE_SCRIPT = HERE / "_mesh_node.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PYRE_IFACE = "zre0"
PYRE_ADDRESS = "10.77.0.1"
PYRE_BEACON_PORT = 5670
ALLOWED_IFACES = {"lo", "zre0", "zre0p"}

# key, label, unit, zmqmesh target (<=) or None, pyre reference measured earlier here
METRICS = [
    ("form_spawn_s", "formation from spawn", "s", 1.0, 1.6),
    ("form_last_start_s", "formation from last start()", "s", 0.15, 0.1),
    ("spawn_to_last_start_s", "  (spawn -> last start() done)", "s", None, None),
    ("kill_leave_median_s", "SIGKILL->leave, median of observers", "s", 1.0, 30.0),
    ("kill_leave_max_s", "SIGKILL->leave, max of observers", "s", 1.0, 30.0),
    ("idle_cpu_pct", "idle CPU per node (median)", "%", 0.3, 0.3),
    ("idle_cpu_max_pct", "  (idle CPU, busiest node)", "%", None, None),
    ("rss_mib", "RSS per node (median)", "MiB", 25.0, 20.0),
    ("pss_mib", "  (PSS per node: shared libs split)", "MiB", None, None),
    ("background_cpu_before_pct", "other processes' CPU before the rep", "%cpu", None, None),
    ("background_cpu_pct", "other processes' CPU during idle window", "%cpu", None, None),
]


def progress(*parts: object) -> None:
    """Progress goes to stderr; stdout carries the table and JSON lines only."""
    sys.stderr.write(" ".join(str(p) for p in parts) + "\n")
    sys.stderr.flush()



# -- node processes -----------------------------------------------------------------------------


@dataclass
class NodeProc:
    index: int
    name: str
    popen: subprocess.Popen
    buf: bytes = b""
    tail: list[str] = field(default_factory=list)
    boot: float | None = None
    started: float | None = None
    full: float | None = None
    peers: set[str] = field(default_factory=set)
    left: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    eof: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def handle(self, line: str) -> None:
        self.tail = (self.tail + [line])[-20:]
        parts = line.split()
        if not parts:
            return
        kind = parts[0]
        try:
            if kind == "BOOT":
                self.boot = float(parts[1])
            elif kind == "STARTED":
                self.started = float(parts[1])
            elif kind == "JOIN":
                self.peers.add(parts[1])
            elif kind == "FULL":
                self.full = float(parts[1])
            elif kind == "LEFT":
                self.peers.discard(parts[1])
                self.left.setdefault(parts[1], float(parts[2]))
            elif kind == "ERROR":
                self.error = line
        except (IndexError, ValueError):
            pass


class NodeGroup:
    """N node processes, their output read by one selector in this thread."""

    def __init__(self) -> None:
        self.nodes: list[NodeProc] = []
        self.sel = selectors.DefaultSelector()

    def spawn(self, index: int, name: str, argv: list[str]) -> NodeProc:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=str(HERE),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        node = NodeProc(index, name, popen)
        os.set_blocking(popen.stdout.fileno(), False)
        self.sel.register(popen.stdout, selectors.EVENT_READ, node)
        self.nodes.append(node)
        return node

    def pump(self, timeout: float) -> None:
        """Read whatever the nodes printed within ``timeout`` seconds."""
        for key, _ in self.sel.select(max(timeout, 0)):
            node: NodeProc = key.data
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                node.eof = True
                self.sel.unregister(key.fileobj)
                continue
            node.buf += data
            *lines, node.buf = node.buf.split(b"\n")
            for raw in lines:
                node.handle(raw.decode("utf-8", "replace").strip())

    def wait_for(self, condition, timeout: float) -> bool:
        """Pump until ``condition()`` holds; False at ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not self.sel.get_map():
                time.sleep(min(left, 0.05))
            self.pump(min(left, 0.2))
        return True

    def kill_one(self, node: NodeProc) -> float:
        """SIGKILL ``node``; returns the wall-clock moment just before the signal."""
        t = time.time()
        os.kill(node.pid, signal.SIGKILL)
        try:
            node.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return t

    def close(self, grace: float = 3.0) -> None:
        """Ask every node to stop (close its stdin), wait ``grace`` s, SIGKILL the rest."""
        for node in self.nodes:
            try:
                if node.popen.stdin and not node.popen.stdin.closed:
                    node.popen.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(n.popen.poll() is None for n in self.nodes):
            self.pump(0.05)  # keep draining their pipes so none blocks on a write
        for node in self.nodes:
            if node.popen.poll() is None:
                try:
                    node.popen.kill()
                except OSError:
                    pass
        for node in self.nodes:
            try:
                node.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            if node.popen.stdout:
                try:
                    self.sel.unregister(node.popen.stdout)
                except (KeyError, ValueError):
                    pass
                node.popen.stdout.close()
        self.sel.close()


def cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of the line)


def _proc_kib(path: str, key: str) -> float | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mib(pid: int) -> float | None:
    """VmRSS: resident memory, shared library pages counted in full."""
    return _proc_kib(f"/proc/{pid}/status", "VmRSS:")


def pss_mib(pid: int) -> float | None:
    """Pss: resident memory with shared pages divided among the processes sharing them."""
    return _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:")


def machine_busy_ticks() -> int | None:
    """Busy clock ticks of all CPUs since boot (/proc/stat: everything but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def wait_for_quiet(limit_s: float, threshold_pct: float = 25.0) -> float | None:
    """Wait (up to ``limit_s``) until the rest of the machine has used under ``threshold_pct`` % of
    one CPU for 2 s in a row; returns the last 1 s reading. Other jobs skew every figure here."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    reading = None
    while True:
        a, t = machine_busy_ticks(), time.monotonic()
        time.sleep(1.0)
        b = machine_busy_ticks()
        if a is None or b is None:
            return None
        reading = 100.0 * (b - a) / CLK_TCK / (time.monotonic() - t)
        quiet = quiet + 1 if reading < threshold_pct else 0
        if quiet >= 2 or time.monotonic() >= deadline:
            return reading


# -- one repetition -----------------------------------------------------------------------------


def node_argv(impl: str, name: str, n: int, port: int, where: str, options: str = "") -> list[str]:
    argv = [sys.executable, "-u", str(NODE_SCRIPT), impl, name, str(n - 1), str(port), where]
    return argv + [options] if options else argv


def run_repetition(impl: str, rep: int, args, kill: bool, kill_bound: float) -> list[dict]:
    """Spawn, form, idle, kill; returns sample records. Every wait bounded, all killed at the end."""
    n = args.nodes
    if impl == "zmqmesh":
        port = free_udp_port()
        where = f"bench-{os.getpid()}-{rep}-{uuid.uuid4().hex[:8]}"  # unique mesh name
    else:
        port, where = PYRE_BEACON_PORT, PYRE_IFACE
    samples: list[dict] = []

    def sample(metric: str, value: float | None, **extra: object) -> None:
        record = {"kind": "sample", "impl": impl, "metric": metric, "rep": rep, "value": value, **extra}
        samples.append(record)
        if args.emit is not None:  # the pyre run streams its figures to the parent as they come
            args.emit(record)

    if args.quiet_wait > 0:
        before = wait_for_quiet(args.quiet_wait)
        if before is not None:
            sample("background_cpu_before_pct", before)
            if before >= 25.0:
                progress(f"[{impl} rep {rep}] machine still busy ({before:.0f} % of a CPU used by others) "
                         f"after waiting {args.quiet_wait:g} s; measuring anyway")
    group = NodeGroup()
    try:
        t0 = time.time()
        for i in range(n):
            group.spawn(i, f"n{i:02d}", node_argv(impl, f"n{i:02d}", n, port, where,
                                                  args.zmqmesh_options if impl == "zmqmesh" else ""))
        formed = group.wait_for(
            lambda: all(p.full is not None and p.started is not None for p in group.nodes)
            or any(p.error or p.eof for p in group.nodes),
            args.form_timeout,
        )
        if not formed or not all(p.full is not None and p.started is not None for p in group.nodes):
            counts = sorted(len(p.peers) for p in group.nodes)
            bad = next((p for p in group.nodes if p.error or p.eof), None)
            booted = sum(p.boot is not None for p in group.nodes)
            started = sum(p.started is not None for p in group.nodes)
            why = f"{booted}/{n} booted, {started}/{n} started, peer counts {counts}"
            if bad is not None:
                why += f"; {bad.name} died: " + " | ".join(bad.tail[-5:])
            progress(f"[{impl} rep {rep}] formation FAILED within {args.form_timeout} s: {why}")
            sample("form_spawn_s", None, error=f"no full mesh within {args.form_timeout} s: {why}")
            return samples
        t_full = max(p.full for p in group.nodes)
        last_start = max(p.started for p in group.nodes)
        sample("form_spawn_s", t_full - t0)
        sample("form_last_start_s", t_full - last_start)
        sample("spawn_to_last_start_s", last_start - t0, first_boot_s=min(p.boot for p in group.nodes) - t0,
               last_boot_s=max(p.boot for p in group.nodes) - t0)
        progress(f"[{impl} rep {rep}] full mesh: {t_full - t0:.3f} s from spawn, "
                 f"{t_full - last_start:.3f} s from last start (last start at {last_start - t0:.3f} s)")

        # idle cost
        group.wait_for(lambda: False, args.settle)
        busy_a, self_a = machine_busy_ticks(), cpu_ticks(os.getpid())
        before = {p.pid: cpu_ticks(p.pid) for p in group.nodes}
        t_a = time.monotonic()
        group.wait_for(lambda: False, args.idle_seconds)
        elapsed = time.monotonic() - t_a
        after = {p.pid: cpu_ticks(p.pid) for p in group.nodes}
        busy_b, self_b = machine_busy_ticks(), cpu_ticks(os.getpid())
        if None not in (busy_a, busy_b, self_a, self_b):
            ours = (self_b - self_a) + sum(after[pid] - before[pid] for pid in before
                                           if before[pid] is not None and after[pid] is not None)
            # what the rest of the machine burned meanwhile: contention that can skew every figure
            sample("background_cpu_pct", max(0.0, 100.0 * (busy_b - busy_a - ours) / CLK_TCK / elapsed))
        cpu = [100.0 * (after[pid] - before[pid]) / CLK_TCK / elapsed
               for pid in before if before[pid] is not None and after[pid] is not None]
        rss = [r for r in (rss_mib(p.pid) for p in group.nodes) if r is not None]
        pss = [r for r in (pss_mib(p.pid) for p in group.nodes) if r is not None]
        churn = sum(len(p.left) for p in group.nodes)
        if cpu:
            sample("idle_cpu_pct", statistics.median(cpu), nodes=len(cpu), window_s=round(elapsed, 2),
                   tick_resolution_pct=round(100.0 / CLK_TCK / elapsed, 3))
            sample("idle_cpu_max_pct", max(cpu))
        if rss:
            sample("rss_mib", statistics.median(rss), min=min(rss), max=max(rss))
        if pss:
            sample("pss_mib", statistics.median(pss), min=min(pss), max=max(pss))
        if cpu and rss:
            progress(f"[{impl} rep {rep}] idle {elapsed:.1f} s: CPU median {statistics.median(cpu):.2f} % "
                     f"(max {max(cpu):.2f}), RSS median {statistics.median(rss):.1f} MiB")
        if churn:
            progress(f"[{impl} rep {rep}] WARNING: {churn} spurious departures reported before the kill")
            sample("spurious_departures", churn)

        if kill:
            victim = group.nodes[(n // 2 + rep) % n]
            observers = [p for p in group.nodes if p is not victim and p.popen.poll() is None]
            for p in observers:  # only departures after the kill count
                p.left.pop(victim.name, None)
            t_kill = group.kill_one(victim)
            group.wait_for(lambda: all(victim.name in p.left for p in observers), kill_bound)
            seen = [p.left[victim.name] - t_kill for p in observers if victim.name in p.left]
            extra = {"victim": victim.name, "observers": len(observers), "observers_seen": len(seen),
                     "bound_s": kill_bound}
            if len(seen) == len(observers):
                sample("kill_leave_median_s", statistics.median(seen), **extra)
                sample("kill_leave_max_s", max(seen), **extra)
                progress(f"[{impl} rep {rep}] SIGKILL {victim.name}: median {statistics.median(seen):.3f} s, "
                         f"max {max(seen):.3f} s over {len(seen)} observers")
            else:
                sample("kill_leave_median_s", statistics.median(seen) if len(seen) * 2 > len(observers) else None,
                       **extra)
                sample("kill_leave_max_s", None, **extra)
                progress(f"[{impl} rep {rep}] SIGKILL {victim.name}: only {len(seen)}/{len(observers)} "
                         f"observers reported it within {kill_bound} s")
        return samples
    finally:
        group.close()


@contextlib.contextmanager
def compiled_zmqmesh(enabled: bool = True) -> Iterator[None]:
    """Within it, zmqmesh has the .pyc files an installed package has: written on entry,
    those written removed on exit (also on an exception). Files that cannot be written (a
    read-only checkout) are said on stderr; the nodes then compile what is missing, as
    they would have. ``enabled=False``: nothing is written, nothing removed."""
    import compileall
    import importlib.util

    import zmqmesh

    if not enabled:
        yield
        return
    package = Path(zmqmesh.__file__).parent
    caches = [Path(importlib.util.cache_from_source(str(src))) for src in sorted(package.rglob("*.py"))]
    there = {pyc for pyc in caches if pyc.exists()}
    try:
        try:
            complete = compileall.compile_dir(str(package), quiet=2)
        except OSError as exc:
            complete = False
            progress(f"compiling {package}: {exc}")
        if not complete:
            progress(f"could not write every .pyc file of {package}: the nodes compile what is missing")
        yield
    finally:
        for pyc in caches:
            if pyc not in there:
                pyc.unlink(missing_ok=True)


def run_impl(impl: str, args) -> list[dict]:
    samples: list[dict] = []
    for rep in range(1, args.repeat + 1):
        if impl == "pyre":
            kill = rep <= args.pyre_kill_repeat
            bound = args.pyre_kill_bound
        else:
            kill, bound = True, args.kill_bound
        samples += run_repetition(impl, rep, args, kill, bound)
    return samples


# -- pyre in a private network namespace -------------------------------------------------------


def interface_names() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def pyre_inner(args) -> int:
    """Runs under ``unshare -n``: build the veth, run pyre, print ``RESULT <json>`` lines."""

    def result(record: dict) -> None:
        sys.stdout.write("RESULT " + json.dumps(record) + "\n")
        sys.stdout.flush()

    names = interface_names()
    if names != {"lo"}:
        # Only ever configure a FRESH namespace: pyre broadcasts must not reach a real network.
        result({"kind": "skip", "reason": f"refusing: namespace is not fresh (interfaces {sorted(names)})"})
        return 3
    try:
        netns.add_veth_here(PYRE_ADDRESS, PYRE_IFACE)
    except netns.LabError as exc:
        result({"kind": "skip", "reason": str(exc)})
        return 4
    names = interface_names()
    if not names <= ALLOWED_IFACES or PYRE_IFACE not in names:
        result({"kind": "skip", "reason": f"unexpected interfaces after setup: {sorted(names)}"})
        return 3
    try:
        import pyre  # noqa: F401  (only to report its version / absence)
        from importlib.metadata import version

        try:
            result({"kind": "version", "impl": "pyre", "version": version("colmena-zeromq-pyre")})
        except Exception:
            pass
    except ImportError as exc:
        result({"kind": "skip", "reason": f"pyre not importable: {exc}"})
        return 5
    args.emit = result
    run_impl("pyre", args)
    return 0


def inner_budget(args) -> float:
    per_rep = args.form_timeout + args.settle + args.idle_seconds + args.quiet_wait + 15
    return args.repeat * per_rep + args.pyre_kill_repeat * args.pyre_kill_bound + 30


def run_pyre_outer(args) -> tuple[list[dict], str | None, str | None]:
    """Re-execute this script under ``unshare -n``; returns (samples, version, skip reason)."""
    if not sys.platform.startswith("linux"):
        return [], None, "not Linux (needs unshare -n)"
    argv = [
        "unshare", "-n", "--", sys.executable, "-u", str(Path(__file__).resolve()), "--pyre-inner",
        "--nodes", str(args.nodes), "--repeat", str(args.repeat), "--idle-seconds", str(args.idle_seconds),
        "--settle", str(args.settle), "--quiet-wait", str(args.quiet_wait), "--form-timeout", str(args.form_timeout),
        "--pyre-kill-repeat", str(args.pyre_kill_repeat), "--pyre-kill-bound", str(args.pyre_kill_bound),
    ]
    budget = inner_budget(args)
    samples: list[dict] = []
    version = skip = None
    other: list[str] = []
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # own process group: everything below it dies with it
    except OSError as exc:
        return [], None, f"cannot run unshare: {exc}"
    sel = selectors.DefaultSelector()
    try:
        bufs = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + budget
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                *lines, bufs[key.fd] = (bufs[key.fd] + data).split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("RESULT "):
                        record = json.loads(line[7:])
                        if record["kind"] == "sample":
                            samples.append(record)
                        elif record["kind"] == "version":
                            version = record["version"]
                        elif record["kind"] == "skip":
                            skip = record["reason"]
                    elif key.fd == proc.stderr.fileno() and line.startswith("[pyre"):
                        progress(line)
                    elif line.strip():
                        other.append(line)
        if sel.get_map():
            skip = skip or f"pyre run exceeded its {budget:.0f} s budget (killed)"
    finally:
        sel.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # before reaping: the group id cannot be reused yet
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        proc.stdout.close()
        proc.stderr.close()
    if not samples and skip is None:
        skip = (f"unshare -n failed (exit {proc.returncode}): " + " | ".join(other[-3:])) if other \
            else f"pyre run produced no figures (exit {proc.returncode})"
    return samples, version, skip


# -- report -----------------------------------------------------------------------------------


def summarize(samples: list[dict], impl: str, metric: str) -> dict | None:
    rows = [s for s in samples if s["impl"] == impl and s["metric"] == metric]
    if not rows:
        return None
    values = [s["value"] for s in rows if s["value"] is not None]
    out = {"kind": "summary", "impl": impl, "metric": metric, "n": len(values), "runs": len(rows)}
    if values:
        out.update(median=statistics.median(values), min=min(values), max=max(values))
    failed = [s for s in rows if s["value"] is None]
    if failed:
        out["incomplete"] = len(failed)
        bound = failed[0].get("bound_s")
        if bound:
            out["note"] = f"{len(failed)} run(s) not complete within {bound} s"
        elif failed[0].get("error"):
            out["note"] = failed[0]["error"]
    return out


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if unit == "%":
        return f"{value:.2f}"
    if unit == "%cpu":
        return f"{value:.0f}"
    return f"{value:.1f}"


def cell(summary: dict | None, unit: str) -> str:
    if summary is None:
        return "n/a"
    if summary["n"] == 0:
        note = summary.get("note", "no value")
        return "FAILED (" + (note if len(note) <= 40 else note[:37] + "...") + ")"
    text = fmt(summary["median"], unit)
    if summary["n"] > 1:
        text += f" [{fmt(summary['min'], unit)}-{fmt(summary['max'], unit)}]"
    text += f" n={summary['n']}"
    if summary.get("incomplete"):
        text += f" (+{summary['incomplete']} incomplete)"
    return text


def report(samples: list[dict], args, pyre_status: str, versions: dict[str, str], elapsed: float) -> int:
    summaries = []
    rows = []
    failures = 0
    for key, label, unit, target, ref in METRICS:
        z = summarize(samples, "zmqmesh", key)
        p = summarize(samples, "pyre", key)
        for s in (z, p):
            if s is not None:
                if s["impl"] == "zmqmesh" and target is not None:
                    s["target_max"] = target
                    s["pass"] = bool(s["n"]) and s["median"] <= target and not s.get("incomplete")
                summaries.append(s)
        verdict = ""
        if target is not None:
            if z is None:
                verdict = "-"
            elif z["n"] == 0 or z.get("incomplete"):
                verdict, failures = "FAIL", failures + 1
            elif z["median"] <= target:
                verdict = "PASS" if z["max"] <= target else "PASS (worst rep over)"
            else:
                verdict, failures = "FAIL", failures + 1
        rows.append([
            f"{label} ({unit})",
            cell(z, unit),
            f"<= {fmt(target, unit)}" if target is not None else "",
            verdict,
            cell(p, unit) if pyre_status.startswith("ran") else "",
            fmt(ref, unit) if ref is not None else "",
        ])
    header = ["metric", "zmqmesh median [min-max]", "target", "zmqmesh", "pyre median [min-max]", "pyre ref"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    print()
    print(f"mesh benchmark: {args.nodes} node processes, {args.repeat} repetitions, idle window "
          f"{args.idle_seconds:g} s, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print()
    print("notes: values are median [min-max] over repetitions; SIGKILL->leave per repetition is the")
    print("       median / max over the other nodes; idle CPU is % of one core from /proc utime+stime,")
    print(f"       resolution {100.0 / CLK_TCK / args.idle_seconds:.2f} % at {CLK_TCK} ticks/s over "
          f"{args.idle_seconds:g} s. pyre ref = figures measured earlier on this machine.")
    if pyre_status.startswith("ran"):
        n_kill = sum(1 for s in samples if s["impl"] == "pyre" and s["metric"] == "kill_leave_max_s")
        print(f"       pyre: run in a private netns (unshare -n, veth zre0); SIGKILL->leave measured "
              f"{n_kill} time(s), bounded at {args.pyre_kill_bound:g} s (pyre expires silent peers after 30 s; "
              f"--pyre-kill-repeat N to repeat)." + (f" {pyre_status[3:].strip()}" if pyre_status != "ran" else ""))
    else:
        print(f"       pyre: {pyre_status}")
    if args.zmqmesh_options:
        print(f"       zmqmesh nodes ran with non-default options {args.zmqmesh_options}")
    print("       zmqmesh bytecode: " + ("compiled .pyc files, as installed (--bytecode source: without)"
                                         if args.bytecode == "compiled" else "none: every node compiled zmqmesh from source"))
    loads = [s["value"] for s in samples if s["metric"] == "background_cpu_pct" and s["value"] is not None]
    if loads:
        print(f"       other processes on this machine used {min(loads):.0f}-{max(loads):.0f} % of one CPU during "
              f"the idle windows (of {100 * (os.cpu_count() or 1)} %); above a few % they compete with the nodes.")
    print(f"       total run time {elapsed:.1f} s; zmqmesh targets: {failures} failed")
    print()
    for s in samples:
        print(json.dumps(s))
    for s in summaries:
        print(json.dumps(s))
    print(json.dumps({"kind": "run", "nodes": args.nodes, "repeat": args.repeat, "idle_seconds": args.idle_seconds,
                      "zmqmesh_options": json.loads(args.zmqmesh_options or "{}"), "bytecode": args.bytecode,
                      "pyre": pyre_status, "versions": versions, "elapsed_s": round(elapsed, 1),
                      "zmqmesh_targets_failed": failures}))
    sys.stdout.flush()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=16, help="node processes per mesh (default 16)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every figure (default 3)")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (default 10 s)")
    ap.add_argument("--settle", type=float, default=1.0, help="wait after formation before idle window (s)")
    ap.add_argument("--form-timeout", type=float, default=20.0, help="bound on mesh formation (s)")
    ap.add_argument("--kill-bound", type=float, default=5.0, help="bound on zmqmesh SIGKILL detection (s)")
    ap.add_argument("--zmqmesh-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra zmqmesh NodeConfig option for the nodes, VALUE as JSON (repeatable; "
                         "e.g. heartbeat_interval_s=2); printed with the results")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each repetition wait up to this long for other processes to go quiet (0: don't)")
    ap.add_argument("--no-pyre", action="store_true", help="skip the pyre comparison")
    ap.add_argument("--bytecode", choices=("compiled", "source"), default="compiled",
                    help="compiled (default): zmqmesh's .pyc files are written first, as installed; "
                         "source: none are written first (the nodes load those there are, and compile the rest)")
    ap.add_argument("--no-zmqmesh", action="store_true", help="skip zmqmesh (pyre only)")
    ap.add_argument("--pyre-kill-repeat", type=int, default=1,
                    help="repetitions in which pyre's (~30 s) SIGKILL detection is measured (default 1)")
    ap.add_argument("--pyre-kill-bound", type=float, default=45.0, help="bound on pyre SIGKILL detection (s)")
    ap.add_argument("--pyre-inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nodes < 2 or args.repeat < 1 or args.idle_seconds <= 0:
        ap.error("need --nodes >= 2, --repeat >= 1, --idle-seconds > 0")
    args.pyre_kill_repeat = max(0, min(args.pyre_kill_repeat, args.repeat))
    args.emit = None
    options = {}
    for item in args.zmqmesh_option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            ap.error(f"--zmqmesh-option wants KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    args.zmqmesh_options = json.dumps(options, separators=(",", ":")) if options else ""

    if args.pyre_inner:
        return pyre_inner(args)

    started = time.monotonic()
    samples: list[dict] = []
    versions: dict[str, str] = {}
    try:
        import zmqmesh

        versions["zmqmesh"] = zmqmesh.__version__
    except ImportError as exc:
        progress(f"zmqmesh not importable: {exc}")
        args.no_zmqmesh = True
    if not args.no_zmqmesh:
        progress(f"zmqmesh: {args.nodes} nodes x {args.repeat} repetitions on loopback, bytecode {args.bytecode}")
        with compiled_zmqmesh(args.bytecode == "compiled"):
            samples += run_impl("zmqmesh", args)
    if args.no_pyre:
        pyre_status = "skipped (--no-pyre)"
    else:
        progress(f"pyre: {args.nodes} nodes x {args.repeat} repetitions in a private netns "
                 f"(budget {inner_budget(args):.0f} s)")
        pyre_samples, version, skip = run_pyre_outer(args)
        samples += pyre_samples
        if version:
            versions["pyre"] = version
        if pyre_samples:
            pyre_status = "ran" + (f" (incomplete: {skip})" if skip else "")
            if skip:
                progress(f"pyre: {skip}")
        else:
            pyre_status = f"SKIPPED: {skip}"
            progress(f"pyre skipped: {skip}")
    return report(samples, args, pyre_status, versions, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
