"""The operator's tools over a store a node is not running on (the ``zmqmesh store``
commands): what it holds, its dead letters moved back or deleted, and its durable
subscriptions listed or forgotten."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._wire.frames import (
    MAX_NAME_BYTES,
    RESERVED_NAME_PREFIX,
    dead_letter_queue,
    pullable,
)
from ..errors import ArgumentTypeError, ConfigError, StoreError
from .holds import held_here
from .kept_topics import topic_summary
from .schema import INSPECTED_FROM, SCHEMA_VERSION, check_sqlite_file, schema_version
from .store import DB_FILE, Store, queue_summary

__all__ = ["inspect_store", "retry_dead_letters", "drop_dead_letters", "durable_subscriptions",
           "forget_durable_subscription"]


def inspect_store(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What a store holds, read without taking it (the node using it may run):
    ``{"path", "bytes", "schema", "queues": {name: {messages, bytes, oldest}}, "handled": {queue: ids},
    "topics": {topic: {messages, bytes, oldest, first_seq, next_seq}}, "subscriptions": {name: cursors}}``.

    Raises `StoreError` if there is no zmqmesh store there, or it cannot be read: one of
    schema 4 or older until a node opens it (and upgrades it), one a newer zmqmesh wrote;
    `ArgumentTypeError` (a ``TypeError``) for a ``directory`` that is no path.
    """
    with _reading(directory) as (db, path, schema):
        queues = queue_summary(db)
        topics = topic_summary(db)
        handled = dict(db.execute("SELECT queue, count(*) FROM handled GROUP BY queue").fetchall())
        subscriptions = dict(db.execute("SELECT name, count(*) FROM cursors GROUP BY name").fetchall())
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
    ``"<queue>.dead"``) back to the end of ``queue``; how many moved. Those damaged on disk
    (segments that cannot be read) stay where they are, still counted by `inspect_store`.
    The store must not be in use: raises `StoreLockedError` while its node runs,
    `StoreError` if there is none, `ConfigError` for a ``queue`` no node can pull (empty,
    past 200 bytes of UTF-8, or a built-in's name: they would be moved where nothing takes
    them), `ArgumentTypeError` (a ``TypeError``) for a ``directory`` that is no path or a
    ``dead_letter`` that is neither None nor a ``str``."""
    dead = _dead_letters_of(queue, dead_letter)
    with _existing(directory) as store:
        return store.requeue(dead, queue)


def drop_dead_letters(directory: str | os.PathLike[str], queue: str, dead_letter: str | None = None) -> int:
    """Delete every dead letter of ``queue``; how many there were. Those damaged on disk
    stay, as `retry_dead_letters` leaves them. Raises as `retry_dead_letters` does."""
    dead = _dead_letters_of(queue, dead_letter)
    with _existing(directory) as store:
        return store.drop_queue(dead)


def _dead_letters_of(queue: str, dead_letter: str | None) -> str:
    """The queue of ``queue``'s dead letters (`dead_letter_queue`), both names checked:
    raises as `_pullable` does for ``queue``, `ArgumentTypeError` for a ``dead_letter``
    that is neither None nor a ``str`` (``5`` took the queue named ``"5"``: SQLite compares
    an int with text as text)."""
    _pullable(queue)
    if dead_letter is not None and not isinstance(dead_letter, str):
        raise ArgumentTypeError(f"dead_letter names a queue (a str) or is None, got {type(dead_letter).__name__}")
    return dead_letter_queue(queue, dead_letter)


def _pullable(queue: str) -> None:
    """Raise `ConfigError` unless ``queue`` names a queue a node can pull (`pullable`, the
    rule `pull` keeps): an empty one, a shell variable unset, named the dead letters of
    ``".dead"``, and took them back to ``""``."""
    if not isinstance(queue, str) or not pullable(queue):
        raise ConfigError(f"a queue must be a string (text UTF-8 can encode) of 1 to {MAX_NAME_BYTES} bytes, "
                          f"not beginning {RESERVED_NAME_PREFIX!r}, got {queue!r:.80}")


def durable_subscriptions(directory: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """The durable subscriptions whose places a store keeps, read without taking it (the
    node using it may run): ``{name: {"streams": publisher streams, "topics": places}}``,
    by name (a stream followed whose topics have no place yet counts among the streams).
    Raises as `inspect_store` does."""
    with _reading(directory) as (db, _path, schema):
        began = " UNION ALL SELECT name, stream, 0 FROM cursor_began" if schema >= 7 else ""  # (read as it is)
        rows = db.execute("SELECT name, count(DISTINCT stream), sum(place) FROM (SELECT name, stream, 1 AS place "
                          f"FROM cursors UNION ALL SELECT name, stream, 0 FROM cursor_runs{began}) "
                          "GROUP BY name ORDER BY name").fetchall()
    return {name: {"streams": streams, "topics": topics} for name, streams, topics in rows}


def forget_durable_subscription(directory: str | os.PathLike[str], name: str) -> dict[str, int]:
    """Forget the durable subscription ``name``: every place it has in the store and the
    publisher runs it followed, in one transaction; what it had, as `durable_subscriptions`
    lists it (``{"streams": 0, "topics": 0}``: the store had none of that name). A
    subscription that takes the name again begins afresh, as its ``replay`` says. The
    store must not be in use: raises `StoreLockedError` while its node runs, `StoreError`
    if there is none, `ArgumentTypeError` (a ``TypeError``) for a ``directory`` that is no
    path or a ``name`` that is no ``str`` (no subscription has one: ``5`` forgot one named
    ``"5"``, ``None`` or bytes reported none there)."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a durable subscription's name is a str, got {type(name).__name__}")
    with _existing(directory) as store:
        return store.cursors.forget_name(name)


