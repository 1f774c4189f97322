"""Checkpoints a store's write-ahead log on a thread of its own.

By default SQLite checkpoints inside the commit that takes the log past 1,000 pages: that
commit then copies the log into the database and syncs both files, and a durable push
waits several milliseconds on a disk (the store's commits, 0.2 ms otherwise, had a p99
of 5 to 7 ms here). The store's own connection keeps an automatic checkpoint only as a
backstop (`BACKSTOP_PAGES`); this thread checkpoints a moment after commits, with a
connection of its own, while the committing threads go on. Its checkpoints are PASSIVE:
they never wait for a writer, and copy only what the log gained since the last one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

__all__ = ["Checkpointer", "BACKSTOP_PAGES", "CHECKPOINT_DELAY_S"]

log = logging.getLogger("zmqmesh.store")

CHECKPOINT_DELAY_S = 0.05
"""How long after a commit the thread checkpoints (the commits meanwhile go in the same one)."""
BACKSTOP_PAGES = 4000
"""The log's size in pages past which a commit checkpoints after all: a checkpoint that
never finds a moment without a commit under way leaves the log growing, and the commit's
checkpoint then copies only what the thread's did not."""


class Checkpointer:
    """A thread that checkpoints the store at ``path`` a moment after each `written`, until
    `close`. Raises `sqlite3.Error` if it cannot open the database."""

    def __init__(self, path: Path, synchronous: str) -> None:
        import sqlite3

        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._due = threading.Event()
        self._stop = threading.Event()
        self.checkpoints = 0
        """Checkpoints done (`Store.checkpoints`)."""
        self._thread = threading.Thread(target=self._run, name="zmqmesh-checkpoint", daemon=True)
        self._thread.start()

    def written(self) -> None:
        """A commit added to the log: a checkpoint is due in `CHECKPOINT_DELAY_S` (any thread)."""
        if not self._due.is_set():  # (the check alone, without the event's lock, on most commits)
            self._due.set()

    def _run(self) -> None:
        import sqlite3

        while True:
            self._due.wait()
            if self._stop.wait(CHECKPOINT_DELAY_S):
                break
            self._due.clear()
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            except sqlite3.Error as exc:  # (the backstop still bounds the log; the next one may do)
                log.warning("a checkpoint of the store failed: %s", exc)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (after a checkpoint under way) and close its connection (idempotent)."""
        self._stop.set()
        self._due.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._db.close()
