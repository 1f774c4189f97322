"""Churn: one long-lived node among thousands of short-lived peers. Does its state stay
bounded by the peers present, not grow with every peer it has ever seen?

The long-lived node ("hub", in this process) offers ``hub.echo``, pulls ``jobs`` (plain)
and ``orders`` (at least once, ``dedupe=True``, with a store), publishes ``news.hub.*``
with ``history=``, subscribes to ``news.`` three times (live, ``replay="all"`` and a
``durable_name``), keeps ``kept``, and calls the peers' ``peer.echo`` with `submit` (one
peer named) and `request_many`. Peer processes (``_churn_peer.py``, several nodes each,
a new peer id each round) join, use every pattern towards it, and leave: politely, or
SIGKILLed by this harness.

Every ``--sample-s`` seconds, and once more after the peers are gone, it samples the hub:
RSS, file descriptors, threads, the ``len()`` of every dict/set/deque/list reachable from
the node by attribute path (``[*]``: summed over a container's items), the number of
live objects of each zmqmesh (and zmq) class (``gc``), the sizes within ``stats()``, and
the row count of each table of the hub's store. At the end it lists what grew with
the peers ever seen, and whether it shrank back once they left.

    python3 benchmarks/churn.py --duration 480 --out /tmp/churn.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "_churn_peer.py"
_CONTAINERS = (dict, set, frozenset, list, collections.deque)
_PEER_ID = re.compile(r"^[0-9a-f]{32}$")


# -- sampling --------------------------------------------------------------------------------


def container_sizes(roots: dict[str, Any], depth: int = 7) -> tuple[dict[str, int], dict[str, int]]:
    """``len()`` of every container reachable from ``roots`` through the attributes of
    zmqmesh objects and container items, by path (a container's items: ``[*]``, their
    sizes summed), each object counted once; and the bytes each path holds (`sys.getsizeof`
    of the container, of its keys, and of its items that are no container or zmqmesh
    object: a lower bound, to rank them)."""
    sizes: dict[str, int] = collections.defaultdict(int)
    held: dict[str, int] = collections.defaultdict(int)
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [(name, obj, 0) for name, obj in roots.items()]
    while stack:
        path, obj, level = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, bytearray, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, _CONTAINERS):
            sizes[path] += len(obj)
            try:
                items = list(obj.values() if isinstance(obj, dict) else obj)
                keys = list(obj) if isinstance(obj, dict) else []
            except RuntimeError:  # changed by another thread meanwhile: next sample
                continue
            held[path] += sys.getsizeof(obj) + sum(_scalar_bytes(k) for k in keys) + \
                sum(_scalar_bytes(i) for i in items)
            if level < depth:
                stack.extend((f"{path}[*]", item, level + 1) for item in items)
            continue
        held[path] += sys.getsizeof(obj) + sys.getsizeof(getattr(obj, "__dict__", None) or 0)
        module = type(obj).__dict__.get("__module__")
        if level >= depth or not (isinstance(module, str) and module.startswith("zmqmesh")):
            continue
        for name, value in _attributes(obj):
            stack.append((f"{path}.{name}", value, level + 1))
    return dict(sizes), dict(held)


def _scalar_bytes(value: Any) -> int:
    if isinstance(value, (str, bytes, int, float)):
        return sys.getsizeof(value)
    if isinstance(value, tuple):
        return sys.getsizeof(value) + sum(_scalar_bytes(v) for v in value)
    return 0


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    found = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in found and hasattr(obj, slot):
                found[slot] = getattr(obj, slot)
    return list(found.items())


def live_objects() -> dict[str, int]:
    """Live objects per class, for zmqmesh's and zmq's classes (and futures)."""
    counts: dict[str, int] = collections.Counter()
    for obj in gc.get_objects():
        module = type(obj).__dict__.get("__module__")
        if isinstance(module, str) and module.startswith(("zmqmesh", "zmq", "concurrent.futures")):
            counts[f"{module}.{type(obj).__qualname__}"] += 1
    return dict(counts)


def stats_sizes(stats: Any, path: str = "stats") -> dict[str, int]:
    """The number of entries of every dict within ``stats()``, by path (peer ids as ``<id>``)."""
    sizes: dict[str, int] = collections.defaultdict(int)
    if isinstance(stats, dict):
        sizes[path] += len(stats)
        for key, value in stats.items():
            name = "<id>" if isinstance(key, str) and _PEER_ID.match(key) else str(key)
            for sub, n in stats_sizes(value, f"{path}.{name}").items():
                sizes[sub] += n
    elif isinstance(stats, list):
        sizes[path] += len(stats)
    return dict(sizes)


def store_rows(store_dir: str) -> dict[str, int]:
    """Rows per table of every SQLite database in ``store_dir``, read only."""
    rows: dict[str, int] = {}
    for db in sorted(Path(store_dir).glob("*")):
        if db.suffix in (".db", ".sqlite", ".sqlite3") or db.name.endswith(".db"):
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                    rows[f"{db.name}:{table}"] = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            finally:
                conn.close()
    return rows


_TCP_STATES = {"01": "established", "02": "syn_sent", "06": "time_wait", "07": "close", "08": "close_wait",
               "0A": "listen", "04": "fin_wait1", "05": "fin_wait2", "09": "last_ack"}


def process_sizes() -> dict[str, int]:
    """This process's RSS (kB), threads, open file descriptors, and those by kind
    (``fds:socket``, ``fds:anon_inode:[eventfd]``, ...; its TCP sockets by state:
    ``tcp:established``, ``tcp:syn_sent``, ...)."""
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    sizes = collections.Counter({"rss_kb": rss, "threads": len(os.listdir("/proc/self/task"))})
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        sizes["fds"] += 1
        kind = target if target.startswith("anon_inode:") else target.split(":[")[0] if ":[" in target else "file"
        sizes[f"fds:{kind}"] += 1
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[9] in sockets:
                    sizes[f"tcp:{_TCP_STATES.get(fields[3], fields[3])}"] += 1
    return dict(sizes)


def traced_lines(top: int = 200) -> dict[str, int]:
    """With `tracemalloc` tracing (``--tracemalloc``): the bytes Python allocated and still
    holds per line of code, for the ``top`` lines holding most (else nothing)."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        return {}
    stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
    return {f"{s.traceback[0].filename.split('/zmqmesh/')[-1]}:{s.traceback[0].lineno}": s.size for s in stats}


