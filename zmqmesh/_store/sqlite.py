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

Thread-safe: one connection, one lock; every public method is one transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import operator
import os
import secrets
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

from ..errors import ConfigError, StoreError, StoreFullError, StoreLockedError
from .checkpointer import BACKSTOP_PAGES, Checkpointer
from .messages import Entry, StoredMessage, stored_messages

if TYPE_CHECKING:
    import sqlite3

__all__ = ["Store", "StoredSegment", "SEGMENT_MAX", "SEGMENT_BYTES", "CHUNK_MESSAGES", "SCHEMA_VERSION", "DB_FILE", "LOCK_FILE", "inspect_store", "retry_dead_letters",
           "drop_dead_letters"]

log = logging.getLogger("zmqmesh.store")

SCHEMA_VERSION = 6
_INSPECTED_FROM = 5
"""The oldest schema `inspect_store` reads as it is: 5 has the tables of 6 (6 only marks
the stores whose segments may hold entries marked redelivered)."""
DB_FILE = "zmqmesh.db"
LOCK_FILE = "zmqmesh.lock"
_APP = "zmqmesh"
_SQLITE_MAGIC = b"SQLite format 3\x00"
# (device, inode) of the databases the stores of this process hold, with descriptors of
# them opened meanwhile by a store refused (closed only with the holder's: `_hold_database`)
_HELD: dict[tuple[int, int], list[int]] = {}
_HELD_LOCK = threading.Lock()
# (device, inode) of the lock files of stores this process closes once a handler that
# outlived its node's stop returns (`Store.close_later`), and the event set when they close
_CLOSING: dict[tuple[int, int], threading.Event] = {}
CLOSING_WAIT_S = 5.0
"""How long opening a store waits for one this process closes after a handler that outlived
its node's stop (`Store.close_later`), before it raises `StoreLockedError` (an opening on a
running asyncio event loop, an `AsyncNode`'s, does not wait: it raises at once)."""
_PAGE_SIZE = 4096
SEGMENT_MAX = 1024
"""Messages in one stored segment at most: a larger call is stored as several."""
SEGMENT_BYTES = 1 << 20
"""A segment also closes once its payloads and headers pass this many bytes (a larger
message is a segment of its own): reading one back whole stays bounded."""
_COUNT_SQL = f"(CASE WHEN typeof(count) = 'integer' THEN min(max(count, 1), {SEGMENT_MAX}) ELSE 1 END)"
"""A segment's stored count as the store reckons with it: a healthy segment holds 1 to
`SEGMENT_MAX` messages, and a damaged one's count may be anything (text, a fraction: 1)."""
_SEQ_MAX = (1 << 63) - 1  # (SQLite's largest integer: a bound that bounds nothing)
CHUNK_MESSAGES = 16 * SEGMENT_MAX
"""About how many messages `Store.requeue` moves, or `Store.drop_queue` deletes, per
transaction: whole segments, and no more than 8 MiB of them (though always one segment,
however large)."""
_CHUNK_BYTES = 8 * SEGMENT_BYTES
_HISTORY_ROW_BYTES = 48  # a kept frame's numbers and msgpack framing in a page of history, about
_ROWS_PER_FETCH = 16  # segments read at a time without a byte budget (a few are mostly enough)
_NEXT_ENTRY_BYTES = 12  # a topic's number and msgpack framing in a piece of ``next``, at most
_TOPICS_PER_FETCH = 1024  # kept topics read at a time for a piece of ``next``
_OUTBOX = (
    # durable messages this node owns until pullers acknowledge them (or a keeper takes
    # them), in segments: the messages one commit stored for one queue, numbered seq ..
    # seq + count - 1 and packed in one row (a row each costs several times as much)
    "CREATE TABLE outbox ("
    " seq INTEGER PRIMARY KEY,"
    " queue TEXT NOT NULL,"
    " count INTEGER NOT NULL,"
    " ts REAL NOT NULL,"
    " items BLOB NOT NULL)",
    # single messages of segments still stored: failed deliveries counted so far, and
    # ranges [lo, hi] settled (acknowledged, or moved to a dead-letter queue)
    "CREATE TABLE attempts (seq INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "CREATE TABLE settled (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL)",
)
_PARKED = (
    # the durable queues with messages stored that the node holds nothing of in memory (nobody
    # pulled them): where their rows begin and the last of them, found without reading the
    # outbox (it has no index by queue: one would cost every commit). Made anew each time a
    # node recovers the store (`park_all`), so a store without it, or one an older zmqmesh
    # wrote to, needs no upgrade
    "CREATE TABLE IF NOT EXISTS parked (queue TEXT PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL)"
    " WITHOUT ROWID"
)
_PARK = ("INSERT OR REPLACE INTO parked (queue, first, last) "
         "VALUES (?1, coalesce((SELECT first FROM parked WHERE queue = ?1), ?2), ?3)")
_HISTORY_4 = (  # (added by schema 4)
    "CREATE INDEX history_age ON history (ts)",
    # the number of the next message of each kept topic: numbering goes on after a restart
    # even when every row of a topic was trimmed or expired
    "CREATE TABLE history_topics (topic TEXT PRIMARY KEY, next INTEGER NOT NULL) WITHOUT ROWID",
)
_HISTORY_5 = (  # (added by schema 5)
    # the number a topic's numbering began at: 0, or the store's floor (meta 'history_floor')
    # when it was numbered after topics were forgotten (`Store.expire_history`); and when
    # the last of its frames went (NULL while some are kept)
    "ALTER TABLE history_topics ADD COLUMN start INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE history_topics ADD COLUMN emptied REAL",
    "CREATE INDEX history_topics_emptied ON history_topics (emptied) WHERE emptied IS NOT NULL",
    # the publisher run a durable subscription last followed, per stream (see `Store.runs`)
    "CREATE TABLE cursor_runs (name TEXT NOT NULL, stream TEXT NOT NULL, run TEXT NOT NULL,"
    " PRIMARY KEY (name, stream)) WITHOUT ROWID",
)
RUNS_KEPT = 16
"""Runs of a store (openings) it names in its lineage (`Store.runs`), newest first: those
of its last `RUNS_KEPT` openings, then up to as many older ones that numbered messages."""
_HISTORY = (
    # what a publisher keeps of its topics (``history=``): a row per frame it sent, the
    # messages ``seq`` .. ``seq + count - 1`` of ``topic``, as they travelled (the payload
    # frame and the meta frame); ``pos`` orders them across topics, never reused
    "CREATE TABLE history ("
    " pos INTEGER PRIMARY KEY AUTOINCREMENT,"
    " topic TEXT NOT NULL,"
    " seq INTEGER NOT NULL,"
    " count INTEGER NOT NULL,"
    " ts REAL NOT NULL,"
    " payload BLOB NOT NULL,"
    " meta BLOB)",
    "CREATE INDEX history_topic ON history (topic, seq)",
    *_HISTORY_4,
    # where a durable subscription is, per publisher stream and topic: ``seq`` handled,
    # ``upto`` perhaps handled (a restart delivers seq+1 .. upto again, as redelivered)
    "CREATE TABLE cursors ("
    " name TEXT NOT NULL,"
    " stream TEXT NOT NULL,"
    " topic TEXT NOT NULL,"
    " seq INTEGER NOT NULL,"
    " upto INTEGER NOT NULL,"
    " pos INTEGER NOT NULL,"
    " PRIMARY KEY (name, stream, topic)) WITHOUT ROWID",
    *_HISTORY_5,
)
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    *_OUTBOX,
    *_HISTORY,
    # ids of messages a dedupe puller handled, per queue; "at" numbers them in order
    "CREATE TABLE handled (queue TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (queue, id))"
    " WITHOUT ROWID",
    "CREATE INDEX handled_age ON handled (queue, at)",
)


