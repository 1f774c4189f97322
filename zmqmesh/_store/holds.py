"""One node per store: the store directory's lock file and its database file, held for
the store's lifetime, so that a second node opening the same store (or the same database
through a link) gets `StoreLockedError` instead of corrupting it."""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

from .._io.inherited import point_at_null
from ..errors import StoreError, StoreLockedError
from .schema import not_plain

__all__ = ["StoreHold", "held_here", "CLOSING_WAIT_S", "LOCK_FILE"]

LOCK_FILE = "zmqmesh.lock"
_MARK = "zmqmesh store "  # (what `StoreHold.mark` writes in the lock file, before the store's stream id)
# (device, inode) of the databases the stores of this process hold, with descriptors of
# them opened meanwhile by a store refused (closed only with the holder's: `StoreHold._hold_database`)
_HELD: dict[tuple[int, int], list[int]] = {}
_HELD_LOCK = threading.Lock()
# (device, inode) of the lock files of stores this process closes once a handler that
# outlived its node's stop returns (`StoreHold.close_later`), and the event set when they close
_CLOSING: dict[tuple[int, int], threading.Event] = {}
_HOLDS: weakref.WeakSet[StoreHold] = weakref.WeakSet()  # (those of this process: `_let_go_in_child`)
CLOSING_WAIT_S = 5.0
"""How long opening a store waits for one this process closes after a handler that outlived
its node's stop (`StoreHold.close_later`), before it raises `StoreLockedError` (an opening on a
running asyncio event loop, an `AsyncNode`'s, does not wait: it raises at once)."""


class StoreHold:
    """The locks of the store in ``directory`` whose database is ``path``: its lock file,
    then the database file itself, taken at once, held until `release`.

    Raises `StoreLockedError` when another node (of this process or another) uses the
    store or its database, `StoreError` for a database that is not a plain file or a
    lock file that cannot be opened (a read-only filesystem).
    """

    def __init__(self, directory: Path, path: Path) -> None:
        self.directory = directory
        self.path = path
        self._lock_file = self._take_lock()
        _HOLDS.add(self)
        self._closing: tuple[int, int] | None = None  # (`close_later`)
        self._db_lock: tuple[int, tuple[int, int]] | None = None
        self.created = False
        """Whether the database file was missing, and made (empty) by this hold."""
        try:
            self._db_lock = self._hold_database()
        except BaseException:
            self.release()
            raise

    def _take_lock(self) -> Any:
        """The directory's lock file, locked (waiting for a store of this process that closes
        after a handler that outlived its node's stop: `close_later`)."""
        lock_path = self.directory / LOCK_FILE
        try:
            handle = open(lock_path, "a+")  # noqa: SIM115 - held for the store's lifetime
        except OSError as exc:
            raise StoreError(f"cannot open the store {self.directory}: its lock file {lock_path} "
                             f"cannot be opened for writing: {exc}") from exc
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
                self.created = True
            except OSError as exc:
                raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
            if info is not None:
                if not stat.S_ISREG(info.st_mode):
                    raise not_plain(self.path)
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
                    _HELD[identity].append(fd)  # (closed with the holder's: `release`)
                    fd = -1
                    raise _held_by_another(self.path)
                if not stat.S_ISREG(opened.st_mode):
                    raise not_plain(self.path)
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

    def release(self) -> None:
        """Let go of both locks (once the database's connection closed: SQLite's own locks
        are gone by then). Each is unlocked before its descriptor closes: a child forked
        meanwhile holds a copy of the descriptor, which would keep the lock until it exits."""
        try:
            if self._db_lock is not None:
                fd, identity = self._db_lock
                self._db_lock = None
                with _HELD_LOCK:  # (its descriptors, and those parked with it, closed as it is let go)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
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

    def marked(self) -> bool:
        """Whether the lock file says a store was made here (`mark`)."""
        try:
            self._lock_file.seek(0)
            return bool(self._lock_file.read(len(_MARK)) == _MARK)
        except (OSError, ValueError):  # (unreadable: taken as unmarked, as before marks)
            return False

    def mark(self, stream: str) -> None:
        """Say in the lock file, once, that the store of stream ``stream`` was made here: a
        database found empty later was truncated, not yet made. A lock file that cannot be
        written (a full disk) stays unmarked (a store of an older zmqmesh is too)."""
        try:
            if not self.marked():
                self._lock_file.write(f"{_MARK}{stream}\n")
                self._lock_file.flush()
        except (OSError, ValueError):
            pass

    def descriptors(self) -> list[int]:
        """The descriptors holding its locks (none once released)."""
        held = [] if self._lock_file.closed else [self._lock_file.fileno()]
        return held + ([self._db_lock[0]] if self._db_lock is not None else [])


def _let_go_in_child() -> None:
    """In a child forked while stores were open: its copies of their lock descriptors
    would hold the locks for as long as it lives, also once the parent stopped or died (a
    node restarted after its process was killed found its store locked). Each is pointed
    at /dev/null instead (not closed: its number stays taken, so the store objects the
    child inherited close nothing else), and the child holds no store."""
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # (a parent's thread may have held it at the fork)
    descriptors = [fd for parked in _HELD.values() for fd in parked]
    for hold in list(_HOLDS):
        descriptors += hold.descriptors()
    _HELD.clear()
    _CLOSING.clear()
    point_at_null(descriptors)


os.register_at_fork(after_in_child=_let_go_in_child)


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


def _held_by_another(path: Path) -> StoreLockedError:
    """The error for a database another node holds through another name."""
    return StoreLockedError(f"the database {path} is in use by another node, through another name (a link to it)")


def held_here(path: Path) -> bool:
    """Whether a store of this process holds the database ``path`` names."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    with _HELD_LOCK:
        return (info.st_dev, info.st_ino) in _HELD
