"""A heartbeated worker pool that survives a worker being killed.

Three worker processes offer the "work" service; the client sends 30 jobs from four
threads. Midway one worker is SIGKILLed: the mesh notices within a second, the
requests it held fail with PeerLostError at once (not at their timeout), and the
client resends them to the survivors. Every job completes.
Run: python patterns/worker_pool.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import zmqmesh

MESH = f"pattern-pool-{os.getpid()}"
JOBS = 30


def worker(name: str, mesh: str, stop: mp.synchronize.Event) -> None:
    node = zmqmesh.Node(name, mesh=mesh)

    @node.service("work")
    def work(msg: zmqmesh.Message) -> dict:
        time.sleep(0.05)
        return {"job": msg.data, "by": name}

    with node:
        stop.wait(30)


def main() -> None:
    ctx = mp.get_context("spawn")
    # one Event per worker: setting an Event a killed process was waiting on would hang
    stops = {f"worker-{i}": ctx.Event() for i in range(3)}
    procs = {name: ctx.Process(target=worker, args=(name, MESH, stop)) for name, stop in stops.items()}
    for p in procs.values():
        p.start()
    client = zmqmesh.Node("client", mesh=MESH)
    client.on_leave(lambda peer: print(f"client: {peer.name} left the mesh"))
    retried = 0
    lock = threading.Lock()

    def run_job(job: int) -> dict:
        nonlocal retried
        while True:
            try:
                return client.request("work", job, timeout=10)
            except zmqmesh.PeerLostError as err:
                with lock:
                    retried += 1
                print(f"client: job {job} lost with its worker ({err}); resending")

    with client:
        client.wait_for_service("work", 3, timeout=20)
        threading.Timer(0.25, lambda: (print("client: killing worker-1"), procs["worker-1"].kill())).start()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run_job, range(JOBS)))
    for name, p in procs.items():
        if p.is_alive():
            stops[name].set()
        p.join(10)
    assert [r["job"] for r in results] == list(range(JOBS))
    by = {name: sum(1 for r in results if r["by"] == name) for name in procs}
    print(f"client: all {JOBS} jobs done; by worker {by}; {retried} resent after the crash")
    print("worker_pool: OK")


if __name__ == "__main__":
    main()