_STORED_FIELDS = operator.itemgetter(slice(0, 4))
"""What a segment keeps of an `Entry`: ``(id, timestamp, headers, body)`` (attempts apart),
and ``True`` after them for one marked redelivered (`_stored`)."""
_MARKED = operator.itemgetter(5)


def _stored(part: Sequence[Entry]) -> list[Any]:
    """What a segment keeps of the entries ``part`` (see `_STORED_FIELDS`)."""
    if not any(map(_MARKED, part)):  # (the common case, without a Python step per message)
        return list(map(_STORED_FIELDS, part))
    return [(*e[:4], True) if e[5] else e[:4] for e in part]


def _segments(entries: Sequence[Entry]) -> Iterator[Sequence[Entry]]:
    """``entries`` cut into the segments `Store.append` stores, in order."""
    # (one message, or small ones: cut by count alone; a single push need not be summed)
    if len(entries) == 1 or sum([len(e[3]) + (len(e[2]) if e[2] else 0) for e in entries]) <= SEGMENT_BYTES:
        for start in range(0, len(entries), SEGMENT_MAX):
            yield entries[start:start + SEGMENT_MAX]
        return
    start = size = 0
    for i, entry in enumerate(entries):
        grown = size + len(entry[3]) + len(entry[2] or b"")
        if i > start and (i - start >= SEGMENT_MAX or grown > SEGMENT_BYTES):
            yield entries[start:i]
            start, grown = i, grown - size
        size = grown
    yield entries[start:]


_STAMP_TYPES = {float, int}
_HEADER_TYPES = {bytes, type(None)}


def _joins(empty: str | bytes, values: Sequence[Any]) -> bool:
    """Whether ``values`` all join to ``empty`` (all str, or all bytes): for what msgpack
    unpacked, which makes no subclass of either nor another type with bytes' buffer, their
    type is then exactly that, found in one C call. (It copies them: for the small bodies
    of a segment of many messages, a third of the cost of looking at each one's type; a
    segment's bytes are bounded, `SEGMENT_BYTES`.)"""
    try:
        empty.join(values)
    except TypeError:
        return False
    return True


def _columns(entries: Sequence[tuple[Any, ...]]) -> tuple[Sequence[Any], ...]:
    """The stored ``(id, timestamp, headers, body)`` of ``entries``, as msgpack unpacked
    them (each with ``True`` after it if marked redelivered), as columns: ids, timestamps,
    headers, bodies, and whether each is marked. Raises `ValueError` unless each has the
    types a durable message needs (a damaged segment must not reach the wire)."""
    if set(map(len, entries)) == {4}:  # (nothing marked redelivered: the common case, no Python step per message)
        ids, stamps, headers, bodies = zip(*entries)
        if _joins("", ids) and _joins(b"", bodies) and set(map(type, stamps)) <= _STAMP_TYPES \
                and (headers.count(None) == len(headers) or set(map(type, headers)) <= _HEADER_TYPES):
            return ids, stamps, headers, bodies, (False,) * len(entries)
    _check_entries(entries)  # (raises, or finds some marked)
    ids, stamps, headers, bodies = zip(*(e[:4] for e in entries))
    return ids, stamps, headers, bodies, [len(e) == 5 for e in entries]


def _check_entries(entries: Sequence[tuple[Any, ...]]) -> None:
    """Raises `ValueError` unless every stored ``(id, timestamp, headers, body)`` (with
    ``True`` after it if marked redelivered) has the types a durable message needs (a
    damaged segment must not reach the wire)."""
    for entry in entries:
        if len(entry) == 4:
            msg_id, ts, headers, body = entry
        elif len(entry) == 5 and entry[4] is True:
            msg_id, ts, headers, body, _marked = entry
        else:
            raise ValueError(f"an entry of {len(entry)} fields")
        if type(msg_id) is not str or type(body) is not bytes or (headers is not None and type(headers) is not bytes) \
                or type(ts) not in (float, int):
            raise ValueError(f"an entry of the wrong types: {type(msg_id).__name__}, {type(ts).__name__}, "
                             f"{type(headers).__name__}, {type(body).__name__}")


class StoredSegment(NamedTuple):
    """A segment read back from the store: its numbers and its messages not yet settled."""

    first: int
    size: int
    """How many messages it was stored with (numbered ``first`` .. ``first + size - 1``).
    A damaged segment's stored count may be wrong: its size is then 1 to `SEGMENT_MAX`,
    and never reaches the queue's next segment nor the next number to be given."""
    messages: list[StoredMessage]
    damaged: str | None = None
    """Why its messages cannot be read (then none are given); the segment stays stored."""


