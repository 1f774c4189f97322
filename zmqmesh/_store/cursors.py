"""Durable subscriptions' cursors: where each is in each publisher stream's topics, the
publisher run it last followed, and where it began in a stream it began mid-stream and
has not yet read through, in the store (`Store.cursors`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .database import Database

__all__ = ["Cursors"]


class Cursors:
    """The cursors of durable subscriptions in the store whose connection is ``database``."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def load(self, name: str) -> dict[str, dict[str, tuple[int, int, int]]]:
        """Where the durable subscription ``name`` is: ``{stream: {topic: (seq, upto, pos)}}``
        (`load_counting`, without the count). Raises `StoreError`."""
        return self.load_counting(name)[0]

    def load_counting(self, name: str) -> tuple[dict[str, dict[str, tuple[int, int, int]]], int]:
        """Where the durable subscription ``name`` is: ``{stream: {topic: (seq, upto, pos)}}``,
        and how many of its rows were damaged (values of the wrong type, which SQLite's
        check does not see, or text that is no UTF-8).

        A damaged row of a stream and topic that can be read is taken as no place in that
        topic (``(-1, -1, 0)``: read again from the start of the history). A row whose
        topic cannot be read is taken as no place in a topic of its stream that cannot be
        named: that stream is read again from the start of its history (every position of
        it 0; it is listed, with no topic, if no other row of it can be read), its other
        topics resuming after their numbers. A row whose stream cannot be read does so for
        every stream the name has a place in or followed a run of (``cursor_runs``).
        Raises `StoreError`."""
        with self._db.lock:
            rows = self._db.read(f"SELECT {_readable('stream')}, {_readable('topic')}, seq, upto, pos "
                                 "FROM cursors WHERE name = ?", (name,))
            followed: list[Any] = []
            if any(_text(row[0], row[1]) is None for row in rows):
                followed = self._db.read(f"SELECT {_readable('stream')} FROM cursor_runs WHERE name = ?", (name,))
        found: dict[str, dict[str, tuple[int, int, int]]] = {}
        from_start: set[str] = set()
        every_stream = False
        damaged = 0
        for stream_type, stream_bytes, topic_type, topic_bytes, seq, upto, pos in rows:
            stream, topic = _text(stream_type, stream_bytes), _text(topic_type, topic_bytes)
            if stream is None or topic is None:
                damaged += 1
                if stream is None:
                    every_stream = True
                else:
                    from_start.add(stream)
                continue
            if not (type(seq) is int and type(upto) is int and type(pos) is int and seq >= -1 and upto >= -1
                    and pos >= 0):
                damaged += 1
                seq, upto, pos = -1, -1, 0
            found.setdefault(stream, {})[topic] = (seq, upto, pos)
        if every_stream:
            from_start.update(found)
            from_start.update(s for s in (_text(*row) for row in followed) if s is not None)
        for stream in from_start:
            topics = found.setdefault(stream, {})
            for topic, (seq, upto, _pos) in topics.items():
                topics[topic] = (seq, upto, 0)
        return found, damaged

    def load_runs(self, name: str) -> dict[str, str]:
        """The publisher run the durable subscription ``name`` last followed, per stream
        (see `Store.runs`); a damaged one (not text, or no UTF-8) as a run no publisher
        names (the stream is then read again whole, as for a publisher restored from a
        copy); a row whose stream cannot be read is left out. Raises `StoreError`."""
        with self._db.lock:
            rows = self._db.read(f"SELECT {_readable('stream')}, {_readable('run')} FROM cursor_runs WHERE name = ?",
                                 (name,))
        runs: dict[str, str] = {}
        for stream_type, stream_bytes, run_type, run_bytes in rows:
            stream = _text(stream_type, stream_bytes)
            if stream is not None:
                run = _text(run_type, run_bytes)
                runs[stream] = "" if run is None else run
        return runs

    def load_began(self, name: str) -> dict[str, tuple[int, float | None]]:
        """Where the durable subscription ``name`` began, per stream it began mid-stream and
        has not yet read through: ``{stream: (pos, since)}``, the history position and the
        time (None: none) its reads go from. A damaged row (a stream that cannot be read, a
        position or time of the wrong type) is left out: that stream is resumed as its
        places say, or begun again as ``replay`` says if it has none. Raises `StoreError`."""
        with self._db.lock:
            rows = self._db.read(f"SELECT {_readable('stream')}, pos, since FROM cursor_began WHERE name = ?",
                                 (name,))
        began: dict[str, tuple[int, float | None]] = {}
        for stream_type, stream_bytes, pos, since in rows:
            stream = _text(stream_type, stream_bytes)
            if (stream is not None and type(pos) is int and pos >= 0
                    and (since is None or type(since) in (int, float))):
                began[stream] = (pos, None if since is None else float(since))
        return began

    def save(self, rows: Sequence[tuple[str, str, str, int, int, int]],
             runs: Sequence[tuple[str, str, str]] = (),
             began: Sequence[tuple[str, str, int, float | None]] = (),
             read_through: Sequence[tuple[str, str]] = ()) -> None:
        """Record ``(name, stream, topic, seq, upto, pos)`` cursors, ``(name, stream, run)``
        runs followed, ``(name, stream, pos, since)`` where subscriptions began mid-stream
        (`load_began`), and forget where ``(name, stream)`` of ``read_through`` began (a read
        went through), in one transaction."""
        statements: list[tuple[str, Any]] = []
        if rows:
            statements.append(("INSERT OR REPLACE INTO cursors (name, stream, topic, seq, upto, pos) "
                               "VALUES (?, ?, ?, ?, ?, ?)", list(rows)))
        if runs:
            statements.append(("INSERT OR REPLACE INTO cursor_runs (name, stream, run) VALUES (?, ?, ?)", list(runs)))
        if began:
            statements.append(("INSERT OR REPLACE INTO cursor_began (name, stream, pos, since) VALUES (?, ?, ?, ?)",
                               list(began)))
        if read_through:
            statements.append(("DELETE FROM cursor_began WHERE name = ? AND stream = ?", list(read_through)))
        if statements:
            self._db.write(statements)

    def forget(self, name: str, stream: str, topics: Sequence[str]) -> None:
        """Forget where the durable subscription ``name`` is in the ``topics`` of ``stream``
        (their publisher forgot them: see `Replays`), in one transaction."""
        if topics:
            self._db.write([("DELETE FROM cursors WHERE name = ? AND stream = ? AND topic = ?",
                             [(name, stream, topic) for topic in topics])])

    def forget_name(self, name: str) -> dict[str, int]:
        """Forget the durable subscription ``name``: every place, run and beginning it has,
        in one transaction; what it had, ``{"streams": publisher streams, "topics": places}``.
        Raises `StoreFullError`, `StoreError`."""
        with self._db.lock:
            (streams, topics), = self._db.read(
                "SELECT count(DISTINCT stream), ifnull(sum(place), 0) FROM (SELECT stream, 1 AS place FROM cursors "
                "WHERE name = ? UNION ALL SELECT stream, 0 FROM cursor_runs WHERE name = ? "
                "UNION ALL SELECT stream, 0 FROM cursor_began WHERE name = ?)", (name, name, name))
            self._db.write_locked([("DELETE FROM cursors WHERE name = ?", [(name,)]),
                                   ("DELETE FROM cursor_runs WHERE name = ?", [(name,)]),
                                   ("DELETE FROM cursor_began WHERE name = ?", [(name,)])])
        return {"streams": streams, "topics": topics}

    def forget_streams(self, name: str, streams: Sequence[str]) -> None:
        """Forget where the durable subscription ``name`` is in ``streams``, every topic,
        the runs it followed of them and where it began in them (`Replays` bounds the
        streams a name keeps), in one transaction. Raises `StoreFullError`, `StoreError`."""
        if streams:
            params = [(name, stream) for stream in streams]
            self._db.write([("DELETE FROM cursors WHERE name = ? AND stream = ?", params),
                            ("DELETE FROM cursor_runs WHERE name = ? AND stream = ?", params),
                            ("DELETE FROM cursor_began WHERE name = ? AND stream = ?", params)])


def _readable(column: str) -> str:
    """The SQL that selects a text ``column`` as its type and its bytes (`_text`): selected as
    itself, text that is no UTF-8 (damage) made the whole read fail."""
    return f"typeof({column}), CAST({column} AS BLOB)"


def _text(kind: Any, raw: Any) -> str | None:
    """The text a column selected by `_readable` holds, or None if it is damaged: of
    another type than text, or no UTF-8."""
    if kind != "text" or not isinstance(raw, bytes):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
