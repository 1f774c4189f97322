"""Pipeline: a ventilator pushes tasks, three worker processes pull them, a sink collects.

    ventilator --push "tasks"--> worker x3 --push "results"--> sink

Each task goes to exactly one worker, dealt round-robin; the shares can differ by a few
tasks, because ZeroMQ deals frames and a burst's frame can carry several messages. With no
worker, push waits and then raises instead of dropping anything. Run: python patterns/pipeline.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections import Counter

import zmqmesh

MESH = f"pattern-pipeline-{os.getpid()}"
TASKS = 30


def worker(name: str, mesh: str, stop: mp.synchronize.Event) -> None:
    node = zmqmesh.Node(name, mesh=mesh)

    @node.pull("tasks")
    def square(msg: zmqmesh.Message) -> None:
        n = msg.data
        node.push("results", {"task": n, "square": n * n, "worker": name})

    with node:
        stop.wait(30)


def main() -> None:
    stop = mp.get_context("spawn").Event()
    workers = [mp.get_context("spawn").Process(target=worker, args=(f"worker-{i}", MESH, stop)) for i in range(3)]
    for w in workers:
        w.start()

    results: list[dict] = []
    done = threading.Event()
    sink = zmqmesh.Node("ventilator+sink", mesh=MESH)

    @sink.pull("results")
    def collect(msg: zmqmesh.Message) -> None:
        results.append(msg.data)
        if len(results) == TASKS:
            done.set()

    with sink:
        sink.wait_for_pullers("tasks", 3, timeout=20)
        print(f"ventilator: 3 workers pull 'tasks'; pushing {TASKS} tasks")
        for n in range(TASKS):
            sink.push("tasks", n)
        if not done.wait(20):
            raise SystemExit(f"sink: only {len(results)} of {TASKS} results arrived")
        total = sum(r["square"] for r in results)
        share = Counter(r["worker"] for r in results)
        print(f"sink: {len(results)} results, sum of squares = {total}")
        print("sink: tasks per worker:", dict(sorted(share.items())))
        if len(share) == 3:
            print("sink: every worker took a share")
    stop.set()
    for w in workers:
        w.join(10)
    assert total == sum(n * n for n in range(TASKS))
    print("pipeline: OK")


if __name__ == "__main__":
    main()