class Store:
    """A node's durable store in ``directory`` (created if missing).

    Raises `StoreLockedError` if another process holds the store, `StoreError` for a
    file that is not a zmqmesh store or is damaged, `ConfigError` for bad options.
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
            raise ConfigError(f"cannot create the store directory {self.directory}: {exc}") from exc
        self._lock_file = self._take_lock()
        self._closing: tuple[int, int] | None = None  # (`close_later`)
        self._db_lock: tuple[int, tuple[int, int]] | None = None
        self._lock = threading.Lock()
        self.parks = True
        """Whether the store keeps the table of parked queues (`park`): False only when it
        could not be made (a full disk)."""
        try:
            self._db_lock = self._hold_database()
            self._check_file()
            self._db = self._connect(max_bytes, synchronous)
        except BaseException:
            self._release_lock()
            raise
        try:
            self._checkpointer = Checkpointer(self.path, synchronous)
        except BaseException as exc:
            self._db.close()
            self._release_lock()
            raise StoreError(f"cannot open the store {self.path} for checkpoints: {exc}") from exc
        self.max_bytes = max_bytes
        self._closed = False

    # -- opening ---------------------------------------------------------------------------

    def _take_lock(self) -> Any:
        lock_path = self.directory / LOCK_FILE
        try:
            handle = open(lock_path, "a+")  # noqa: SIM115 - held for the store's lifetime
        except OSError as exc:
            raise ConfigError(f"cannot open {lock_path}: {exc}") from exc
        if _try_lock(handle):
            return handle
        info = os.fstat(handle.fileno())
        closing = _CLOSING.get((info.st_dev, info.st_ino))
        if closing is None:
            if _try_lock(handle):  # (its holder may have closed it since: then it is gone from `_CLOSING`)
                return handle
        elif not _on_event_loop() and closing.wait(CLOSING_WAIT_S) and _try_lock(handle):
            return handle
        handle.close()
        if closing is not None and not closing.is_set():
            waited = "an AsyncNode does not wait for it (its event loop would stall)" if _on_event_loop() else \
                f"it has not returned within {CLOSING_WAIT_S:g} s"
            raise StoreLockedError(f"the store {self.directory} is still in use by a node of this process that "
                                   f"stopped: a handler of it outlived the stop's timeout, and the store closes "
                                   f"when it returns; {waited}")
        raise StoreLockedError(f"the store {self.directory} is in use by another node (locked)")

    def close_later(self) -> None:
        """Say that this store closes only once a handler that outlived its node's stop
        returns: meanwhile, opening it again in this process waits for that (up to
        `CLOSING_WAIT_S`; not on a running asyncio event loop, which it would stall), and
        says why if it must fail."""
        if self._closed:
            return
        info = os.fstat(self._lock_file.fileno())
        with _HELD_LOCK:
            self._closing = (info.st_dev, info.st_ino)
            _CLOSING.setdefault(self._closing, threading.Event())

    def _hold_database(self) -> tuple[int, tuple[int, int]]:
        """Lock the database file itself (created empty if missing), for the store's
        lifetime: two store directories that name one database (a hard link or a symbolic
        one) hold one file, which only one node may use at a time. Its descriptor and
        ``(device, inode)``. Raises `StoreLockedError` when another node uses it,
        `StoreError` for what is not a plain file.

        A store of this process that holds the file is found by its inode, and the file is
        then never opened: closing any descriptor of a file drops every POSIX lock this
        process holds on it, SQLite's too (another process's SQLite could then delete the
        write-ahead log under the running node)."""
        with _HELD_LOCK:
            try:
                info = os.stat(self.path)  # (the file a link names: never a FIFO or a device opened)
            except FileNotFoundError:
                info = None
            except OSError as exc:
                raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
            if info is not None:
                if not stat.S_ISREG(info.st_mode):
                    raise _not_plain(self.path)
                if (info.st_dev, info.st_ino) in _HELD:
                    raise _held_by_another(self.path)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
            try:
                opened = os.fstat(fd)
                identity = (opened.st_dev, opened.st_ino)
                if identity in _HELD:  # (a link to a held file came meanwhile: closing fd would drop its locks)
                    _HELD[identity].append(fd)  # (closed with the holder's: `_release_lock`)
                    fd = -1
                    raise _held_by_another(self.path)
                if not stat.S_ISREG(opened.st_mode):
                    raise _not_plain(self.path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _held_by_another(self.path) from None
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            _HELD[identity] = []
            return fd, identity

    def _release_lock(self) -> None:
        try:
            if self._db_lock is not None:  # (after the connection closed: SQLite's own locks are gone by then)
                fd, identity = self._db_lock
                self._db_lock = None
                with _HELD_LOCK:  # (its descriptors, and those parked with it, closed as it is let go)
                    for parked in [*_HELD.pop(identity, ()), fd]:
                        os.close(parked)
        finally:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            finally:
                self._lock_file.close()
                if self._closing is not None:
                    with _HELD_LOCK:
                        closed = _CLOSING.pop(self._closing, None)
                    if closed is not None:
                        closed.set()

    def _check_file(self) -> None:
        _check_sqlite_file(self.path)

    def _connect(self, max_bytes: int, synchronous: str) -> sqlite3.Connection:
        import sqlite3  # (loaded with the first store: a node without one never pays for it)

        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
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
            if fresh:
                db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    db.execute(statement)
                db.executemany("INSERT INTO meta VALUES (?, ?)",
                               [("app", _APP), ("schema_version", str(SCHEMA_VERSION)), ("created", str(time.time())),
                                ("stream", uuid.uuid4().hex)])
                db.execute("COMMIT")
            if version < SCHEMA_VERSION:
                _migrate(db, version)
            try:
                db.execute(_PARKED)
            except sqlite3.OperationalError as exc:  # (a full disk: the store still opens, to be emptied)
                log.warning("the store %s cannot keep durable queues nobody pulls out of memory (%s)", self.path, exc)
                self.parks = False
            stream = db.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
            if stream is None:
                raise StoreError(f"the store {self.path} is damaged: it names no stream of its own (meta 'stream')")
            self.stream_id = str(stream[0])
            self.runs = self._new_run(db, self._new_run_wanted)
            last = db.execute(f"SELECT seq + {_COUNT_SQL} FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
            self._next_seq = int(last[0]) if last else 1
            self._handled_serial = int(db.execute("SELECT ifnull(max(at), 0) + 1 FROM handled").fetchone()[0])
        except StoreError:
            db.close()
            raise
        except Exception as exc:  # (whatever it is: the connection is closed, never left open)
            db.close()
            raise StoreError(f"the store {self.path} is damaged or not a zmqmesh store: {exc}") from exc
        return db

    @staticmethod
    def _new_run(db: sqlite3.Connection, record: bool = True) -> tuple[str, ...]:
        """Name this opening of the store (a run) with a random token, recorded first in
        the store's lineage (meta ``runs``, newest first): the runs of its last `RUNS_KEPT`
        openings, and, past them, up to `RUNS_KEPT` older runs that numbered messages in
        the history (a run that numbered nothing gave no subscriber a number to lose). A
        store restored from an older copy lacks the runs opened since the copy was taken,
        so a subscriber that followed one of those sees the lineage without it: the
        numbering of the history went back (`Replays`). A publisher that starts again and
        again without publishing (a crash loop) thus still names the last run that
        published, and its subscribers that followed that run do not take it for a copy.

        Whether a run numbered messages is told at the next opening by the mark recorded
        at its start (meta ``run_mark``, ``token:mark``, see `_numbering_mark`); the runs
        found to have numbered none are listed in meta ``runs_empty``. A token of a store
        before these (no mark) counts as one that numbered. Each opening gets a new token
        even after a run that numbered nothing: reusing it would make a copy taken while
        the publisher was stopped after that run look like the next run, which may number
        messages its subscribers then take, and a restore of that copy would go unseen.

        Not ``record``: the lineage as it is (an opening by a tool, which publishes nothing)."""
        import sqlite3

        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('runs', 'runs_empty', 'run_mark')"))
        before = tuple(r for r in str(meta.get("runs", "")).split(",") if r)
        if not record:
            return before
        empty = set(str(meta.get("runs_empty", "")).split(",")) & set(before)
        mark = _numbering_mark(db)
        if before and str(meta.get("run_mark", "")) == f"{before[0]}:{mark}":
            empty.add(before[0])  # (the numbering is where it was when that run began)
        candidates = (secrets.token_hex(8), *before)
        older = [r for r in candidates[RUNS_KEPT:] if r not in empty]
        runs = (*candidates[:RUNS_KEPT], *older[:RUNS_KEPT])
        try:  # (one statement: the three keys change together)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('runs', ?), ('runs_empty', ?), "
                       "('run_mark', ?)", (",".join(runs), ",".join(r for r in runs if r in empty),
                                           f"{runs[0]}:{mark}"))
        except sqlite3.OperationalError as exc:  # (a full disk: the store still opens, to be emptied)
            log.warning("cannot record this run of the store (%s): it goes on as the run before", exc)
            return before or runs  # (named as the run before, the last recorded)
        return runs

    def _check_schema(self, db: sqlite3.Connection) -> int:
        version = _schema_version(db, self.path)
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store {self.path} was written by a newer zmqmesh (schema {version}, "
                             f"this one reads up to {SCHEMA_VERSION})")
        problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise StoreError(f"the store {self.path} is damaged: {problem}")
        return version

    # -- writing ----------------------------------------------------------------------------

    def _write(self, statements: Iterable[tuple[str, Any]]) -> None:
        """Run ``(sql, params)`` pairs in one transaction (``params`` a list: executemany)."""
        with self._lock:
            self._write_locked(statements)

    def _write_locked(self, statements: Iterable[tuple[str, Any]]) -> None:
        def run(db: sqlite3.Connection) -> None:
            for sql, params in statements:
                if isinstance(params, list):
                    db.executemany(sql, params)
                else:
                    db.execute(sql, params)

        self._commit(run)

    def _commit(self, work: Any, single: bool = False) -> None:
        """Run ``work(db)`` as one transaction (a single statement is its own transaction).
        Raises `StoreFullError`, `StoreError`; nothing of a failed transaction is kept."""
        import sqlite3

        db = self._db
        try:
            if single:
                work(db)
            else:
                db.execute("BEGIN IMMEDIATE")
                work(db)
                db.execute("COMMIT")
            self._checkpointer.written()
        except BaseException as exc:
            if db.in_transaction:  # whatever went wrong, the next write starts clean
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, (UnicodeEncodeError, OverflowError)):  # (a value SQLite cannot bind)
                raise StoreError(f"store write failed: a value the store cannot hold: {exc}") from exc
            if not isinstance(exc, sqlite3.Error):
                raise
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise StoreFullError(
                    f"the store {self.directory} is full (store_max_bytes={self.max_bytes}, or the disk); "
                    "nothing already stored was lost") from exc
            if isinstance(exc, sqlite3.ProgrammingError) and self._closed:
                raise StoreError("the store is closed (the node stopped)") from exc
            raise StoreError(f"store write failed: {exc}") from exc

    def append(self, calls: Sequence[tuple[str, Sequence[Entry]]], park: Container[str] = (),
               unpark: Sequence[str] = ()) -> list[tuple[int, int]]:
        """Store each ``(queue, entries)`` call as a segment (or several, of at most
        `SEGMENT_MAX` messages and about `SEGMENT_BYTES`), all in one transaction; the segments as ``(first, count)``,
        in order. A message's sequence number is its segment's ``first`` plus its place in
        it. The queues named in ``park`` are parked (`park`) with what they store, those
        in ``unpark`` are no longer, in the same transaction. Raises `StoreFullError`, `StoreError`."""
        with self._lock:
            first = self._next_seq
            rows: list[tuple[int, str, int, float, bytes]] = []
            marks: list[tuple[int, int]] = []
            parked: list[tuple[str, int, int]] = []
            for queue, entries in calls:
                start = first
                for part in _segments(entries):
                    rows.append((first, queue, len(part), part[0][1], msgpack.packb(_stored(part))))
                    marks.extend((first + i, e[4]) for i, e in enumerate(part) if e[4])
                    first += len(part)
                if queue in park:
                    parked.append((queue, start, rows[-1][0]))
            statements: list[tuple[str, Any]] = [
                ("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, ?, ?, ?)", rows)]
            if marks:
                statements.append(("INSERT INTO attempts (seq, n) VALUES (?, ?)", marks))
            if parked:
                statements.append((_PARK, parked))
            if unpark:
                statements.append(("DELETE FROM parked WHERE queue = ?", [(q,) for q in unpark]))
            if len(statements) == 1 and len(rows) == 1:
                self._commit(lambda db: db.execute(statements[0][0], rows[0]), single=True)
            else:
                self._write_locked(statements)
            self._next_seq = first
        return [(r[0], r[2]) for r in rows]

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
            self._write(statements)

    def park(self, queue: str, first: int, last: int) -> None:
        """Note that the node holds nothing in memory of ``queue``, whose rows from sequence
        number ``first`` on (at most ``last``, the first of its last segment) are still to
        deal (a queue already parked keeps its ``first``)."""
        self._write([(_PARK, (queue, first, last))])

    def parked(self, queue: str) -> tuple[int, int] | None:
        """``(first, last)`` as `park` noted them for ``queue``, if it is parked."""
        with self._lock:
            return self._parked_locked(queue)

    def unpark(self, queue: str) -> tuple[int, int] | None:
        """`parked`, and ``queue`` is no longer, in one transaction."""
        with self._lock:
            found = self._parked_locked(queue)
            if found is not None:
                self._write_locked([("DELETE FROM parked WHERE queue = ?", (queue,))])
        return found

    def _parked_locked(self, queue: str) -> tuple[int, int] | None:
        rows = self._read("SELECT first, last FROM parked WHERE queue = ?", (queue,))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def any_parked(self) -> bool:
        """Whether some queue is parked."""
        with self._lock:
            return bool(self._read("SELECT 1 FROM parked LIMIT 1"))

    def park_all(self) -> int:
        """Park every queue with a segment stored, forgetting what was parked before (a
        node recovering the store: it holds nothing in memory yet); how many there are."""
        with self._lock:
            self._write_locked([("DELETE FROM parked", ()),
                                ("INSERT INTO parked (queue, first, last) SELECT queue, min(seq), max(seq) "
                                 "FROM outbox GROUP BY queue", ())])
            return int(self._read("SELECT count(*) FROM parked")[0][0])

    def count_attempt(self, seqs: Iterable[int]) -> None:
        """Count one more failed delivery of each message."""
        self._write([("INSERT INTO attempts (seq, n) VALUES (?, 1) ON CONFLICT (seq) DO UPDATE SET n = n + 1",
                      [(s,) for s in seqs])])

    def move(self, message: StoredMessage, queue: str, headers: bytes | None) -> int:
        """Move a message to the end of another queue (a dead-letter queue), with new
        headers and no attempts; its new sequence number. A message alone in its segment
        moves in place (a full store can still do that)."""
        items = msgpack.packb([[message.id, message.timestamp, headers, message.body]])
        with self._lock:
            new = self._next_seq

            def run(db: sqlite3.Connection) -> None:
                moved = db.execute("UPDATE outbox SET seq = ?, queue = ?, items = ? WHERE seq = ? AND count = 1",
                                   (new, queue, items, message.seq)).rowcount
                if moved:
                    db.execute("DELETE FROM attempts WHERE seq = ?", (message.seq,))
                else:
                    db.execute("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, 1, ?, ?)",
                               (new, queue, message.timestamp, items))
                    db.execute("INSERT OR REPLACE INTO settled (lo, hi) VALUES (?, ?)", (message.seq, message.seq))

            self._commit(run)
            self._next_seq = new + 1
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
            with self._lock:
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
                rows.append((first, target, len(segment.messages), segment.messages[0].timestamp,
                             msgpack.packb([(m.id, m.timestamp, m.headers, m.body, True) if m.recovered
                                            else (m.id, m.timestamp, m.headers, m.body) for m in segment.messages])))
                first += len(segment.messages)
        spans = [(s.first, s.first + s.size - 1) for s in segments]
        self._write_locked([
            ("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", spans),
            ("DELETE FROM attempts WHERE seq BETWEEN ? AND ?", spans),
            ("DELETE FROM settled WHERE lo BETWEEN ? AND ?", spans),
            ("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, ?, ?, ?)", rows)])
        self._next_seq = first
        return sum(r[2] for r in rows)

    def _drop_locked(self, segments: list[StoredSegment]) -> int:
        """Delete ``segments`` in one transaction; how many unsettled messages they held."""
        self._forget_locked([(s.first, s.size) for s in segments])
        return sum(len(s.messages) for s in segments)

    def _forget_locked(self, segments: list[tuple[int, int]]) -> None:
        spans = [(f, f + c - 1) for f, c in segments]
        self._write_locked([("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", spans),
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
        with self._lock:
            return self._read_segments(queue, after, limit, max_bytes, at_least_one, upto)

    def next_segment_bytes(self, queue: str, after: int = 0) -> int | None:
        """The packed size of ``queue``'s first segment after sequence ``after`` (None if
        there is none), read without reading the segment."""
        with self._lock:
            following = self._next_segment(queue, after)
        return None if following is None else following[1]

    def _next_segment(self, queue: str, after: int) -> tuple[int, int] | None:
        """``(first sequence number, packed size)`` of ``queue``'s first segment after
        ``after``, read without reading the segment; None if there is none (lock held)."""
        rows = self._read("SELECT seq, length(items) FROM outbox WHERE queue = ? AND seq > ? ORDER BY seq LIMIT 1",
                          (queue, after))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def _read_segments(self, queue: str, after: int, limit: int | None,
                       max_bytes: int | None = None, at_least_one: bool = True,
                       upto: int | None = None) -> list[StoredSegment]:
        sql = "SELECT seq, count, items FROM outbox WHERE queue = ? AND seq > ? AND seq <= ? ORDER BY seq"
        rows = self._read(sql, (queue, after, _SEQ_MAX if upto is None else upto), limit or None, max_bytes,
                          at_least_one)
        if not rows:
            return []
        last_first = rows[-1][0]
        lo, hi = rows[0][0], last_first + _span(last_first, rows[-1][1], self._next_seq) - 1
        attempts = {seq: _sane_attempts(n)
                    for seq, n in self._read("SELECT seq, n FROM attempts WHERE seq BETWEEN ? AND ?", (lo, hi))}
        settled: set[int] = set()
        for a, b in self._read("SELECT lo, hi FROM settled WHERE lo BETWEEN ? AND ?", (lo, hi)):
            settled.update(range(a, b + 1))
        segments = []
        pack = msgpack.Packer().pack  # (this read's own, for the wire forms)
        for index, (first, count, items) in enumerate(rows):
            try:
                entries = msgpack.unpackb(items, raw=False, use_list=False)
                if count < 1:
                    raise ValueError("a segment of no message")
                if len(entries) != count:
                    raise ValueError(f"{len(entries)} messages where {count} were stored")
                ids, stamps, headers, bodies, marked = _columns(entries)
                messages = stored_messages(queue, first, repeat(first), ids, stamps, headers, bodies,
                                           (0,) * count, marked, pack)
                if attempts or settled:  # (rare: only failed deliveries and acknowledgements in a segment)
                    messages = [m.with_attempts(attempts[m.seq]) if m.seq in attempts else m
                                for m in messages if m.seq not in settled]
            except Exception as exc:
                segments.append(self._damaged(queue, rows, index, exc))
                continue
            segments.append(StoredSegment(first, count, messages))
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
        return StoredSegment(first, _span(first, count, before), [], f"damaged segment {first} ({count} messages): {why}")

    def last_seq(self) -> int:
        """The highest outbox sequence number given so far in this run (0 for none)."""
        with self._lock:
            return int(self._next_seq) - 1

    def queue_tails(self) -> dict[str, int]:
        """Every queue with a segment stored, and the sequence number of its last message."""
        with self._lock:
            # (each queue's last segment; SQLite gives the count of the row that max() chose)
            rows = self._read("SELECT queue, max(seq), count FROM outbox GROUP BY queue")
            return {queue: last + _span(last, count, self._next_seq) - 1 for queue, last, count in rows}

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue with messages: ``{queue: {messages, bytes, oldest}}``."""
        with self._lock:
            return _queue_summary(self._db)

    # -- kept topics (a publisher's history) -----------------------------------------------

    def history_state(self) -> dict[str, tuple[int, int]]:
        """Every topic ever kept: ``{topic: (first kept seq, next seq)}`` (first == next when
        nothing is kept of it any more). Raises `StoreError`."""
        with self._lock:
            first: dict[str, int] = dict(self._read("SELECT topic, min(seq) FROM history GROUP BY topic"))
            nxt: dict[str, int] = dict(self._read("SELECT topic, next FROM history_topics"))
        return {t: (int(first.get(t, n)), int(n)) for t, n in nxt.items()}

    def history_next(self, prefix: str) -> dict[str, int]:
        """The number of the next message of each kept topic under ``prefix``. Raises `StoreError`."""
        with self._lock:
            return self._history_next(prefix)

    def _history_next(self, prefix: str) -> dict[str, int]:
        low, high = _prefix_range(prefix)
        return dict(self._read("SELECT topic, next FROM history_topics WHERE topic >= ? AND topic < ?", (low, high)))

    def history_next_piece(self, prefix: str, start: str, max_bytes: int) -> tuple[dict[str, int], str | None]:
        """A piece of `history_next`: see `_history_next_piece`. Raises `StoreError`."""
        with self._lock:
            return self._history_next_piece(prefix, start, max_bytes)

    def _history_next_piece(self, prefix: str, start: str, max_bytes: int) -> tuple[dict[str, int], str | None]:
        """The number of the next message of the kept topics under ``prefix`` from
        ``start`` on, in topic order, in about ``max_bytes`` (their UTF-8 names and
        `_NEXT_ENTRY_BYTES` each; the first even past it), and the first topic left out
        (None: none was). Lock held; raises `StoreError`."""
        import sqlite3

        low, high = _prefix_range(prefix)
        piece: dict[str, int] = {}
        size = 0
        try:
            cursor = self._db.execute("SELECT topic, next FROM history_topics WHERE topic >= ? AND topic < ? "
                                      "ORDER BY topic", (max(low, start), high))
            try:
                while fetched := cursor.fetchmany(_TOPICS_PER_FETCH):
                    for topic, nxt in fetched:
                        size += len(topic.encode("utf-8", "replace")) + _NEXT_ENTRY_BYTES
                        if piece and size > max_bytes:
                            return piece, topic
                        piece[topic] = int(nxt)
            finally:
                cursor.close()
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
            raise StoreError(f"store read failed: {exc}") from exc
        return piece, None

    def keep_history(self, rows: Sequence[tuple[str, int, int, float, bytes, bytes | None]]) -> None:
        """Keep frames a publisher sent, ``(topic, seq, count, ts, payload, meta)``, and the
        numbering of their topics (a topic numbered anew begins at its first frame's seq),
        in one transaction. Raises `StoreFullError`, `StoreError`."""
        span: dict[str, list[int]] = {}
        for topic, seq, count, *_rest in rows:
            found = span.get(topic)
            if found is None:
                span[topic] = [seq, seq + count]
            else:
                found[0], found[1] = min(found[0], seq), max(found[1], seq + count)
        self._write([("INSERT INTO history (topic, seq, count, ts, payload, meta) VALUES (?, ?, ?, ?, ?, ?)",
                      list(rows)),
                     ("INSERT INTO history_topics (topic, next, start) VALUES (?, ?, ?) "
                      "ON CONFLICT (topic) DO UPDATE SET next = max(next, excluded.next), emptied = NULL",
                      [(t, nxt, first) for t, (first, nxt) in span.items()])])

    def history_floor(self) -> int:
        """Where the numbering of a topic not numbered (never, or forgotten) begins: past
        every number a forgotten topic was given. Raises `StoreError`."""
        with self._lock:
            found = self._read("SELECT value FROM meta WHERE key = 'history_floor'")
        return int(found[0][0]) if found else 0

    def forget_history_topics(self, keep_empty: int) -> tuple[list[str], int]:
        """Mark every topic of which nothing is kept (a walk of every topic numbered: at
        start, for a store a version before this or a crash left) and forget the numbering
        of those past the ``keep_empty`` emptied last (`expire_history`); in one
        transaction. The topics forgotten and the floor. Raises `StoreFullError`, `StoreError`."""
        found: list[tuple[str, int]] = []
        floor = 0

        def run(db: sqlite3.Connection) -> None:
            nonlocal floor
            db.execute("UPDATE history_topics SET emptied = ? WHERE emptied IS NULL AND NOT EXISTS "
                       "(SELECT 1 FROM history h WHERE h.topic = history_topics.topic)", (time.time(),))
            floor = self._evict_empty(db, keep_empty, found)

        with self._lock:
            self._commit(run)
        return [t for t, _n in found], floor

    def _evict_empty(self, db: sqlite3.Connection, keep_empty: int, found: list[tuple[str, int]]) -> int:
        """Forget the numbering of the topics emptied longest ago past the ``keep_empty``
        emptied last (into ``found``), raising the floor past their numbers; the floor."""
        empty = int(db.execute("SELECT count(*) FROM history_topics WHERE emptied IS NOT NULL").fetchone()[0])
        if empty > keep_empty:
            oldest = "SELECT topic FROM history_topics WHERE emptied IS NOT NULL ORDER BY emptied, topic LIMIT ?"
            found.extend(db.execute(f"SELECT topic, next FROM history_topics WHERE topic IN ({oldest})",
                                    (empty - keep_empty,)).fetchall())
            db.execute(f"DELETE FROM history_topics WHERE topic IN ({oldest})", (empty - keep_empty,))
        return self._raise_floor(db, found)

    def trim_history(self, topic: str, before_seq: int) -> None:
        """Forget the frames of ``topic`` whose messages all come before ``before_seq``."""
        self._write([("DELETE FROM history WHERE topic = ? AND seq < ? AND seq + count <= ?",
                      (topic, before_seq, before_seq))])

    def expire_history(self, prefix: str, before_ts: float, keep: Sequence[str] = (), *,
                       keep_empty: int) -> tuple[list[str], int]:
        """Forget the frames of the topics under ``prefix`` kept since before ``before_ts``,
        but those under the prefixes ``keep`` (kept by other rules), in one transaction.
        The numbering of a topic left with no frame stays (a replay still sees what it
        missed of it as a gap), but only for the ``keep_empty`` topics emptied last: past
        them, the numbering of those emptied longest ago is forgotten, and the floor
        (`history_floor`) raised past their numbers, so that a topic numbered again never
        reuses a number. The topics forgotten and the floor. Raises `StoreFullError`,
        `StoreError`."""
        low, high = _prefix_range(prefix)
        where = "WHERE ts < ? AND topic >= ? AND topic < ?"
        params: list[Any] = [before_ts, low, high]
        for other in keep:
            where += " AND NOT (topic >= ? AND topic < ?)"
            params.extend(_prefix_range(other))
        found: list[tuple[str, int]] = []
        floor = 0

        def run(db: sqlite3.Connection) -> None:
            nonlocal floor
            # (the topics that lost frames, in a table of this connection's own: those left
            # with none are marked in one statement, however many they are)
            db.execute("CREATE TEMP TABLE IF NOT EXISTS expired (topic TEXT PRIMARY KEY) WITHOUT ROWID")
            db.execute("INSERT OR IGNORE INTO expired SELECT DISTINCT topic FROM history " + where, params)
            db.execute("DELETE FROM history " + where, params)
            gone = ("WHERE topic IN (SELECT topic FROM expired) AND NOT EXISTS "
                    "(SELECT 1 FROM history h WHERE h.topic = history_topics.topic)")
            db.execute("UPDATE history_topics SET emptied = ? " + gone, (time.time(),))
            db.execute("DELETE FROM expired")
            floor = self._evict_empty(db, keep_empty, found)

        with self._lock:
            self._commit(run)
        return [t for t, _n in found], floor

    @staticmethod
    def _raise_floor(db: sqlite3.Connection, forgotten: list[tuple[str, int]]) -> int:
        """The floor past the numbers of the topics ``forgotten`` (recorded if it rose)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'history_floor'").fetchone()
        floor = int(row[0]) if row else 0
        highest = max((n for _t, n in forgotten), default=0)
        if highest > floor:
            floor = highest
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('history_floor', ?)", (str(floor),))
        return floor

    def read_history(self, prefix: str, after_pos: int, since_ts: float | None, max_rows: int, max_bytes: int,
                     next_from: str | None = None,
                     ) -> tuple[list[tuple[int, str, int, int, float, bytes, bytes | None]], dict[str, int] | None,
                                dict[str, int], str | None]:
        """Kept frames of the topics under ``prefix``, oldest first, after position
        ``after_pos`` (and kept since ``since_ts``, if given): at most ``max_rows`` rows and
        about ``max_bytes`` (its payloads, meta frames and topics' UTF-8 bytes, those of
        the topics in the third, and `_HISTORY_ROW_BYTES` a row for the rest). Then, when
        no more follow, `history_next` as it was when the rows were read (in one hold of
        the store, so that nothing is kept in between), or, given ``next_from``, the piece
        of it from that topic on in what is left of ``max_bytes`` (`_history_next_piece`);
        None when more follow. Third, where the numbering of the topics of those rows
        began, for those that began past 0; last, the first topic the piece left out
        (None: none was, or no piece). Raises `StoreError`."""
        low, high = _prefix_range(prefix)
        sql = ("SELECT pos, topic, seq, count, ts, payload, meta, "
               "(SELECT start FROM history_topics t WHERE t.topic = history.topic) FROM history WHERE pos > ? "
               "AND topic >= ? AND topic < ?" + (" AND ts >= ?" if since_ts is not None else "") + " ORDER BY pos LIMIT ?")
        params: tuple[Any, ...] = (after_pos, low, high, *((since_ts,) if since_ts is not None else ()), max_rows + 1)
        rows: list[tuple[int, str, int, int, float, bytes, bytes | None]] = []
        starts: dict[str, int] = {}
        size = 0
        with self._lock:
            for row in self._read(sql, params):
                # (a topic weighs its UTF-8 bytes, not its characters, and once more in
                # "start" if numbered past 0: counted as characters, and with no "start",
                # pages of 197-byte topics of emoji were 3.9 times their budget)
                name = len(row[1].encode("utf-8", "replace"))
                weight = len(row[5]) + len(row[6] or b"") + name + _HISTORY_ROW_BYTES
                if row[7] and row[1] not in starts:
                    weight += name + _NEXT_ENTRY_BYTES
                if len(rows) == max_rows or (rows and size + weight > max_bytes):
                    return rows, None, starts, None
                rows.append(row[:7])
                if row[7]:
                    starts[row[1]] = int(row[7])
                size += weight
            if next_from is None:
                return rows, self._history_next(prefix), starts, None
            piece, rest = self._history_next_piece(prefix, next_from, max_bytes - size)
            return rows, piece, starts, rest

    def _read(self, sql: str, params: Sequence[Any] = (), messages: int | None = None,
              max_bytes: int | None = None, at_least_one: bool = True) -> list[Any]:
        """The rows ``sql`` selects (lock held). With ``messages``: rows of outbox segments
        (their message count second, their items third), whole, only until they hold that
        many messages or more, where the query stops, however many rows follow; with
        ``max_bytes`` too, only while their items fit in it (the first row even if it
        does not, with ``at_least_one``). A failing read raises `StoreError`."""
        import sqlite3

        try:
            cursor = self._db.execute(sql, params)
            if messages is None:
                return cursor.fetchall()
            rows: list[Any] = []
            total = size = 0
            most = max_bytes if max_bytes is not None else float("inf")
            # (a row fetched is in memory: with a byte budget, one at a time, so that at most
            # one segment past the budget is read and let go)
            at_a_time = _ROWS_PER_FETCH if max_bytes is None else 1
            try:
                while total < messages and size < most and (fetched := cursor.fetchmany(at_a_time)):
                    for row in fetched:
                        if max_bytes is not None:
                            size += _stored_size(row[2])
                            if size > max_bytes and (rows or not at_least_one):
                                return rows  # (this row would pass the budget)
                        rows.append(row)
                        total += _sane_count(row[1])
                        if total >= messages or size >= most:
                            break
            finally:
                cursor.close()
            return rows
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:  # (the latter two: a value SQLite cannot bind)
            raise StoreError(f"store read failed: {exc}") from exc

    def load_cursors(self, name: str) -> dict[str, dict[str, tuple[int, int, int]]]:
        """Where the durable subscription ``name`` is: ``{stream: {topic: (seq, upto, pos)}}``.
        Raises `StoreError`."""
        with self._lock:
            rows = self._read("SELECT stream, topic, seq, upto, pos FROM cursors WHERE name = ?", (name,))
        found: dict[str, dict[str, tuple[int, int, int]]] = {}
        for stream, topic, seq, upto, pos in rows:
            found.setdefault(stream, {})[topic] = (seq, upto, pos)
        return found

    def load_cursor_runs(self, name: str) -> dict[str, str]:
        """The publisher run the durable subscription ``name`` last followed, per stream
        (see `runs`). Raises `StoreError`."""
        with self._lock:
            return dict(self._read("SELECT stream, run FROM cursor_runs WHERE name = ?", (name,)))

    def save_cursors(self, rows: Sequence[tuple[str, str, str, int, int, int]],
                     runs: Sequence[tuple[str, str, str]] = ()) -> None:
        """Record ``(name, stream, topic, seq, upto, pos)`` cursors, and ``(name, stream,
        run)`` runs followed, in one transaction."""
        statements: list[tuple[str, Any]] = []
        if rows:
            statements.append(("INSERT OR REPLACE INTO cursors (name, stream, topic, seq, upto, pos) "
                               "VALUES (?, ?, ?, ?, ?, ?)", list(rows)))
        if runs:
            statements.append(("INSERT OR REPLACE INTO cursor_runs (name, stream, run) VALUES (?, ?, ?)", list(runs)))
        if statements:
            self._write(statements)

    def forget_cursors(self, name: str, stream: str, topics: Sequence[str]) -> None:
        """Forget where the durable subscription ``name`` is in the ``topics`` of ``stream``
        (their publisher forgot them: see `Replays`), in one transaction."""
        if topics:
            self._write([("DELETE FROM cursors WHERE name = ? AND stream = ? AND topic = ?",
                          [(name, stream, topic) for topic in topics])])

    # -- effectively-once ----------------------------------------------------------------------

    def seen(self, queue: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` were already handled on ``queue``."""
        if not ids:
            return set()
        with self._lock:
            marks = ",".join("?" * len(ids))
            rows = self._read(f"SELECT id FROM handled WHERE queue = ? AND id IN ({marks})", (queue, *ids))
        return {r[0] for r in rows}

    def remember(self, queue: str, ids: Sequence[str]) -> None:
        """Record ``ids`` as handled on ``queue`` (numbered in order: the trim keeps the newest)."""
        sql = "INSERT OR IGNORE INTO handled (queue, id, at) VALUES (?, ?, ?)"
        with self._lock:
            first = self._handled_serial
            self._handled_serial += len(ids)
            if len(ids) == 1:
                self._commit(lambda db: db.execute(sql, (queue, ids[0], first)), single=True)
            else:
                self._write_locked([(sql, [(queue, i, first + k) for k, i in enumerate(ids)])])

    def trim_handled(self, queue: str, keep: int) -> None:
        """Forget all but about the newest ``keep`` handled ids of ``queue``."""
        self._write([("DELETE FROM handled WHERE queue = ? AND at < (SELECT at FROM handled WHERE queue = ? "
                      "ORDER BY at DESC LIMIT 1 OFFSET ?)", (queue, queue, keep))])

    @property
    def checkpoints(self) -> int:
        """Checkpoints of the write-ahead log done so far by the store's own thread."""
        return self._checkpointer.checkpoints

    def close(self) -> None:
        """Close the database and release the lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._checkpointer.close()  # (first: the last connection to close checkpoints all)
        with self._lock:
            try:
                self._db.close()
            finally:
                self._release_lock()


def _on_event_loop() -> bool:
    """Whether the calling thread runs an asyncio event loop (asyncio is not imported
    for it: a process without it has none)."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return False
    try:
        aio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _try_lock(handle: Any) -> bool:
    """Take the exclusive lock on the open lock file ``handle`` if nobody holds it."""
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _numbering_mark(db: sqlite3.Connection) -> int:
    """A mark of the history's numbering: the highest position (``history.pos``) ever
    given. Every message numbered is kept in a row committed before it is sent, and
    AUTOINCREMENT never gives a position twice, nor lowers the highest one when rows are
    deleted (trimmed, expired): the mark rises with each commit of numbered messages and
    with nothing else."""
    import sqlite3

    try:
        found = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'history'").fetchone()
    except sqlite3.OperationalError:
        # (no such table: every run then seems to number nothing, and is named for the
        # last `RUNS_KEPT` openings only, as before there were marks)
        return 0
    return int(found[0]) if found else 0


