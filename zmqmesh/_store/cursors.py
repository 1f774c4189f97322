"""Durable subscriptions' cursors: where each is in each publisher stream's topics, and
the publisher run it last followed, in the store (`Store.cursors`)."""

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
        check does not see). A damaged row of a stream and topic that can be read is taken
        as no place in that topic (``(-1, -1, 0)``: read again from the start of the
        history); one whose stream or topic cannot be read is left out. Raises `StoreError`."""
        with self._db.lock:
            rows = self._db.read("SELECT stream, topic, seq, upto, pos FROM cursors WHERE name = ?", (name,))
        found: dict[str, dict[str, tuple[int, int, int]]] = {}
        damaged = 0
        for stream, topic, seq, upto, pos in rows:
            if type(stream) is not str or type(topic) is not str:
                damaged += 1
                continue
            if not (type(seq) is int and type(upto) is int and type(pos) is int and seq >= -1 and upto >= -1
                    and pos >= 0):
                damaged += 1
                seq, upto, pos = -1, -1, 0
            found.setdefault(stream, {})[topic] = (seq, upto, pos)
        return found, damaged

    def load_runs(self, name: str) -> dict[str, str]:
        """The publisher run the durable subscription ``name`` last followed, per stream
        (see `Store.runs`); a damaged one (not text) as a run no publisher names (the
        stream is then read again whole, as for a publisher restored from a copy). Raises
        `StoreError`."""
        with self._db.lock:
            rows = self._db.read("SELECT stream, run FROM cursor_runs WHERE name = ?", (name,))
        return {stream: run if type(run) is str else "" for stream, run in rows if type(stream) is str}

    def save(self, rows: Sequence[tuple[str, str, str, int, int, int]],
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
            self._db.write(statements)

    def forget(self, name: str, stream: str, topics: Sequence[str]) -> None:
        """Forget where the durable subscription ``name`` is in the ``topics`` of ``stream``
        (their publisher forgot them: see `Replays`), in one transaction."""
        if topics:
            self._db.write([("DELETE FROM cursors WHERE name = ? AND stream = ? AND topic = ?",
                             [(name, stream, topic) for topic in topics])])

    def forget_streams(self, name: str, streams: Sequence[str]) -> None:
        """Forget where the durable subscription ``name`` is in ``streams``, every topic,
        and the runs it followed of them (`Replays` bounds the streams a name keeps), in one
        transaction. Raises `StoreFullError`, `StoreError`."""
        if streams:
            params = [(name, stream) for stream in streams]
            self._db.write([("DELETE FROM cursors WHERE name = ? AND stream = ?", params),
                            ("DELETE FROM cursor_runs WHERE name = ? AND stream = ?", params)])