@contextlib.contextmanager
def _reading(directory: str | os.PathLike[str]) -> Iterator[tuple[sqlite3.Connection, Path, int]]:
    """A read-only connection to the store in ``directory``, without taking it, with its
    path and schema: ``(db, path, schema)``, closed after use; text that is not UTF-8 is
    read with its bytes escaped (`_damaged_text_escaped`). Raises `StoreError` if
    there is no zmqmesh store there, if it cannot be read (a failing read in the block
    too), or if its schema is one `inspect_store` does not read; as `_db_path` for a
    ``directory`` that is no path."""
    path = _db_path(directory)
    if not held_here(path):  # (one a node of this process holds is its store: never opened here, see `StoreHold`)
        check_sqlite_file(path)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the store {path}: {exc}") from exc
    db.text_factory = _damaged_text_escaped
    try:
        schema = schema_version(db, path)
        if schema > SCHEMA_VERSION:
            raise StoreError(f"the store {path} was written by a newer zmqmesh (schema {schema}, "
                             f"this one reads up to {SCHEMA_VERSION})")
        if schema < INSPECTED_FROM:
            raise StoreError(f"the store {path} was written by an older zmqmesh (schema {schema}): "
                             "a node opening it upgrades it")
        yield db, path, schema
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the store {path}: {exc}") from exc
    finally:
        db.close()


def _db_path(directory: str | os.PathLike[str]) -> Path:
    """The database file of the store in ``directory``. Raises `StoreError` if there is
    none (a path with a NUL names none), `ArgumentTypeError` (a ``TypeError``) for a
    ``directory`` that is no path."""
    try:
        path = Path(directory) / DB_FILE
    except TypeError as exc:
        raise ArgumentTypeError(f"a store's directory must be a path, got {type(directory).__name__}") from exc
    if not path.exists():
        raise StoreError(f"no zmqmesh store in {directory} (no {DB_FILE})")
    return path


def _damaged_text_escaped(raw: bytes) -> str:
    """A text column as a tool reads it: UTF-8, what is not (a name damaged on disk) with
    its bytes escaped (``\\xff``), so that one such name costs the reading of no other.
    Raises nothing."""
    return raw.decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def _existing(directory: str | os.PathLike[str]) -> Iterator[Store]:
    """The store in ``directory``, which must exist (never created here), closed after use.
    Raises as `_db_path` does."""
    _db_path(directory)
    store = Store(directory, new_run=False)
    try:
        yield store
    finally:
        store.close()
