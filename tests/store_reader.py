"""Readers of a store in a process of their own, always one of them on a snapshot, as an
operator's ``zmqmesh store inspect`` of a large store run again and again is: each of
THREADS threads, with a connection of its own, reads the store and holds what it read
(its snapshot) HOLD_S seconds, again and again, until stdin closes.

    python store_reader.py DIR HOLD_S THREADS

Prints ``reading`` once every thread has read, and ``reads N`` at the end.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
import time


def read_and_hold(path: str, hold_s: float, closed: threading.Event, reads: list[int], index: int) -> None:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)) as db:
        while not closed.is_set():
            db.execute("BEGIN")
            db.execute("SELECT count(*) FROM outbox").fetchone()
            time.sleep(hold_s)  # (a long read: the snapshot stays taken)
            db.execute("COMMIT")
            reads[index] += 1


def main(directory: str, hold_s: float, threads: int) -> None:
    closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()
    reads = [0] * threads
    readers = []
    for index in range(threads):
        readers.append(threading.Thread(target=read_and_hold, args=(f"{directory}/zmqmesh.db", hold_s, closed,
                                                                    reads, index)))
        readers[-1].start()
        time.sleep(hold_s / threads)  # (staggered: one is on a snapshot whenever another lets its go)
    while not all(reads) and not closed.is_set():
        time.sleep(0.01)
    print("reading", flush=True)
    for reader in readers:
        reader.join()
    print(f"reads {sum(reads)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