def _schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of the zmqmesh store open as ``db``. Raises `StoreError` for
    another SQLite database or a missing version."""
    import sqlite3

    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):  # (it cannot be read: say why, not what it is not)
            raise StoreError(f"cannot read the store {path}: {exc}") from exc
        raise StoreError(f"{path} is an SQLite database but not a zmqmesh store") from None
    if meta.get("app") != _APP:
        raise StoreError(f"{path} is an SQLite database but not a zmqmesh store")
    try:
        return int(meta.get("schema_version", ""))
    except ValueError:
        raise StoreError(f"the store {path} has no valid schema version") from None


def _sane_count(count: object) -> int:
    """A stored count as the store reckons with it (see `_COUNT_SQL`; a damaged one that is
    no whole number, as 1)."""
    return min(max(count, 1), SEGMENT_MAX) if type(count) is int else 1


def _sane_attempts(n: object) -> int:
    """A stored count of failed deliveries as the store hands it out: a damaged one that is
    no whole number, or is below 0, as 0 (a puller refuses a batch with such a count in it,
    and every message dealt with it)."""
    return n if type(n) is int and n >= 0 else 0


def _stored_size(items: object) -> int:
    """The bytes of a segment's stored ``items`` (a damaged one that is no blob: its text's,
    or 0), as a read's byte budget counts them."""
    return len(items) if isinstance(items, (bytes, str)) else 0