STUCK_FETCHES = 25
"""Live history fetches (`Fetch`) past which the hub's replays are taken for stuck: every
thread's stack is printed, once (three runs of 300-420 s saw them pile up and stay after the peers left)."""
_stacks_printed: list[bool] = []


def print_stacks_if_stuck(objects: dict[str, int]) -> None:
    """Print every thread's stack, once, when the hub holds more than `STUCK_FETCHES` fetches."""
    import faulthandler

    if objects.get("zmqmesh._patterns.replay.cursor.Fetch", 0) > STUCK_FETCHES and not _stacks_printed:
        _stacks_printed.append(True)
        print(f"more than {STUCK_FETCHES} history fetches alive: every thread's stack", flush=True)
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)


def sample(hub: Any, store_dir: str, peers_seen: int, label: str) -> dict[str, Any]:
    """One sample of the hub."""
    sizes, held = container_sizes({"node": hub})
    objects = live_objects()
    print_stacks_if_stuck(objects)
    return {
        "label": label, "t": time.monotonic(), "peers_seen": peers_seen, "peers_present": len(hub.peers()),
        "process": process_sizes(), "containers": sizes, "bytes": held,
        "objects": objects, "stats": stats_sizes(hub.stats()), "store": store_rows(store_dir),
        "traced": traced_lines(),
    }


# -- the long-lived node ---------------------------------------------------------------------


