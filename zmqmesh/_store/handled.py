"""Effectively-once pulls: the ids of the messages a dedupe puller handled, per queue, in
the store (`Store.handled`), numbered in order so that a trim keeps the newest."""

from __future__ import annotations

from collections.abc import Sequence

from .database import Database

__all__ = ["Handled"]


class Handled:
    """The handled ids of the store whose connection is ``database`` (read when the store
    opens: where their numbering goes on)."""

    def __init__(self, database: Database) -> None:
        self._db = database
        with database.lock:
            self._serial = int(database.read("SELECT ifnull(max(at), 0) + 1 FROM handled")[0][0])

    def seen(self, queue: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` were already handled on ``queue``."""
        if not ids:
            return set()
        with self._db.lock:
            marks = ",".join("?" * len(ids))
            rows = self._db.read(f"SELECT id FROM handled WHERE queue = ? AND id IN ({marks})", (queue, *ids))
        return {r[0] for r in rows}

    def remember(self, queue: str, ids: Sequence[str]) -> None:
        """Record ``ids`` as handled on ``queue`` (numbered in order: the trim keeps the newest)."""
        sql = "INSERT OR IGNORE INTO handled (queue, id, at) VALUES (?, ?, ?)"
        with self._db.lock:
            first = self._serial
            self._serial += len(ids)
            if len(ids) == 1:
                self._db.commit(lambda db: db.execute(sql, (queue, ids[0], first)), single=True)
            else:
                self._db.write_locked([(sql, [(queue, i, first + k) for k, i in enumerate(ids)])])

    def trim(self, queue: str, keep: int) -> None:
        """Forget all but about the newest ``keep`` handled ids of ``queue``."""
        self._db.write([("DELETE FROM handled WHERE queue = ? AND at < (SELECT at FROM handled WHERE queue = ? "
                         "ORDER BY at DESC LIMIT 1 OFFSET ?)", (queue, queue, keep))])