def _span(first: int, count: int, before: int) -> int:
    """How many numbers the segment at ``first`` stored with ``count`` may hold: its count
    as the store reckons with it, short of ``before`` (its queue's next segment, or the
    next number to be given), since a damaged segment's count may be anything."""
    return min(_sane_count(count), before - first)


def _queue_summary(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    rows = db.execute(
        f"SELECT queue, sum({_COUNT_SQL} - (SELECT ifnull(sum(hi - lo + 1), 0) FROM settled "
        f"WHERE lo BETWEEN o.seq AND o.seq + {_COUNT_SQL} - 1)), sum(length(items)), min(ts) "
        "FROM outbox o GROUP BY queue ORDER BY queue").fetchall()
    return {q: {"messages": n, "bytes": b or 0, "oldest": oldest} for q, n, b, oldest in rows if n}


def _topic_summary(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    rows = db.execute("SELECT topic, sum(count), sum(length(payload) + ifnull(length(meta), 0)), min(ts), "
                      "min(seq) FROM history GROUP BY topic ORDER BY topic").fetchall()
    numbering = dict(db.execute("SELECT topic, next FROM history_topics").fetchall())
    return {t: {"messages": n, "bytes": b or 0, "oldest": oldest, "first_seq": first,
                "next_seq": numbering.get(t, first + n)} for t, n, b, oldest, first in rows}


def _prefix_range(prefix: str) -> tuple[str, str]:
    """``(low, high)``: the topics starting with ``prefix`` are those with low <= topic < high."""
    if not prefix:
        return "", "\U0010ffff\U0010ffff"
    last = ord(prefix[-1])
    return prefix, prefix[:-1] + (chr(last + 1) if last < 0x10FFFF else prefix[-1] + "\U0010ffff")


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring a store of an older schema up to `SCHEMA_VERSION`, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    if version == 1:  # a row per message: each becomes a segment of one
        db.execute("ALTER TABLE outbox RENAME TO outbox_v1")
        for statement in _OUTBOX:
            db.execute(statement)
        for seq, queue, msg_id, ts, headers, body, attempts in db.execute(
                "SELECT seq, queue, id, ts, headers, body, attempts FROM outbox_v1 ORDER BY seq").fetchall():
            db.execute("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, 1, ?, ?)",
                       (seq, queue, ts, msgpack.packb([[msg_id, ts, headers, body]])))
            if attempts:
                db.execute("INSERT INTO attempts (seq, n) VALUES (?, ?)", (seq, attempts))
        db.execute("DROP TABLE outbox_v1")
    if version <= 2:  # kept topics and durable subscriptions; the store's stream id
        for statement in _HISTORY:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('stream', ?)", (uuid.uuid4().hex,))
    elif version == 3:  # the numbering of kept topics stored apart from their rows
        for statement in _HISTORY_4:
            db.execute(statement)
        db.execute("INSERT INTO history_topics (topic, next) SELECT topic, max(seq + count) FROM history GROUP BY topic")
    if version in (3, 4):  # the publisher runs durable subscriptions followed
        for statement in _HISTORY_5:
            db.execute(statement)
    # (from 5, nothing to change: a segment may now hold entries marked redelivered, which
    # an older zmqmesh would take for damage; the new version makes it refuse the store)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    db.execute("COMMIT")


def _not_plain(path: Path) -> StoreError:
    return StoreError(f"{path} is not a plain file (a FIFO or a device?): a store's database must be a file")


def _held_by_another(path: Path) -> StoreLockedError:
    return StoreLockedError(f"the database {path} is in use by another node, through another name (a link to it)")


def _held_here(path: Path) -> bool:
    """Whether a store of this process holds the database ``path`` names."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    with _HELD_LOCK:
        return (info.st_dev, info.st_ino) in _HELD


def _check_sqlite_file(path: Path) -> None:
    """Raise `StoreError` unless ``path`` is missing, empty, or an SQLite database in a
    plain file (a FIFO or a device could block the open)."""
    try:
        if not path.exists():
            return
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise _not_plain(path)
        if info.st_size == 0:
            return
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if head != _SQLITE_MAGIC:
        raise StoreError(f"{path} is not a zmqmesh store (not an SQLite database); "
                         "move it away or name another store directory")


def inspect_store(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What a store holds, read without taking it (the node using it may run):
    ``{"path", "bytes", "schema", "queues": {name: {messages, bytes, oldest}}, "handled": {queue: ids},
    "topics": {topic: {messages, bytes, oldest, first_seq, next_seq}}, "subscriptions": {name: cursors}}``.

    Raises `StoreError` if there is no zmqmesh store there, or it cannot be read: one of
    schema 4 or older until a node opens it (and upgrades it), one a newer zmqmesh wrote.
    """
    path = Path(directory) / DB_FILE
    if not path.exists():
        raise StoreError(f"no zmqmesh store in {directory} (no {DB_FILE})")
    if not _held_here(path):  # (one a node of this process holds is its store: never opened here, see `_hold_database`)
        _check_sqlite_file(path)
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the store {path}: {exc}") from exc
    try:
        schema = _schema_version(db, path)
        if schema > SCHEMA_VERSION:
            raise StoreError(f"the store {path} was written by a newer zmqmesh (schema {schema}, "
                             f"this one reads up to {SCHEMA_VERSION})")
        if schema < _INSPECTED_FROM:
            raise StoreError(f"the store {path} was written by an older zmqmesh (schema {schema}): "
                             "a node opening it upgrades it")
        queues = _queue_summary(db)
        topics = _topic_summary(db)
        handled = dict(db.execute("SELECT queue, count(*) FROM handled GROUP BY queue").fetchall())
        subscriptions = dict(db.execute("SELECT name, count(*) FROM cursors GROUP BY name").fetchall())
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the store {path}: {exc}") from exc
    finally:
        db.close()
    size = sum(os.path.getsize(str(path) + s) for s in ("", "-wal") if os.path.exists(str(path) + s))
    return {
        "path": str(path),
        "bytes": size,
        "schema": schema,
        "queues": queues,
        "handled": handled,
        "topics": topics,
        "subscriptions": subscriptions,
    }


def retry_dead_letters(directory: str | os.PathLike[str], queue: str, dead_letter: str | None = None) -> int:
    """Move every dead letter of ``queue`` (the queue ``dead_letter``, default
    ``"<queue>.dead"``) back to the end of ``queue``; how many moved. The store must not be
    in use: raises `StoreLockedError` while its node runs, `StoreError` if there is none."""
    with _existing(directory) as store:
        return store.requeue(dead_letter or f"{queue}.dead", queue)


def drop_dead_letters(directory: str | os.PathLike[str], queue: str, dead_letter: str | None = None) -> int:
    """Delete every dead letter of ``queue``; how many there were. Raises as
    `retry_dead_letters` does."""
    with _existing(directory) as store:
        return store.drop_queue(dead_letter or f"{queue}.dead")


@contextlib.contextmanager
def _existing(directory: str | os.PathLike[str]) -> Iterator[Store]:
    """The store in ``directory``, which must exist (never created here), closed after use."""
    if not (Path(directory) / DB_FILE).exists():
        raise StoreError(f"no zmqmesh store in {directory} (no {DB_FILE})")
    store = Store(directory, new_run=False)
    try:
        yield store
    finally:
        store.close()
