"""The store's schema: its tables, its version, the upgrade of an older one, and the
checks that a file is a zmqmesh store before SQLite writes to it."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgpack

from ..errors import StoreError

if TYPE_CHECKING:
    import sqlite3

__all__ = ["SCHEMA_VERSION", "INSPECTED_FROM", "APP", "OUTBOX", "PARKED", "HISTORY", "SCHEMA", "schema_version",
           "migrate", "check_sqlite_file", "check_log", "not_plain"]

SCHEMA_VERSION = 8
INSPECTED_FROM = 5
"""The oldest schema `inspect_store` reads as it is: 5 and 6 have the tables of 7 and 8
but ``cursor_began`` (6 only marks the stores whose segments may hold entries marked
redelivered, 8 those whose segments may be stored as columns)."""
APP = "zmqmesh"
"""What meta 'app' says in every zmqmesh store."""
_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # (the last bit: the byte order of the log's checksums, big-endian if set)
_WAL_VERSION = 3007000
_WAL_HEADER = 32

OUTBOX = (
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
PARKED = (
    # the durable queues with messages stored that the node holds nothing of in memory (nobody
    # pulled them): where their rows begin and the last of them, found without reading the
    # outbox (it has no index by queue: one would cost every commit). Made anew each time a
    # node recovers the store (`Store.park_all`), so a store without it, or one an older zmqmesh
    # wrote to, needs no upgrade
    "CREATE TABLE IF NOT EXISTS parked (queue TEXT PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL)"
    " WITHOUT ROWID"
)
HISTORY_4 = (  # (added by schema 4)
    "CREATE INDEX history_age ON history (ts)",
    # the number of the next message of each kept topic: numbering goes on after a restart
    # even when every row of a topic was trimmed or expired
    "CREATE TABLE history_topics (topic TEXT PRIMARY KEY, next INTEGER NOT NULL) WITHOUT ROWID",
)
HISTORY_5 = (  # (added by schema 5)
    # the number a topic's numbering began at: 0, or the store's floor (meta 'history_floor')
    # when it was numbered after topics were forgotten (`KeptTopics.expire`); and when
    # the last of its frames went (NULL while some are kept)
    "ALTER TABLE history_topics ADD COLUMN start INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE history_topics ADD COLUMN emptied REAL",
    "CREATE INDEX history_topics_emptied ON history_topics (emptied) WHERE emptied IS NOT NULL",
    # the publisher run a durable subscription last followed, per stream (see `Store.runs`)
    "CREATE TABLE cursor_runs (name TEXT NOT NULL, stream TEXT NOT NULL, run TEXT NOT NULL,"
    " PRIMARY KEY (name, stream)) WITHOUT ROWID",
)
HISTORY_7 = (  # (added by schema 7)
    # a durable subscription that began mid-stream (``replay="new"`` or in seconds) in a
    # publisher stream and has not yet read that history through: the bound its reads go
    # from, the history position ``pos`` and, if any, the time ``since`` (epoch seconds,
    # read against the publisher's timestamps); gone once a read goes through
    "CREATE TABLE cursor_began (name TEXT NOT NULL, stream TEXT NOT NULL, pos INTEGER NOT NULL, since REAL,"
    " PRIMARY KEY (name, stream)) WITHOUT ROWID",
)
HISTORY = (
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
    *HISTORY_4,
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
    *HISTORY_5,
    *HISTORY_7,
)
SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    *OUTBOX,
    *HISTORY,
    # ids of messages a dedupe puller handled, per queue; "at" numbers them in order
    "CREATE TABLE handled (queue TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (queue, id))"
    " WITHOUT ROWID",
    "CREATE INDEX handled_age ON handled (queue, at)",
)


def schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of the zmqmesh store open as ``db``. Raises `StoreError` for
    another SQLite database or a missing version."""
    import sqlite3

    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):  # (it cannot be read: say why, not what it is not)
            raise StoreError(f"cannot read the store {path}: {exc}") from exc
        raise StoreError(f"{path} is an SQLite database but not a zmqmesh store") from None
    if meta.get("app") != APP:
        raise StoreError(f"{path} is an SQLite database but not a zmqmesh store")
    try:
        return int(meta.get("schema_version", ""))
    except ValueError:
        raise StoreError(f"the store {path} has no valid schema version") from None


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring a store of an older schema up to `SCHEMA_VERSION`, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    if version == 1:  # a row per message: each becomes a segment of one
        db.execute("ALTER TABLE outbox RENAME TO outbox_v1")
        for statement in OUTBOX:
            db.execute(statement)
        for seq, queue, msg_id, ts, headers, body, attempts in db.execute(
                "SELECT seq, queue, id, ts, headers, body, attempts FROM outbox_v1 ORDER BY seq").fetchall():
            db.execute("INSERT INTO outbox (seq, queue, count, ts, items) VALUES (?, ?, 1, ?, ?)",
                       (seq, queue, ts, msgpack.packb([[msg_id, ts, headers, body]])))
            if attempts:
                db.execute("INSERT INTO attempts (seq, n) VALUES (?, ?)", (seq, attempts))
        db.execute("DROP TABLE outbox_v1")
    if version <= 2:  # kept topics and durable subscriptions; the store's stream id
        for statement in HISTORY:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('stream', ?)", (uuid.uuid4().hex,))
    elif version == 3:  # the numbering of kept topics stored apart from their rows
        for statement in HISTORY_4:
            db.execute(statement)
        db.execute("INSERT INTO history_topics (topic, next) SELECT topic, max(seq + count) FROM history GROUP BY topic")
    if version in (3, 4):  # the publisher runs durable subscriptions followed
        for statement in HISTORY_5:
            db.execute(statement)
    # (from 5, nothing to change for 6: a segment may now hold entries marked redelivered,
    # which an older zmqmesh would take for damage; the new version makes it refuse the store)
    if 3 <= version <= 6:
        # where durable subscriptions began mid-stream. A zmqmesh of schema 5 or 6 recorded
        # a publisher's run at a subscription's first start, before any read of its history
        # went through, and took a stream with a run but no place for one never met (a
        # first start again, as ``replay`` says); read now as a stream resumed from the start
        # of its history, such a row gave the whole history under the prefix once. It is
        # read as the version that wrote it read it: the run goes (a stream of which no
        # place was recorded is begun again as ``replay`` says). A stream with places keeps
        # its run: resumed from them as before.
        for statement in HISTORY_7:
            db.execute(statement)
        db.execute("DELETE FROM cursor_runs WHERE NOT EXISTS (SELECT 1 FROM cursors WHERE cursors.name = "
                   "cursor_runs.name AND cursors.stream = cursor_runs.stream)")
    # (from 7, nothing to change for 8: a segment may now be stored as columns, which an
    # older zmqmesh would take for damage; the new version makes it refuse the store)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    db.execute("COMMIT")


