"""A store's one SQLite connection, and the lock every use of it holds: reads, and writes
as transactions, each failure raised as the store's own errors."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError, StoreFullError

if TYPE_CHECKING:
    import sqlite3

__all__ = ["Database"]


class Database:
    """The connection ``connection`` to the store in ``directory`` (bounded at ``max_bytes``),
    used under `lock`; ``written`` is told of each transaction committed, with the
    connection, `lock` held (the store's checkpoints follow them).

    Thread-safe as its callers use it: a method named ``..._locked``, `read` and `rows`
    expect `lock` held; the others take it.
    """

    def __init__(self, connection: sqlite3.Connection, directory: Path, max_bytes: int,
                 written: Callable[[sqlite3.Connection], None]) -> None:
        self.connection = connection
        self.directory = directory
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self._written = written
        self.closed = False

    def write(self, statements: Iterable[tuple[str, Any]]) -> None:
        """Run ``(sql, params)`` pairs in one transaction (``params`` a list: executemany).
        Raises `StoreFullError`, `StoreError`."""
        with self.lock:
            self.write_locked(statements)

    def write_locked(self, statements: Iterable[tuple[str, Any]]) -> None:
        """`write`, with `lock` held."""
        def run(db: sqlite3.Connection) -> None:
            for sql, params in statements:
                if isinstance(params, list):
                    db.executemany(sql, params)
                else:
                    db.execute(sql, params)

        self.commit(run)

    def commit(self, work: Callable[[sqlite3.Connection], Any], single: bool = False) -> None:
        """Run ``work(connection)`` as one transaction (a single statement is its own
        transaction), with `lock` held. Raises `StoreFullError`, `StoreError`; nothing of
        a failed transaction is kept."""
        import sqlite3

        db = self.connection
        try:
            if single:
                work(db)
            else:
                db.execute("BEGIN IMMEDIATE")
                work(db)
                db.execute("COMMIT")
            self._written(db)
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
            if isinstance(exc, sqlite3.ProgrammingError) and self.closed:
                raise StoreError("the store is closed (the node stopped)") from exc
            raise StoreError(f"store write failed: {exc}") from exc

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows ``sql`` selects (`lock` held). Raises `StoreError`."""
        with self.rows(sql, params) as cursor:
            return cursor.fetchall()

    @contextlib.contextmanager
    def rows(self, sql: str, params: Sequence[Any] = ()) -> Iterator[sqlite3.Cursor]:
        """A cursor over the rows ``sql`` selects, to fetch from a few at a time and closed
        after (`lock` held). A failing read raises `StoreError`."""
        import sqlite3

        try:
            cursor = self.connection.execute(sql, params)
            try:
                yield cursor
            finally:
                cursor.close()
        except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:  # (the latter two: a value SQLite cannot bind)
            raise StoreError(f"store read failed: {exc}") from exc

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.connection.close()
