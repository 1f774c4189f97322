"""Embedding a node in worker processes: a multiprocessing pool and a concurrent.futures
process pool whose workers serve a queue.

Each pool worker starts a zmqmesh node in its initializer, pulls "resize" jobs and pushes
results to "resized"; the dispatcher (this process) pushes jobs, gathers results, then
publishes "control.shutdown" so every worker's serve() call returns. The pools use the
"spawn" start method: never fork a process that already runs a node.
Run: python examples/worker_pools.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import zmqmesh

JOBS = 40
WORKERS = 3

_node: zmqmesh.Node | None = None
_shutdown = threading.Event()


def init_worker(mesh: str) -> None:
    """Pool initializer: one node per worker process, serving the queue from its inbox thread."""
    global _node
    name = f"{mp.current_process().name}"
    node = zmqmesh.Node(name, mesh=mesh)

    @node.pull("resize")
    def resize(msg: zmqmesh.Message) -> None:
        w, h = msg.data["size"]
        node.push("resized", {"id": msg.data["id"], "size": [w // 2, h // 2], "by": name})

    node.subscribe("control.shutdown", lambda msg: _shutdown.set())
    _node = node.start()


def serve(_: int) -> str:
    """A pool task: keep this worker serving until the dispatcher says stop."""
    _shutdown.wait(60)
    assert _node is not None
    name = _node.name
    _node.stop()
    return name


def dispatch(kind: str, mesh: str, run_pool: Any) -> None:
    results: list[dict[str, Any]] = []
    done = threading.Event()
    node = zmqmesh.Node("dispatcher", mesh=mesh)

    @node.pull("resized")
    def gather(msg: zmqmesh.Message) -> None:
        results.append(msg.data)
        if len(results) == JOBS:
            done.set()

    with node:
        finished = run_pool()  # starts the workers' serve() tasks; returns a waitable
        node.wait_for_pullers("resize", WORKERS, timeout=30)
        for i in range(JOBS):
            node.push("resize", {"id": i, "size": [640 + i, 480]})
        if not done.wait(30):
            raise SystemExit(f"{kind}: only {len(results)} of {JOBS} results")
        node.wait_for_subscribers("control.shutdown", WORKERS, timeout=10)
        node.publish("control.shutdown", None)
        names = finished()
    by = Counter(r["by"] for r in results)
    print(f"{kind}: {len(results)} jobs done by {len(by)} workers {sorted(by.values())}; workers stopped: {len(names)}")
    assert sorted(r["id"] for r in results) == list(range(JOBS)) and len(by) == WORKERS


def main() -> None:
    ctx = mp.get_context("spawn")
    mesh = f"pools-{os.getpid()}"
    with ctx.Pool(WORKERS, initializer=init_worker, initargs=(mesh + "-mp",)) as pool:
        dispatch("multiprocessing.Pool", mesh + "-mp", lambda: pool.map_async(serve, range(WORKERS), chunksize=1).get)
    with ProcessPoolExecutor(WORKERS, mp_context=ctx, initializer=init_worker, initargs=(mesh + "-cf",)) as executor:
        def start() -> Any:
            futures = [executor.submit(serve, i) for i in range(WORKERS)]
            return lambda: [f.result(60) for f in futures]
        dispatch("ProcessPoolExecutor", mesh + "-cf", start)


if __name__ == "__main__":
    main()