def not_plain(path: Path) -> StoreError:
    """The error for a store database that is not a plain file."""
    return StoreError(f"{path} is not a plain file (a FIFO or a device?): a store's database must be a file")


def check_sqlite_file(path: Path) -> None:
    """Raise `StoreError` unless ``path`` is missing, empty, or an SQLite database in a
    plain file (a FIFO or a device could block the open)."""
    try:
        if not path.exists():
            return
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise not_plain(path)
        if info.st_size == 0:
            return
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if head != _SQLITE_MAGIC:
        raise StoreError(f"{path} is not a zmqmesh store (not an SQLite database); "
                         "move it away or name another store directory")


def check_log(path: Path) -> None:
    """Raise `StoreError` if the write-ahead log beside the database ``path`` (its ``-wal``
    file) holds commits SQLite would throw away at the open: a log whose header is not one
    (SQLite takes it for an empty log, and overwrites it), or one beside a database of no
    bytes (SQLite deletes it; a store's database has its first page before it ever has a
    log). Either lost every commit since the last checkpoint, counted nowhere; the files
    are left as they are. A log shorter than its header, or whose header is zeros (a log
    cut short, by a power cut), is taken as SQLite takes it: nothing in it was committed
    for good. Call with the store's locks held (no node writes the log meanwhile)."""
    log = path.with_name(path.name + "-wal")
    try:
        info = log.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read {log}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{log} is not a plain file (a FIFO or a device?): a store's write-ahead log must be a file")
    if info.st_size < _WAL_HEADER:
        return
    try:
        with open(log, "rb") as f:
            head = f.read(_WAL_HEADER)
        database_bytes = path.stat().st_size if path.exists() else 0
    except OSError as exc:
        raise StoreError(f"cannot read {log}: {exc}") from exc
    if len(head) < _WAL_HEADER or head == bytes(_WAL_HEADER):
        return
    if not _wal_header_sound(head):
        raise StoreError(f"the store's write-ahead log {log} is damaged (no SQLite log header): the commits it "
                         "holds cannot be read, and opening the store would throw them away; nothing was reset "
                         "(move the log away to open the store without them)")
    if database_bytes == 0:
        raise StoreError(f"the store {path} is damaged: the database holds no bytes (truncated?) beside a "
                         f"write-ahead log {log} of {info.st_size} bytes, which opening it would delete; nothing "
                         "was reset (delete both to start afresh: a database deleted alone leaves its log)")


def _wal_header_sound(head: bytes) -> bool:
    """Whether ``head``, the first 32 bytes of a write-ahead log, is an SQLite log header:
    its magic number, version and checksum (of its first 24 bytes, in the byte order its
    magic number says)."""
    magic, version = int.from_bytes(head[0:4], "big"), int.from_bytes(head[4:8], "big")
    if magic not in _WAL_MAGIC or version != _WAL_VERSION:
        return False
    order: Literal["big", "little"] = "big" if magic & 1 else "little"
    s0 = s1 = 0
    for at in range(0, 24, 8):
        s0 = (s0 + int.from_bytes(head[at:at + 4], order) + s1) & 0xFFFFFFFF
        s1 = (s1 + int.from_bytes(head[at + 4:at + 8], order) + s0) & 0xFFFFFFFF
    return (s0, s1) == (int.from_bytes(head[24:28], "big"), int.from_bytes(head[28:32], "big"))
