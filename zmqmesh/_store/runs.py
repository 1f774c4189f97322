"""A store's lineage: each opening of it by a node is a run, named by a random token, and
the store names its recent runs newest first, so that a subscriber can tell a store
restored from an older copy (`Replays`)."""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3

__all__ = ["RUNS_KEPT", "open_run", "numbering_mark"]

log = logging.getLogger("zmqmesh.store")

RUNS_KEPT = 16
"""Runs of a store (openings) it names in its lineage (`Store.runs`), newest first: those
of its last `RUNS_KEPT` openings, then up to as many older ones that numbered messages."""


def open_run(db: sqlite3.Connection, record: bool = True) -> tuple[str, ...]:
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
    at its start (meta ``run_mark``, ``token:mark``, see `numbering_mark`); the runs
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
    mark = numbering_mark(db)
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


def numbering_mark(db: sqlite3.Connection) -> int:
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
