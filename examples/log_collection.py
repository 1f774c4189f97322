"""Log collection that survives its collector: every line exactly once, in order per app.

Five app processes publish their log lines on "logs.<app>" and keep them (``history=``,
each in its own store). One collector process subscribes to "logs." with a
``durable_name``: it writes every line to a file and the node remembers where it is in
each app's stream. Midway, the collector is killed (SIGKILL) and started again: it
resumes right after the last line it handled, replaying what the apps published while it
was down from their histories, then follows them live.

A line the collector may have written just before it was killed comes again marked
``msg.redelivered``; the collector skips those it already wrote (its own file says which),
so the file ends with every line exactly once, in order per app.
Run: python examples/log_collection.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import zmqmesh

MESH = f"logs-{os.getpid()}"
APPS = 5
LINES = 1000
RATE = 1000  # lines per second per app


def app(name: str, mesh: str, store: str, stop: mp.synchronize.Event) -> None:
    with zmqmesh.Node(name, mesh=mesh, store=store, history={"logs.": 100_000}) as node:
        start = time.monotonic()
        for i in range(LINES):
            node.publish(f"logs.{name}", {"app": name, "n": i, "line": f"{name} event {i}"})
            ahead = i / RATE - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        stop.wait(120)  # an app keeps its history available until the collector is done


def written(out: Path) -> dict[str, int]:
    """The last line number per app in the collector's file (-1 for none)."""
    last: dict[str, int] = defaultdict(lambda: -1)
    if out.exists():
        for row in out.read_text().splitlines():
            name, n, _text = row.split(" ", 2)
            last[name] = max(last[name], int(n))
    return last


def collector(mesh: str, store: str, out: Path) -> None:
    last = written(out)  # what an earlier run of this collector already wrote
    done = threading.Event()
    node = zmqmesh.Node("collector", mesh=mesh, store=store)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @node.subscribe("logs.", replay="all", durable_name="collector")
    def collect(msg: zmqmesh.Message) -> None:
        record = msg.data
        if msg.redelivered and record["n"] <= last[record["app"]]:
            return  # written before the crash
        os.write(fd, f"{record['app']} {record['n']} {record['line']}\n".encode())
        last[record["app"]] = record["n"]
        if len(last) == APPS and all(n == LINES - 1 for n in last.values()):
            done.set()

    with node:
        done.wait(120)  # every line of every app written


def main() -> None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()  # (never shared with the collector: a process killed inside an Event's wait breaks it)
    with tempfile.TemporaryDirectory(prefix="zmqmesh-logs-") as tmp:
        out = Path(tmp) / "collected.log"
        apps = [ctx.Process(target=app, args=(f"app-{i}", MESH, f"{tmp}/app-{i}", stop)) for i in range(APPS)]
        first = ctx.Process(target=collector, args=(MESH, f"{tmp}/collector", out))
        first.start()
        for p in apps:
            p.start()
        # (every wait below is bounded, and together they stay under two minutes: a run
        # that goes wrong says so here rather than being cut off by whoever runs it)
        deadline = time.monotonic() + 30
        while sum(written(out).values()) < APPS * LINES // 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()  # SIGKILL, mid-stream
        first.join(10)
        print(f"collector: killed after {sum(n + 1 for n in written(out).values())} lines; starting it again")
        second = ctx.Process(target=collector, args=(MESH, f"{tmp}/collector", out))
        second.start()
        second.join(45)  # it ends once it wrote every line
        finished = second.exitcode == 0
        stop.set()
        for p in (*apps, second):
            p.join(5)
            if p.is_alive():
                p.kill()
        lines: dict[str, list[int]] = defaultdict(list)
        for row in out.read_text().splitlines():
            name, n, _text = row.split(" ", 2)
            lines[name].append(int(n))
    exact = all(numbers == list(range(LINES)) for numbers in lines.values())
    total = sum(len(numbers) for numbers in lines.values())
    print(f"collector: {total} lines from {len(lines)} apps; each exactly once and in order: {exact}")
    assert finished and exact and len(lines) == APPS, \
        f"the collector {'finished' if finished else 'did not finish'}; lines written per app: " \
        f"{ {name: f'{len(numbers)}, the last {numbers[-1]}' for name, numbers in sorted(lines.items())} }"


if __name__ == "__main__":
    main()
