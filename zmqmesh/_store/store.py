"""The node store: one SQLite database (WAL mode) in a directory, written by one node.

Durability (``synchronous``):

* ``"normal"`` (the default): a write is committed before the call that made it returns
  and survives the process being killed (SIGKILL); the last transactions may be lost if
  the machine loses power.
* ``"full"``: each commit also waits for the disk; it survives a power cut too. Measured
  here: 5.4 k commits/s against 68 k with ``"normal"`` (batches narrow the gap).

The directory holds ``zmqmesh.db`` (and SQLite's ``-wal``/``-shm`` files) and
``zmqmesh.lock``: a node holds an exclusive lock on it while it runs, so a second node
opening the same store gets `StoreLockedError` instead of corrupting it. A file that is
not a zmqmesh store, or is damaged, raises `StoreError` at open, never a silent reset.
``max_bytes`` bounds the database; a write that would pass it raises `StoreFullError`
and leaves what is stored intact.

Thread-safe: one connection, one lock (`Database`); every public method is one
transaction. The store's parts are modules of their own: the durable queues' segments
are here (`segments` packs them), a publisher's kept topics in `kept_topics`, durable
subscriptions' cursors in `cursors`, a dedupe puller's ids in `handled`; the tables are
`schema`'s, the locks that keep a store to one node `holds`', the lineage of its
openings `runs`'.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Container, Iterable, Sequence
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from ..errors import ConfigError, StoreError
from .checkpointer import BACKSTOP_PAGES, COMMIT_WAIT_S, LOG_LIMIT_BYTES, Checkpointer
from .cursors import Cursors
from .database import Database
from .handled import Handled
from .holds import LOCK_FILE, StoreHold
from .kept_topics import KeptTopics
from .messages import (
    BODY,
    HEADERS,
    ID,
    INTEGER_MAX,
    RECOVERED,
    SEQ,
    TIMESTAMP,
    Entries,
    Entry,
    StoredMessage,
    stored_messages,
    with_attempts,
)
from .runs import open_run
from .schema import (
    APP,
    PARKED,
    SCHEMA,
    SCHEMA_VERSION,
    check_log,
    check_sqlite_file,
    migrate,
    schema_version,
)
from .segments import (
    COUNT_SQL,
    SEGMENT_BYTES,
    SEGMENT_MAX,
    StoredSegment,
    attempted,
    columns,
    cut,
    sane_attempts,
    sane_count,
    span,
    stored,
    stored_size,
)

if TYPE_CHECKING:
    import sqlite3

__all__ = ["Store", "queue_summary", "DB_FILE", "CHUNK_MESSAGES"]

log = logging.getLogger("zmqmesh.store")

DB_FILE = "zmqmesh.db"
_PAGE_SIZE = 4096
_SEQ_MAX = INTEGER_MAX  # (a bound that bounds nothing)
CHUNK_MESSAGES = 16 * SEGMENT_MAX
"""About how many messages `Store.requeue` moves, or `Store.drop_queue` deletes, per
transaction: whole segments, and no more than 8 MiB of them (though always one segment,
however large)."""
_CHUNK_BYTES = 8 * SEGMENT_BYTES
_ROWS_PER_FETCH = 16  # segments read at a time without a byte budget (a few are mostly enough)
_PARK = ("INSERT OR REPLACE INTO parked (queue, first, last) "
         "VALUES (:queue, coalesce((SELECT first FROM parked WHERE queue = :queue), :first), :last)")
"""Parks a queue (`Store.park`): its parameters a mapping, as SQLite's named placeholders
want them (Python 3.12 warns of numbered ones bound from a sequence, and 3.14 refuses them)."""


class Store:
    """A node's durable store in ``directory`` (created if missing): its durable queues
    (this class's methods), a publisher's kept topics (`history`), durable
    subscriptions' cursors (`cursors`) and a dedupe puller's handled ids (`handled`).

    Raises `StoreLockedError` if another process holds the store, `StoreError` for a
    file that is not a zmqmesh store or is damaged, or a store that cannot be opened
    (its directory cannot be made, its lock file cannot be written: a read-only
    filesystem), `ConfigError` for bad options.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 1 << 30,
                 synchronous: str = "normal", new_run: bool = True) -> None:
        if synchronous not in ("normal", "full"):
            raise ConfigError(f"store_synchronous must be 'normal' or 'full', not {synchronous!r}")
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1 << 20:
            # (a float made SQLite's max_page_count a float, which it ignores: no bound at all)
            raise ConfigError(f"store_max_bytes must be a whole number of bytes, at least 1 MiB, got {max_bytes!r}")
        self.directory = Path(directory)
        self.path = self.directory / DB_FILE
        self._new_run_wanted = new_run  # (a node's opening is a run; a tool's, e.g. for dead letters, is not)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open the store {self.directory}: the directory cannot be made: {exc}") from exc
        self._hold = StoreHold(self.directory, self.path)
        self.parks = True
        """Whether the store keeps the table of parked queues (`park`): False only when it
        could not be made (a full disk)."""
        try:
            check_sqlite_file(self.path)
            check_log(self.path)
            if not self._hold.created and self._hold.marked() and self.path.stat().st_size == 0:
                raise StoreError(f"the store {self.path} is damaged: its database holds no bytes (truncated?), "
                                 f"though {self.directory / LOCK_FILE} says a store was made here; nothing was "
                                 "reset (delete the database to start afresh)")
            connection = self._connect(max_bytes, synchronous)
        except OSError as exc:
            self._hold.release()
            raise StoreError(f"cannot read the store {self.path}: {exc}") from exc
        except BaseException:
            self._hold.release()
            raise
        self._hold.mark(self.stream_id)
        try:
            self._checkpointer = Checkpointer(self.path, synchronous)
        except BaseException as exc:
            connection.close()
            self._hold.release()
            raise StoreError(f"cannot open the store {self.path} for checkpoints: {exc}") from exc
        self._db = Database(connection, self.directory, max_bytes, self._checkpointer.written)
        try:
            self.handled = Handled(self._db)
        except BaseException:
            self._checkpointer.close()
            self._db.close()
            self._hold.release()
            raise
        self.history = KeptTopics(self._db)
        self.cursors = Cursors(self._db)
        self.max_bytes = max_bytes
        self._closed = False

    def close_later(self) -> None:
        """Say that this store closes only once a handler that outlived its node's stop
        returns: meanwhile, opening it again in this process waits for that (see
        `StoreHold.close_later`), and says why if it must fail."""
        if not self._closed:
            self._hold.close_later()

    # -- opening ---------------------------------------------------------------------------

    def _connect(self, max_bytes: int, synchronous: str) -> sqlite3.Connection:
        import sqlite3  # (loaded with the first store: a node without one never pays for it)

        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=COMMIT_WAIT_S)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        try:
            fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            version = SCHEMA_VERSION
            if fresh:
                db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            else:  # before anything that writes: a foreign database is left as it was
                version = self._check_schema(db)
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"the store {self.path} cannot use WAL mode (got {mode!r})")
            db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {max(max_bytes // page_size, 16)}")
            db.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")  # (a `Checkpointer` does them)
            db.execute(f"PRAGMA journal_size_limit = {LOG_LIMIT_BYTES}")  # (the log's file, once started over)
            if fresh:
                db.execute("BEGIN IMMEDIATE")
                for statement in SCHEMA:
                    db.execute(statement)
                db.executemany("INSERT INTO meta VALUES (?, ?)",
                               [("app", APP), ("schema_version", str(SCHEMA_VERSION)), ("created", str(time.time())),
                                ("stream", uuid.uuid4().hex)])
                db.execute("COMMIT")
            if version < SCHEMA_VERSION:
                migrate(db, version)
            try:
                db.execute(PARKED)
            except sqlite3.OperationalError as exc:  # (a full disk: the store still opens, to be emptied)
                log.warning("the store %s cannot keep durable queues nobody pulls out of memory (%s)", self.path, exc)
                self.parks = False
            stream = db.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
            if stream is None:
                raise StoreError(f"the store {self.path} is damaged: it names no stream of its own (meta 'stream')")
            self.stream_id = str(stream[0])
            self.runs = open_run(db, self._new_run_wanted)
            last = db.execute(f"SELECT seq + {COUNT_SQL} FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
            self._next_seq = int(last[0]) if last else 1
        except StoreError:
            db.close()
            raise
        except Exception as exc:  # (whatever it is: the connection is closed, never left open)
            db.close()
            raise StoreError(f"the store {self.path} is damaged or not a zmqmesh store: {exc}") from exc
        return db

    def _check_schema(self, db: sqlite3.Connection) -> int:
        version = schema_version(db, self.path)
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store {self.path} was written by a newer zmqmesh (schema {version}, "
                             f"this one reads up to {SCHEMA_VERSION})")
        problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise StoreError(f"the store {self.path} is damaged: {problem}")
        return version

    # -- the durable queues ------------------------------------------------------------------

    def append(self, calls: Sequence[tuple[str, Entries | Sequence[Entry]]], park: Container[str] = (),
               unpark: Sequence[str] = ()) -> list[tuple[int, int]]:
        """Store each ``(queue, entries)`` call (`Entries`, or rows) as a segment (or several, of at most
        `SEGMENT_MAX` messages and about `SEGMENT_BYTES`), all in one transaction; the segments as ``(first, count)``,
        in order. A message's sequence number is its segment's ``first`` plus its place in
        it. The queues named in ``park`` are parked (`park`) with what they store, those
        in ``unpark`` are no longer, in the same transaction. Raises `StoreFullError`, `StoreError`."""
        with self._db.lock:
            first = self._next_seq
            rows: list[tuple[int, str, int, float, bytes]] = []
            marks: list[tuple[int, int]] = []
            parked: list[dict[str, Any]] = []
            for queue, entries in calls:
                start = first
                for part in cut(entries if isinstance(entries, Entries) else Entries.of_rows(entries)):
                    rows.append((first, queue, len(part), part.stamps[0], stored(part)))
                    marks += attempted(first, part)
                    first += len(part)
                if queue in park:
                    parked.append({"queue": queue, "first": start, "last": rows[-1][0]})
            statements: list[tuple[str, Any]] = [
                ("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, ?, ?, ?)", rows)]
            if marks:
                statements.append(("INSERT INTO attempts (seq, n) VALUES (?, ?)", marks))
            if parked:
                statements.append((_PARK, parked))
            if unpark:
                statements.append(("DELETE FROM parked WHERE queue = ?", [(q,) for q in unpark]))
            if len(statements) == 1 and len(rows) == 1:
                self._numbered(first, lambda: self._db.commit(lambda db: db.execute(statements[0][0], rows[0]),
                                                              single=True))
            else:
                self._numbered(first, lambda: self._db.write_locked(statements))
        return [(r[0], r[2]) for r in rows]

    def _numbered(self, next_seq: int, write: Callable[[], None]) -> None:
        """Run ``write``, which stores rows numbered below ``next_seq`` (lock held). The
        numbers count as given before it runs: a Ctrl-C's KeyboardInterrupt once its
        transaction committed must not give them again (every later write would fail, a
        UNIQUE constraint), and one before leaves a gap, as other queues' rows do. A
        write that fails (nothing stored) gives them back."""
        given = self._next_seq
        self._next_seq = next_seq
        try:
            write()
        except Exception:
            self._next_seq = given
            raise

    def forget(self, segments: Iterable[tuple[int, int]], settled: Iterable[tuple[int, int]] = ()) -> None:
        """Delete whole segments, given as ``(first, count)``, with what was marked of
        their messages; and mark the ranges ``(lo, hi)`` of messages ``settled`` in
        segments still stored (so that a restart does not deliver them again)."""
        runs: list[list[int]] = []
        for first, count in sorted(segments):  # adjacent segments delete as one range: far cheaper
            if runs and first == runs[-1][1] + 1:
                runs[-1][1] = first + count - 1
            else:
                runs.append([first, first + count - 1])
        spans = [tuple(r) for r in runs]
        statements: list[tuple[str, Any]] = []
        if spans:
            statements += [("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", spans),
                           ("DELETE FROM attempts WHERE seq BETWEEN ? AND ?", spans),
                           ("DELETE FROM settled WHERE lo BETWEEN ? AND ?", spans)]
        marks = list(settled)
        if marks:
            statements.append(("INSERT OR REPLACE INTO settled (lo, hi) VALUES (?, ?)", marks))
        if statements:
            self._db.write(statements)

    def park(self, queue: str, first: int, last: int) -> None:
        """Note that the node holds nothing in memory of ``queue``, whose rows from sequence
        number ``first`` on (at most ``last``, the first of its last segment) are still to
        deal (a queue already parked keeps its ``first``)."""
        self._db.write([(_PARK, {"queue": queue, "first": first, "last": last})])

    def parked(self, queue: str) -> tuple[int, int] | None:
        """``(first, last)`` as `park` noted them for ``queue``, if it is parked."""
        with self._db.lock:
            return self._parked_locked(queue)

    def unpark(self, queue: str) -> tuple[int, int] | None:
        """`parked`, and ``queue`` is no longer, in one transaction."""
        with self._db.lock:
            found = self._parked_locked(queue)
            if found is not None:
                self._db.write_locked([("DELETE FROM parked WHERE queue = ?", (queue,))])
        return found

    def _parked_locked(self, queue: str) -> tuple[int, int] | None:
        rows = self._db.read("SELECT first, last FROM parked WHERE queue = ?", (queue,))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def any_parked(self) -> bool:
        """Whether some queue is parked."""
        with self._db.lock:
            return bool(self._db.read("SELECT 1 FROM parked LIMIT 1"))

    def park_all(self) -> int:
        """Park every queue with a segment stored, forgetting what was parked before (a
        node recovering the store: it holds nothing in memory yet); how many there are."""
        with self._db.lock:
            self._db.write_locked([("DELETE FROM parked", ()),
                                   ("INSERT INTO parked (queue, first, last) SELECT queue, min(seq), max(seq) "
                                    "FROM outbox GROUP BY queue", ())])
            return int(self._db.read("SELECT count(*) FROM parked")[0][0])

    def count_attempt(self, seqs: Iterable[int]) -> None:
        """Count one more failed delivery of each message."""
        self._db.write([("INSERT INTO attempts (seq, n) VALUES (?, 1) ON CONFLICT (seq) DO UPDATE SET n = n + 1",
                      [(s,) for s in seqs])])

    def move(self, message: StoredMessage, queue: str, headers: bytes | None) -> int:
        """Move a message to the end of another queue (a dead-letter queue), with new
        headers and no attempts; its new sequence number. A message alone in its segment
        moves in place (a full store can still do that)."""
        seq, msg_id, timestamp = message[SEQ], message[ID], message[TIMESTAMP]
        items = msgpack.packb([[msg_id, timestamp, headers, message[BODY]]])
        with self._db.lock:
            new = self._next_seq

            def run(db: sqlite3.Connection) -> None:
                moved = db.execute("UPDATE outbox SET seq = ?, queue = ?, items = ? WHERE seq = ? AND count = 1",
                                   (new, queue, items, seq)).rowcount
                if moved:
                    db.execute("DELETE FROM attempts WHERE seq = ?", (seq,))
                else:
                    db.execute("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, 1, ?, ?)",
                               (new, queue, timestamp, items))
                    db.execute("INSERT OR REPLACE INTO settled (lo, hi) VALUES (?, ?)", (seq, seq))

            self._numbered(new + 1, lambda: self._db.commit(run))
        return new

    def drop_queue(self, queue: str, chunk: int = CHUNK_MESSAGES) -> int:
        """Delete every message of ``queue``; how many there were. A chunk at a time, as
        `requeue` moves them (damaged segments stay, for an operator). Raises `StoreError`
        if a read or write fails: the chunks deleted before it stay deleted."""
        return self._by_chunks(queue, chunk, self._drop_locked)

    def requeue(self, source: str, target: str, chunk: int = CHUNK_MESSAGES) -> int:
        """Move every message of ``source`` to the end of ``target``, in order, with no
        attempts counted; how many moved. About ``chunk`` messages (whole segments) move
        per transaction, so a queue of any length moves in bounded memory. Damaged segments
        stay where they are, for an operator. Raises `StoreError` if a read or write fails:
        the chunks moved before it stay moved (a crash part of the way likewise leaves every
        message in one of the two queues, in order); calling it again moves the rest."""
        return self._by_chunks(source, chunk, lambda segments: self._move_locked(segments, target))

    def _by_chunks(self, queue: str, chunk: int, act: Callable[[list[StoredSegment]], int]) -> int:
        """``act(segments)`` (lock held) on the healthy segments of ``queue`` stored now, about
        ``chunk`` messages at a time (a queue ``act`` adds to is not visited again); the sum of
        what it returns."""
        done = 0
        after = 0
        last = self._next_seq - 1
        while True:
            with self._db.lock:
                step = self._one_chunk(queue, after, last, chunk, act)
            if step is None:
                return done
            count, after = step
            done += count

    def _one_chunk(self, queue: str, after: int, last: int, chunk: int,
                   act: Callable[[list[StoredSegment]], int]) -> tuple[int, int] | None:
        """`_by_chunks`'s step: what ``act`` returned, and where the next chunk begins; None
        when none is left. (A method of its own: one chunk in memory at a time.)"""
        segments = [s for s in self._read_segments(queue, after, chunk, _CHUNK_BYTES) if s.first <= last]
        if not segments:
            return None
        # (the next chunk begins past this one's first message: a damaged segment's count may be wrong)
        return act([s for s in segments if not s.damaged]), segments[-1].first

    def _move_locked(self, segments: list[StoredSegment], target: str) -> int:
        """Store the messages of ``segments`` anew at the end of ``target`` and delete the
        segments, in one transaction; how many moved."""
        first = self._next_seq
        rows = []
        for segment in segments:
            if segment.messages:
                rows.append((first, target, len(segment.messages), segment.messages[0][TIMESTAMP],
                             msgpack.packb([(m[ID], m[TIMESTAMP], m[HEADERS], m[BODY], True) if m[RECOVERED]
                                            else (m[ID], m[TIMESTAMP], m[HEADERS], m[BODY]) for m in segment.messages])))
                first += len(segment.messages)
        spans = [(s.first, s.first + s.size - 1) for s in segments]
        self._numbered(first, lambda: self._db.write_locked([
            ("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", spans),
            ("DELETE FROM attempts WHERE seq BETWEEN ? AND ?", spans),
            ("DELETE FROM settled WHERE lo BETWEEN ? AND ?", spans),
            ("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, ?, ?, ?)", rows)]))
        return sum(r[2] for r in rows)

    def _drop_locked(self, segments: list[StoredSegment]) -> int:
        """Delete ``segments`` in one transaction; how many unsettled messages they held."""
        self._forget_locked([(s.first, s.size) for s in segments])
        return sum(len(s.messages) for s in segments)

    def _forget_locked(self, segments: list[tuple[int, int]]) -> None:
        spans = [(f, f + c - 1) for f, c in segments]
        self._db.write_locked([("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", spans),
                               ("DELETE FROM attempts WHERE seq BETWEEN ? AND ?", spans),
                               ("DELETE FROM settled WHERE lo BETWEEN ? AND ?", spans)])

    # -- reading ----------------------------------------------------------------------------

    def pending(self, queue: str, after: int = 0, limit: int = 256, max_bytes: int | None = None,
                at_least_one: bool = True, upto: int | None = None) -> list[StoredSegment]:
        """The segments of ``queue`` after sequence ``after``, oldest first, whole, until
        they hold ``limit`` messages or more (at most `SEGMENT_MAX` - 1 more); with
        ``max_bytes``, only as many as fit in that many bytes (packed), though at least
        one with ``at_least_one``; with ``upto``, none that begins past it (the outbox is
        read no further)."""
        with self._db.lock:
            return self._read_segments(queue, after, limit, max_bytes, at_least_one, upto)

    def next_segment_bytes(self, queue: str, after: int = 0) -> int | None:
        """The packed size of ``queue``'s first segment after sequence ``after`` (None if
        there is none), read without reading the segment."""
        with self._db.lock:
            following = self._next_segment(queue, after)
        return None if following is None else following[1]

    def _next_segment(self, queue: str, after: int) -> tuple[int, int] | None:
        """``(first sequence number, packed size)`` of ``queue``'s first segment after
        ``after``, read without reading the segment; None if there is none (lock held)."""
        rows = self._db.read("SELECT seq, length(items) FROM outbox WHERE queue = ? AND seq > ? ORDER BY seq LIMIT 1",
                             (queue, after))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def _read_segments(self, queue: str, after: int, limit: int | None,
                       max_bytes: int | None = None, at_least_one: bool = True,
                       upto: int | None = None) -> list[StoredSegment]:
        sql = "SELECT seq, count, items FROM outbox WHERE queue = ? AND seq > ? AND seq <= ? ORDER BY seq"
        rows = self._segment_rows(sql, (queue, after, _SEQ_MAX if upto is None else upto), limit or None, max_bytes,
                                  at_least_one)
        if not rows:
            return []
        last_first = rows[-1][0]
        lo, hi = rows[0][0], last_first + span(last_first, rows[-1][1], self._next_seq) - 1
        attempts = {seq: sane_attempts(n)
                    for seq, n in self._db.read("SELECT seq, n FROM attempts WHERE seq BETWEEN ? AND ?", (lo, hi))}
        settled: set[int] = set()
        for a, b in self._db.read("SELECT lo, hi FROM settled WHERE lo BETWEEN ? AND ?", (lo, hi)):
            settled.update(range(a, b + 1))
        segments = []
        pack = msgpack.Packer().pack  # (this read's own, for the wire forms)
        for index, (first, count, items) in enumerate(rows):
            try:
                ids, stamps, headers, bodies, marked = columns(msgpack.unpackb(items, raw=False, use_list=False), count)
                messages, wire_sizes = stored_messages(queue, first, repeat(first), ids, stamps, headers, bodies,
                                                       (0,) * count, marked, pack)
                if attempts or settled:  # (rare: only failed deliveries and acknowledgements in a segment)
                    messages = [with_attempts(m, attempts[m[SEQ]]) if m[SEQ] in attempts else m
                                for m in messages if m[SEQ] not in settled]
                    wire_sizes = None
            except Exception as exc:
                segments.append(self._damaged(queue, rows, index, exc))
                continue
            segments.append(StoredSegment(first, count, messages, None, wire_sizes))
        return segments

    def _damaged(self, queue: str, rows: list[Any], index: int, why: Exception) -> StoredSegment:
        """The segment of ``rows[index]``, which cannot be read: why, and the numbers it may
        hold, short of its queue's next segment (its count may be wrong; lock held)."""
        first, count = rows[index][0], rows[index][1]
        if index + 1 < len(rows):
            before = rows[index + 1][0]
        else:
            following = self._next_segment(queue, first)
            before = self._next_seq if following is None else following[0]
        return StoredSegment(first, span(first, count, before), [], f"damaged segment {first} ({count} messages): {why}")

    def last_seq(self) -> int:
        """The highest outbox sequence number given so far in this run (0 for none)."""
        with self._db.lock:
            return int(self._next_seq) - 1

    def queue_tails(self) -> dict[str, int]:
        """Every queue with a segment stored, and the sequence number of its last message."""
        with self._db.lock:
            # (each queue's last segment; SQLite gives the count of the row that max() chose)
            rows = self._db.read("SELECT queue, max(seq), count FROM outbox GROUP BY queue")
            return {queue: last + span(last, count, self._next_seq) - 1 for queue, last, count in rows}

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue with messages: ``{queue: {messages, bytes, oldest}}``."""
        with self._db.lock:
            return queue_summary(self._db.connection)

    def _segment_rows(self, sql: str, params: Sequence[Any], messages: int | None,
                      max_bytes: int | None = None, at_least_one: bool = True) -> list[Any]:
        """The rows of outbox segments ``sql`` selects (their message count second, their
        items third), whole; with ``messages``, only until they hold that many messages or
        more, where the query stops, however many rows follow; with ``max_bytes`` too, only
        while their items fit in it (the first row even if it does not, with
        ``at_least_one``). Lock held; a failing read raises `StoreError`."""
        if messages is None:
            return self._db.read(sql, params)
        with self._db.rows(sql, params) as cursor:
            rows: list[Any] = []
            total = size = 0
            most = max_bytes if max_bytes is not None else float("inf")
            # (a row fetched is in memory: with a byte budget, one at a time, so that at most
            # one segment past the budget is read and let go)
            at_a_time = _ROWS_PER_FETCH if max_bytes is None else 1
            while total < messages and size < most and (fetched := cursor.fetchmany(at_a_time)):
                for row in fetched:
                    if max_bytes is not None:
                        size += stored_size(row[2])
                        if size > max_bytes and (rows or not at_least_one):
                            return rows  # (this row would pass the budget)
                    rows.append(row)
                    total += sane_count(row[1])
                    if total >= messages or size >= most:
                        break
            return rows

    @property
    def checkpoints(self) -> int:
        """Checkpoints of the write-ahead log done so far by the store's own thread."""
        return self._checkpointer.checkpoints

    @property
    def log_restarts(self) -> int:
        """Checkpoints made by commits that found the write-ahead log's file past
        `LOG_LIMIT_BYTES` and that started the log over (and emptied its file)."""
        return self._checkpointer.restarts

    def close(self) -> None:
        """Close the database and release the lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._checkpointer.close()  # (first: the last connection to close checkpoints all)
        try:
            self._db.close()
        finally:
            self._hold.release()


def queue_summary(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Every durable queue with messages: ``{queue: {messages, bytes, oldest}}`` (read on
    ``db``, which may be a connection of a tool's own)."""
    rows = db.execute(
        f"SELECT queue, sum({COUNT_SQL} - (SELECT ifnull(sum(hi - lo + 1), 0) FROM settled "
        f"WHERE lo BETWEEN o.seq AND o.seq + {COUNT_SQL} - 1)), sum(length(items)), min(ts) "
        "FROM outbox o GROUP BY queue ORDER BY queue").fetchall()
    return {q: {"messages": n, "bytes": b or 0, "oldest": oldest} for q, n, b, oldest in rows if n}