def make_hub(mesh: dict[str, Any], store_dir: str, dedupe_window: int) -> Any:
    """The long-lived node, started, with every pattern in place."""
    import zmqmesh

    hub = zmqmesh.Node("churn-hub", store=store_dir, history={"news.hub.": 200}, **mesh)
    hub.service("hub.echo", lambda msg: msg.data)
    hub.pull("jobs", lambda msg: None)
    hub.pull("orders", lambda msg: None, at_least_once=True, dedupe=True, dedupe_window=dedupe_window)
    hub.subscribe("news.", lambda msg: None)
    hub.subscribe("news.", lambda msg: None, replay="all")
    hub.subscribe("news.", lambda msg: None, durable_name="hub-news")
    hub.keep("kept")
    return hub.start()


def hub_calls(hub: Any, stop: threading.Event) -> None:
    """The hub's own traffic: publishes with history, calls the peers' services."""
    import zmqmesh

    rng = random.Random(1)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            hub.publish(f"news.hub.{n % 8}", {"n": n})
        except zmqmesh.ZmqMeshError:
            pass
        providers = hub.providers("peer.echo")
        futures = []
        for peer in rng.sample(providers, min(4, len(providers))):
            try:
                futures.append(hub.submit("peer.echo", n, timeout=2, peer=peer))
            except zmqmesh.ZmqMeshError:
                pass
        if providers:
            try:
                hub.request_many("peer.echo", range(6), timeout=2)
            except zmqmesh.ZmqMeshError:
                pass
        for future in futures:
            try:
                future.result(timeout=3)
            except Exception:
                pass
        stop.wait(0.1)


# -- the peers -------------------------------------------------------------------------------


