"""Log collection: many producers push log records, one aggregator summarises them.

Five producer processes push records to the "logs" queue, then a final "eof" record.
The aggregator pulls them all (nothing is dropped: with nobody pulling, push waits and
then raises) and prints counts per level and per producer.
Run: python examples/log_collection.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
from collections import Counter

import zmqmesh

MESH = f"logs-{os.getpid()}"
PRODUCERS = 5
RECORDS = 200
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def producer(name: str, mesh: str) -> None:
    rng = random.Random(name)
    with zmqmesh.Node(name, mesh=mesh) as node:
        for i in range(RECORDS):
            level = rng.choices(LEVELS, weights=(50, 35, 10, 5))[0]
            node.push("logs", {"source": name, "level": level, "line": f"{name} event {i}"}, timeout=20)
        node.push("logs", {"source": name, "level": "eof"}, timeout=20)
    # leaving the with-block drains what is still queued before the node stops


def main() -> None:
    levels: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    finished: set[str] = set()
    all_done = threading.Event()
    aggregator = zmqmesh.Node("aggregator", mesh=MESH)

    @aggregator.pull("logs")
    def collect(msg: zmqmesh.Message) -> None:
        record = msg.data
        if record["level"] == "eof":
            finished.add(record["source"])
            if len(finished) == PRODUCERS:
                all_done.set()
            return
        levels[record["level"]] += 1
        sources[record["source"]] += 1

    with aggregator:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=producer, args=(f"app-{i}", MESH)) for i in range(PRODUCERS)]
        for p in procs:
            p.start()
        if not all_done.wait(60):
            raise SystemExit(f"only {len(finished)} producers finished")
        for p in procs:
            p.join(10)
    total = sum(levels.values())
    print(f"aggregator: {total} records from {len(sources)} producers")
    print("aggregator: by level:", dict(sorted(levels.items())))
    print("aggregator: by producer:", dict(sorted(sources.items())))
    assert total == PRODUCERS * RECORDS and set(sources.values()) == {RECORDS}


if __name__ == "__main__":
    main()
