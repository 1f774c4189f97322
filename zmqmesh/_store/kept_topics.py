"""Kept topics: what a publisher keeps of the topics it publishes (``history=``), a row
per frame it sent, and the numbering of each topic, in the store (`Store.history`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .database import Database

if TYPE_CHECKING:
    import sqlite3

__all__ = ["KeptTopics", "prefix_range", "topic_summary"]

_HISTORY_ROW_BYTES = 48  # a kept frame's numbers and msgpack framing in a page of history, about
_NEXT_ENTRY_BYTES = 12  # a topic's number and msgpack framing in a piece of ``next``, at most
_TOPICS_PER_FETCH = 1024  # kept topics read at a time for a piece of ``next``


class KeptTopics:
    """The kept topics of the store whose connection is ``database``. Every method is one
    transaction, or one read under the connection's lock."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def state(self) -> dict[str, tuple[int, int]]:
        """Every topic ever kept: ``{topic: (first kept seq, next seq)}`` (first == next when
        nothing is kept of it any more). Raises `StoreError`."""
        with self._db.lock:
            first: dict[str, int] = dict(self._db.read("SELECT topic, min(seq) FROM history GROUP BY topic"))
            nxt: dict[str, int] = dict(self._db.read("SELECT topic, next FROM history_topics"))
        try:
            return {t: (int(first.get(t, n)), int(n)) for t, n in nxt.items()}
        except (TypeError, ValueError, OverflowError) as exc:  # (a value of the wrong type: damage on disk)
            raise StoreError(f"the store {self._db.directory} is damaged: the numbering of its kept topics cannot "
                             f"be read ({exc}); nothing was reset") from exc

    def numbering(self, prefix: str) -> dict[str, int]:
        """The number of the next message of each kept topic under ``prefix``. Raises `StoreError`."""
        with self._db.lock:
            return self._numbering(prefix)

    def _numbering(self, prefix: str) -> dict[str, int]:
        low, high = prefix_range(prefix)
        return dict(self._db.read("SELECT topic, next FROM history_topics WHERE topic >= ? AND topic < ?", (low, high)))

    def numbering_piece(self, prefix: str, start: str, max_bytes: int) -> tuple[dict[str, int], str | None]:
        """A piece of `numbering`: see `_numbering_piece`. Raises `StoreError`."""
        with self._db.lock:
            return self._numbering_piece(prefix, start, max_bytes)

    def _numbering_piece(self, prefix: str, start: str, max_bytes: int) -> tuple[dict[str, int], str | None]:
        """The number of the next message of the kept topics under ``prefix`` from
        ``start`` on, in topic order, in about ``max_bytes`` (their UTF-8 names and
        `_NEXT_ENTRY_BYTES` each; the first even past it), and the first topic left out
        (None: none was). Lock held; raises `StoreError`."""
        low, high = prefix_range(prefix)
        piece: dict[str, int] = {}
        size = 0
        with self._db.rows("SELECT topic, next FROM history_topics WHERE topic >= ? AND topic < ? ORDER BY topic",
                           (max(low, start), high)) as cursor:
            while fetched := cursor.fetchmany(_TOPICS_PER_FETCH):
                for topic, nxt in fetched:
                    size += len(topic.encode("utf-8", "replace")) + _NEXT_ENTRY_BYTES
                    if piece and size > max_bytes:
                        return piece, topic
                    piece[topic] = int(nxt)
        return piece, None

    def keep(self, rows: Sequence[tuple[str, int, int, float, bytes, bytes | None]]) -> None:
        """`keep_placed` at the positions next (`last_position`), ``(topic, seq, count, ts,
        payload, meta)`` each. Raises `StoreFullError`, `StoreError`."""
        first = self.last_position() + 1
        self.keep_placed([(first + i, *row) for i, row in enumerate(rows)])

    def keep_placed(self, rows: Sequence[tuple[int, str, int, int, float, bytes, bytes | None]]) -> None:
        """Keep frames a publisher sent, each at the position it names first, ``(pos, topic,
        seq, count, ts, payload, meta)``: each past every position given before
        (`last_position`), as its publisher said where the frame is before it sent it; and
        the numbering of their topics (a topic numbered anew begins at its first frame's
        seq), in one transaction. Raises `StoreFullError`, `StoreError` (a position given
        before among them)."""
        span: dict[str, list[int]] = {}
        for _pos, topic, seq, count, *_rest in rows:
            found = span.get(topic)
            if found is None:
                span[topic] = [seq, seq + count]
            else:
                found[0], found[1] = min(found[0], seq), max(found[1], seq + count)
        self._db.write([("INSERT INTO history (pos, topic, seq, count, ts, payload, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         list(rows)),
                        ("INSERT INTO history_topics (topic, next, start) VALUES (?, ?, ?) "
                         "ON CONFLICT (topic) DO UPDATE SET next = max(next, excluded.next), emptied = NULL",
                         [(t, nxt, first) for t, (first, nxt) in span.items()])])

    def last_position(self) -> int:
        """The highest position a kept frame was ever given (0: none was): positions are
        never given twice, nor lowered when rows go (trimmed, expired). Raises `StoreError`."""
        with self._db.lock:
            given = self._db.read("SELECT seq FROM sqlite_sequence WHERE name = 'history'")
            highest = self._db.read("SELECT max(pos) FROM history")
        return max(int(given[0][0]) if given else 0, int(highest[0][0] or 0) if highest else 0)

    def floor(self) -> int:
        """Where the numbering of a topic not numbered (never, or forgotten) begins: past
        every number a forgotten topic was given. Raises `StoreError`."""
        with self._db.lock:
            found = self._db.read("SELECT value FROM meta WHERE key = 'history_floor'")
        return int(found[0][0]) if found else 0

    def forget_emptied(self, keep_empty: int) -> tuple[list[str], int]:
        """Mark every topic of which nothing is kept (a walk of every topic numbered: at
        start, for a store a version before this or a crash left) and forget the numbering
        of those past the ``keep_empty`` emptied last (`expire`); in one
        transaction. The topics forgotten and the floor. Raises `StoreFullError`, `StoreError`."""
        found: list[tuple[str, int]] = []
        floor = 0

        def run(db: sqlite3.Connection) -> None:
            nonlocal floor
            db.execute("UPDATE history_topics SET emptied = ? WHERE emptied IS NULL AND NOT EXISTS "
                       "(SELECT 1 FROM history h WHERE h.topic = history_topics.topic)", (time.time(),))
            floor = self._evict_empty(db, keep_empty, found)

        with self._db.lock:
            self._db.commit(run)
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

    def trim(self, topic: str, before_seq: int) -> None:
        """Forget the frames of ``topic`` whose messages all come before ``before_seq``."""
        self._db.write([("DELETE FROM history WHERE topic = ? AND seq < ? AND seq + count <= ?",
                         (topic, before_seq, before_seq))])

    def expire(self, prefix: str, before_ts: float, keep: Sequence[str] = (), *,
                       keep_empty: int) -> tuple[list[str], int]:
        """Forget the frames of the topics under ``prefix`` kept since before ``before_ts``,
        but those under the prefixes ``keep`` (kept by other rules), in one transaction.
        The numbering of a topic left with no frame stays (a replay still sees what it
        missed of it as a gap), but only for the ``keep_empty`` topics emptied last: past
        them, the numbering of those emptied longest ago is forgotten, and the floor
        (`floor`) raised past their numbers, so that a topic numbered again never
        reuses a number. The topics forgotten and the floor. Raises `StoreFullError`,
        `StoreError`."""
        low, high = prefix_range(prefix)
        where = "WHERE ts < ? AND topic >= ? AND topic < ?"
        params: list[Any] = [before_ts, low, high]
        for other in keep:
            where += " AND NOT (topic >= ? AND topic < ?)"
            params.extend(prefix_range(other))
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

        with self._db.lock:
            self._db.commit(run)
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

    def read(self, prefix: str, after_pos: int, since_ts: float | None, max_rows: int, max_bytes: int,
                     next_from: str | None = None,
                     ) -> tuple[list[tuple[int, str, int, int, float, bytes, bytes | None]], dict[str, int] | None,
                                dict[str, int], str | None]:
        """Kept frames of the topics under ``prefix``, oldest first, after position
        ``after_pos`` (and kept since ``since_ts``, if given): at most ``max_rows`` rows and
        about ``max_bytes`` (its payloads, meta frames and topics' UTF-8 bytes, those of
        the topics in the third, and `_HISTORY_ROW_BYTES` a row for the rest). Then, when
        no more follow, `numbering` as it was when the rows were read (in one hold of
        the store, so that nothing is kept in between), or, given ``next_from``, the piece
        of it from that topic on in what is left of ``max_bytes`` (`_numbering_piece`);
        None when more follow. Third, where the numbering of the topics of those rows
        began, for those that began past 0; last, the first topic the piece left out
        (None: none was, or no piece). Raises `StoreError`."""
        low, high = prefix_range(prefix)
        sql = ("SELECT pos, topic, seq, count, ts, payload, meta, "
               "(SELECT start FROM history_topics t WHERE t.topic = history.topic) FROM history WHERE pos > ? "
               "AND topic >= ? AND topic < ?" + (" AND ts >= ?" if since_ts is not None else "") + " ORDER BY pos LIMIT ?")
        params: tuple[Any, ...] = (after_pos, low, high, *((since_ts,) if since_ts is not None else ()), max_rows + 1)
        rows: list[tuple[int, str, int, int, float, bytes, bytes | None]] = []
        starts: dict[str, int] = {}
        size = 0
        with self._db.lock:
            for row in self._db.read(sql, params):
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
                return rows, self._numbering(prefix), starts, None
            piece, rest = self._numbering_piece(prefix, next_from, max_bytes - size)
            return rows, piece, starts, rest


def prefix_range(prefix: str) -> tuple[str, str]:
    """``(low, high)``: the topics starting with ``prefix`` are those with low <= topic < high."""
    if not prefix:
        return "", "\U0010ffff\U0010ffff"
    last = ord(prefix[-1])
    return prefix, prefix[:-1] + (chr(last + 1) if last < 0x10FFFF else prefix[-1] + "\U0010ffff")


def topic_summary(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Every kept topic: ``{topic: {messages, bytes, oldest, first_seq, next_seq}}`` (read
    on ``db``, which may be a connection of a tool's own)."""
    rows = db.execute("SELECT topic, sum(count), sum(length(payload) + ifnull(length(meta), 0)), min(ts), "
                      "min(seq) FROM history GROUP BY topic ORDER BY topic").fetchall()
    numbering = dict(db.execute("SELECT topic, next FROM history_topics").fetchall())
    return {t: {"messages": n, "bytes": b or 0, "oldest": oldest, "first_seq": first,
                "next_seq": numbering.get(t, first + n)} for t, n, b, oldest, first in rows}
