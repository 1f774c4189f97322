"""Checkpoints a store's write-ahead log on a thread of its own.

By default SQLite checkpoints inside the commit that takes the log past 1,000 pages: that
commit then copies the log into the database and syncs both files, and a durable push
waits several milliseconds on a disk (the store's commits, 0.2 ms otherwise, had a p99
of 5 to 7 ms here). The store's own connection keeps an automatic checkpoint only as a
backstop (`BACKSTOP_PAGES`); this thread checkpoints a moment after commits, with a
connection of its own, while the committing threads go on. Its checkpoints are PASSIVE:
they never wait for a writer, and copy only what the log gained since the last one.

A checkpoint copies the log but does not start it over: SQLite writes the log from its
beginning again only when a transaction begins with all of it copied and no reader on a
snapshot inside it. Under commits without a pause, beside readers of another connection
of whom one is always on some snapshot (``zmqmesh store inspect`` in a loop), that moment
never came, and the log grew without end (2 GiB in 30 s of a node's durable pushes). So a
commit that finds the log's file past `LOG_LIMIT_BYTES` (it looks at most every
`LOOK_EVERY_S`) starts the log over before it returns, with a TRUNCATE checkpoint: it
copies what the thread has not, waits a moment (`RESTART_WAIT_S`) for the readers of
older snapshots to finish, and empties the file; the commit after it writes the log from
its beginning. (A RESTART checkpoint, the same without the emptying, left the file to be
cut back, to ``journal_size_limit``, by the commit after it: a store whose writes paused
there kept the outgrown file.) The commit's thread does it, holding the store's lock (a
checkpoint of the thread's own, waiting for SQLite's lock, found it taken by the next
commit every time), after the thread's checkpoint under way, if one is (SQLite fails a
checkpoint beside another at once: the log grew while the thread's copied it).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3

__all__ = ["Checkpointer", "BACKSTOP_PAGES", "CHECKPOINT_DELAY_S", "COMMIT_WAIT_S", "LOG_LIMIT_BYTES", "LOOK_EVERY_S",
           "RESTART_WAIT_S", "RESTART_WAIT_MAX_S"]

log = logging.getLogger("zmqmesh.store")

CHECKPOINT_DELAY_S = 0.05
"""How long after a commit the thread checkpoints (the commits meanwhile go in the same one)."""
BACKSTOP_PAGES = 4000
"""The log's size in pages past which a commit checkpoints after all: a checkpoint that
never finds a moment without a commit under way leaves the log growing, and the commit's
checkpoint then copies only what the thread's did not."""
LOG_LIMIT_BYTES = 16 << 20
"""The size of the log's file past which a commit starts the log over, and to which its
file is cut back once it is."""
LOOK_EVERY_S = 0.005
"""How often, at most, a commit looks at the size of the log's file."""
RESTART_WAIT_S = 0.02
"""How long a checkpoint starting the log over waits for readers of older snapshots (its commit waits
meanwhile): past it, it gives up, and the next one (at the next look) waits twice as long,
up to `RESTART_WAIT_MAX_S` (a reader that reads for longer would otherwise always be found
on its snapshot; one tried only as long after it as it waited found new readers there, and
the log grew without end again); once one starts the log over, this again."""
RESTART_WAIT_MAX_S = 0.25
"""The longest a checkpoint starting the log over waits for readers."""
COMMIT_WAIT_S = 5.0
"""How long a store's commit waits for SQLite's lock (a connection of another process's)
before it fails (its connection's busy timeout, put back after a checkpoint starting the log over)."""


class Checkpointer:
    """A thread that checkpoints the store at ``path`` a moment after each `written`, until
    `close`. Raises `sqlite3.Error` if it cannot open the database."""

    def __init__(self, path: Path, synchronous: str) -> None:
        import sqlite3

        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._due = threading.Event()
        self._stop = threading.Event()
        self._checkpointing = threading.Lock()  # (held by a checkpoint under way, the thread's or a commit's)
        self._log = path.with_name(path.name + "-wal")
        self._next_look = 0.0
        self._restart_wait_s = RESTART_WAIT_S
        self.checkpoints = 0
        """Checkpoints done (`Store.checkpoints`)."""
        self.restarts = 0
        """Checkpoints that started the log over (`Store.log_restarts`)."""
        self._thread = threading.Thread(target=self._run, name="zmqmesh-checkpoint", daemon=True)
        self._thread.start()

    def written(self, connection: sqlite3.Connection) -> None:
        """A commit on ``connection`` (the store's, its lock held) added to the log: a
        checkpoint is due in `CHECKPOINT_DELAY_S`, and if the log's file is past
        `LOG_LIMIT_BYTES`, the log is started over now (`_restart`). Raises nothing."""
        if self._log_outgrown():
            self._restart(connection)
        if not self._due.is_set():  # (the check alone, without the event's lock, on most commits)
            self._due.set()

    def _log_outgrown(self) -> bool:
        """Whether the log's file is past `LOG_LIMIT_BYTES`, looked at if `LOOK_EVERY_S` passed
        since the last look (False otherwise)."""
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY_S
        try:
            return self._log.stat().st_size > LOG_LIMIT_BYTES
        except OSError:  # (none yet)
            return False

    def _restart(self, connection: sqlite3.Connection) -> None:
        """A checkpoint on ``connection`` that starts the log over and empties its file
        (TRUNCATE), waiting at most the wait it has reached for readers; a failure is
        logged (the commit before it stands, and the next one tries)."""
        import sqlite3

        try:
            with self._checkpointing:  # (SQLite fails a checkpoint beside another at once, without waiting)
                connection.execute(f"PRAGMA busy_timeout = {round(self._restart_wait_s * 1000)}")
                try:
                    busy = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                finally:
                    connection.execute(f"PRAGMA busy_timeout = {round(COMMIT_WAIT_S * 1000)}")
        except sqlite3.Error as exc:
            log.warning("a checkpoint starting the store's log over failed: %s", exc)
            return
        if busy:  # (a reader stayed on an older snapshot: the next one waits longer)
            self._restart_wait_s = min(2 * self._restart_wait_s, RESTART_WAIT_MAX_S)
        else:
            self._restart_wait_s = RESTART_WAIT_S
            self.restarts += 1

    def _run(self) -> None:
        import sqlite3

        while True:
            self._due.wait()
            if self._stop.wait(CHECKPOINT_DELAY_S):
                break
            self._due.clear()
            try:
                with self._checkpointing:
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