class PeerProcess:
    """One ``_churn_peer.py`` process, its lines read by a thread (peer ids counted)."""

    def __init__(self, spec: dict[str, Any], kill_after_s: float | None) -> None:
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.done = False
        self.kill_at = None if kill_after_s is None else time.monotonic() + kill_after_s
        self.tmp = spec["tmp"]
        self.proc = subprocess.Popen([sys.executable, "-u", str(PEER_SCRIPT), json.dumps(spec)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ROUND "):
                self.ids.extend(line.split()[1:])
            elif line.startswith("ERROR"):
                self.errors.append(line.strip())
        self.done = True

    def kill(self) -> None:
        """SIGKILL the process (its session)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> int:
        """Wait for the process, remove its peers' stores; its exit status."""
        status = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()  # (or the harness's own pipes pile up in its fds)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return status


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the run ---------------------------------------------------------------------------------


def grown(samples: list[dict[str, Any]], section: str, min_growth: int) -> list[tuple[str, list[int]]]:
    """Paths of ``section`` that grew by at least ``min_growth`` from the first sample to
    the last one taken with peers churning, with their value at every sample."""
    churning = [s for s in samples if s["label"] != "after"]
    first, last = churning[0][section], churning[-1][section]
    rows = []
    for path in sorted(set(first) | set(last)):
        if last.get(path, 0) - first.get(path, 0) >= min_growth:
            rows.append((path, [s[section].get(path, 0) for s in samples]))
    return rows


def rss_per_thousand(samples: list[dict[str, Any]]) -> float:
    """The RSS (MB) the hub's process grew by per 1,000 peer ids, from the sample a third
    of the way through the churn (past the first minute's warm-up: the allocator's and
    SQLite's caches, the dedupe window filling) to the last taken with peers churning."""
    churning = [s for s in samples if s["label"] != "after"]
    first, last = churning[len(churning) // 3], churning[-1]
    ids = last["peers_seen"] - first["peers_seen"]
    grew_kb = last["process"]["rss_kb"] - first["process"]["rss_kb"]
    return grew_kb / 1024 / ids * 1000 if ids else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=480.0, help="seconds of churn (default 480)")
    parser.add_argument("--processes", type=int, default=3, help="peer processes at once (default 3)")
    parser.add_argument("--nodes", type=int, default=6, help="nodes per round of a peer process (default 6)")
    parser.add_argument("--stay-s", type=float, default=1.0, help="seconds a round's nodes work (default 1)")
    parser.add_argument("--kill-share", type=float, default=0.4,
                        help="share of peer processes SIGKILLed mid-way (default 0.4)")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--after-s", type=float, default=20.0,
                        help="seconds to wait after the last peer left before the last sample (default 20)")
    parser.add_argument("--min-growth", type=int, default=20, help="growth that is reported (default 20)")
    parser.add_argument("--dedupe-window", type=int, default=100_000,
                        help="the hub's dedupe_window for 'orders' (default 100,000: its ids fill memory with "
                             "the messages handled, not the peers; a small one shows the rest)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace Python's allocations and report the lines whose memory grew (slower)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", help="write every sample here as JSON")
    args = parser.parse_args()

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    rng = random.Random(args.seed)
    mesh = {"beacon_port": free_udp_port(), "mesh": f"churn-{uuid.uuid4().hex[:10]}"}
    work = tempfile.mkdtemp(prefix="churn-")
    store_dir = os.path.join(work, "hub")
    hub = make_hub(mesh, store_dir, args.dedupe_window)
    stop_calls = threading.Event()
    caller = threading.Thread(target=hub_calls, args=(hub, stop_calls), daemon=True)
    caller.start()
    running: list[PeerProcess] = []
    finished: list[PeerProcess] = []
    samples: list[dict[str, Any]] = []
    kills = polite = 0
    begin = time.monotonic()
    next_sample = begin + 5.0
    serial = 0

    def peers_seen() -> int:
        return sum(len(p.ids) for p in running + finished)

    def take(label: str) -> None:
        s = sample(hub, store_dir, peers_seen(), label)
        samples.append(s)
        proc = s["process"]
        print(f"[{s['t'] - begin:6.0f}s] {label:7} peers seen {s['peers_seen']:5} present {s['peers_present']:3}"
              f"  rss {proc['rss_kb'] / 1024:6.1f} MB  fds {proc['fds']:4}  threads {proc['threads']:3}"
              f"  kills {kills} polite {polite}", flush=True)

    try:
        while time.monotonic() - begin < args.duration:
            now = time.monotonic()
            for p in list(running):
                if p.kill_at is not None and now >= p.kill_at and not p.done:
                    p.kill()
                    kills += 1
                    p.kill_at = None
                if p.done:
                    running.remove(p)
                    status = p.finish()
                    polite += status == 0
                    finished.append(p)
                    if p.errors:
                        print("peer process error:", p.errors[:2], flush=True)
            while len(running) < args.processes:
                serial += 1
                rounds = rng.randint(1, 4)
                spec = {"mesh": mesh, "rounds": rounds, "nodes": args.nodes, "stay_s": args.stay_s,
                        "seed": rng.randrange(1 << 30), "tmp": tempfile.mkdtemp(prefix=f"p{serial}-", dir=work)}
                killed = rng.random() < args.kill_share
                running.append(PeerProcess(spec, rng.uniform(1.0, rounds * (args.stay_s + 3.0)) if killed else None))
            if now >= next_sample:
                take("churn")
                next_sample = now + args.sample_s
            time.sleep(0.1)
        take("churn")
        for p in running:
            p.kill_at = None
        for p in running:
            p.proc.wait(timeout=120)
            p.finish()
            finished.append(p)
        running.clear()
        stop_calls.set()
        caller.join(timeout=30)
        deadline = time.monotonic() + 30
        while hub.peers() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(args.after_s)
        gc.collect()
        take("after")
    finally:
        stop_calls.set()
        for p in running:
            p.kill()
            p.finish()
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(samples, f)
    seen = [s["peers_seen"] for s in samples]
    print(f"\npeer ids: {peers_seen()} in {time.monotonic() - begin:.0f} s; processes: "
          f"{len(finished)} ({kills} SIGKILLed)")
    print("peers seen at each sample:", seen)
    print("RSS per 1,000 peer ids seen (from a third of the churn on): "
          f"{rss_per_thousand(samples):.2f} MB")
    for section in ("process", "containers", "bytes", "objects", "stats", "store", "traced"):
        least = {"process": 1, "bytes": 20 * args.min_growth, "traced": 500 * args.min_growth}.get(
            section, args.min_growth)
        rows = grown(samples, section, least)
        print(f"\n{section}: {len(rows)} grew (first churn sample -> last churn sample ... after)")
        for path, values in rows:
            print(f"  {path}: {values}")


if __name__ == "__main__":
    main()
