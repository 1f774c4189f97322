"""The node store on its own (real SQLite files): segments, what is marked of their
messages, what a restart reads back, and the upgrade of a store written by schema 1."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import threading
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import ScriptProcess, wait_until

import zmqmesh
from zmqmesh import drop_dead_letters, inspect_store, retry_dead_letters
from zmqmesh._patterns.history import PAGE_ROWS, History
from zmqmesh._stats import Stats
from zmqmesh._store import checkpointer
from zmqmesh._store.checkpointer import BACKSTOP_PAGES, LOG_LIMIT_BYTES
from zmqmesh._store.messages import (
    ATTEMPTS,
    BODY,
    HEADERS,
    ID,
    RECOVERED,
    SEGMENT,
    SEQ,
    TIMESTAMP,
    WIRE,
)
from zmqmesh._store.runs import RUNS_KEPT
from zmqmesh._store.schema import SCHEMA_VERSION
from zmqmesh._store.segments import SEGMENT_BYTES, SEGMENT_MAX
from zmqmesh._store.store import Store
from zmqmesh._wire.codec import durable_item
from zmqmesh.config import HistoryPolicy

pytestmark = pytest.mark.timeout(60)


def entries(*names: str) -> list[tuple[str, float, bytes | None, bytes, int, bool]]:
    return [(f"id-{n}", 1000.0 + i, None, msgpack.packb(n), 0, False) for i, n in enumerate(names)]


def damage(directory: Path, seq: int, items: bytes = b"\xc1", count: int | None = None) -> None:
    """Overwrite the segment at ``seq`` in the closed store at ``directory`` (its items, and
    its stored count if given), as a disk fault or a foreign writer could."""
    with sqlite3.connect(directory / "zmqmesh.db") as db:
        db.execute("UPDATE outbox SET items = ?, count = coalesce(?, count) WHERE seq = ?", (items, count, seq))


def live(store: Store, queue: str) -> list[tuple[str, int]]:
    return [(msgpack.unpackb(m[BODY]), m[ATTEMPTS]) for s in store.pending(queue, limit=10_000) for m in s.messages]


def test_a_call_is_stored_as_columns_and_other_messages_as_the_rows_a_keeper_hands_over(tmp_path: Path) -> None:
    """A push call's messages (one timestamp, one headers) are stored as columns, the
    msgpack array ``[1, ids, timestamp, headers, bodies]``; messages that differ in either,
    or are marked redelivered, as rows, the msgpack array of each one's ``[id, timestamp,
    headers, body]`` with ``True`` after those marked, the same bytes whether given as
    rows or as columns (`Entries`)."""
    from zmqmesh._store.messages import Entries

    headers = msgpack.packb({"h": "1"})
    rows = [(f"id-{i}", 1000.5, headers if i % 2 else None, msgpack.packb(i), 0, i == 3) for i in range(5)]
    marked = [(*r[:5], i == 3) for i, r in enumerate(rows)]
    store = Store(tmp_path)
    store.append([("rows", rows)])
    store.append([("columns", Entries.of_rows(rows))])
    store.append([("marked", [(r[0], 1000.5, None, r[3], 0, r[5]) for r in marked])])
    store.append([("call", Entries.of_call([r[0] for r in rows], 1000.5, headers, [r[3] for r in rows]))])
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "zmqmesh.db")) as db:
        stored = dict(db.execute("SELECT queue, items FROM outbox").fetchall())
    assert stored["rows"] == stored["columns"] == msgpack.packb([(*r[:4], True) if r[5] else r[:4] for r in rows])
    assert stored["marked"] == msgpack.packb([(r[0], 1000.5, None, r[3], True) if r[5] else (r[0], 1000.5, None, r[3])
                                              for r in marked])
    assert stored["call"] == msgpack.packb([1, [r[0] for r in rows], 1000.5, headers, [r[3] for r in rows]])


def test_a_call_stored_as_columns_is_read_back_as_the_messages_it_stored(tmp_path: Path) -> None:
    """A call is stored as columns whatever its size (cut into several segments too), its
    headers, its ids' lengths and its bodies', and read back as the messages it stored,
    each with its wire form for a first delivery, as a store of rows read them back."""
    from zmqmesh._store.messages import Entries

    headers = msgpack.packb({"h": "1" * 40})
    calls: list[tuple[str, Entries]] = []
    for n in (1, 2, 33, 300, SEGMENT_MAX + 5):
        for head in (None, headers):
            for longest in (0, 255, 256, 70_000):
                ids = [f"id-{n}-{i}" + "\u00e9" * (i % 40) for i in range(n)]
                bodies = [b"b" * min(i * 997 % 80_000, longest) for i in range(n)]
                calls.append((f"q{len(calls)}", Entries.of_call(ids, 1000.25, head, bodies)))
    store = Store(tmp_path)
    store.append(calls)
    with contextlib.closing(sqlite3.connect(tmp_path / "zmqmesh.db")) as db:
        segments = db.execute("SELECT queue, seq, count, items FROM outbox ORDER BY seq").fetchall()
    for name, entries in calls:
        expected_items, expected = [], []
        at = 0
        for queue, first, count, _ in segments:
            if queue != name:
                continue
            ids, bodies = entries.ids[at:at + count], entries.bodies[at:at + count]
            expected_items.append(msgpack.packb([1, ids, 1000.25, entries.headers[0], bodies]))
            expected += [(first + i, name, msg_id, 1000.25, entries.headers[0], body, 0, first, False,
                          durable_item(body, False, msg_id, 1000.25, entries.headers[0], 0))
                         for i, (msg_id, body) in enumerate(zip(ids, bodies))]
            at += count
        assert at == len(entries)
        assert [items for queue, _, _, items in segments if queue == name] == expected_items
        assert [m for s in store.pending(name, limit=10_000) for m in s.messages] == expected
    store.close()


def test_a_store_of_schema_7_is_read_as_it_stored_and_an_older_zmqmesh_refuses_it_upgraded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store as schema 7 left it, its segments all rows, is read back as it stored them
    once upgraded to 8 (which stores calls as columns beside them); a zmqmesh of schema 7,
    which would take columns for damage, refuses it then."""
    from zmqmesh._store.messages import Entries

    store = Store(tmp_path)
    store.append([("q", Entries.of_call(["id-a", "id-b"], 1000.5, None, [msgpack.packb("a"), msgpack.packb("b")]))])
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "zmqmesh.db")) as db, db:  # as schema 7 left it
        db.execute("UPDATE outbox SET items = ? WHERE seq = 1",
                   (msgpack.packb([["id-a", 1000.5, None, msgpack.packb("a")], ["id-b", 1000.5, None, msgpack.packb("b")]]),))
        db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    assert inspect_store(tmp_path)["schema"] == 7
    store = Store(tmp_path)
    store.append([("q", Entries.of_call(["id-c"], 1001.5, None, [msgpack.packb("c")]))])
    assert [(m[ID], m[TIMESTAMP], msgpack.unpackb(m[BODY])) for s in store.pending("q") for m in s.messages] == [
        ("id-a", 1000.5, "a"), ("id-b", 1000.5, "b"), ("id-c", 1001.5, "c")]
    store.close()
    assert inspect_store(tmp_path)["schema"] == SCHEMA_VERSION == 8
    import zmqmesh._store.store as store_module

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 7)  # (the check of a zmqmesh of schema 7)
    with pytest.raises(zmqmesh.StoreError, match="newer zmqmesh"):
        Store(tmp_path)


def test_a_call_of_no_messages_stores_no_segment_beside_others(tmp_path: Path) -> None:
    """A call with no messages (rows or `Entries`) stores nothing, and the calls beside it
    are stored as ever (before: `cut` yielded the empty call as a segment, and append
    raised IndexError, storing none of them)."""
    from zmqmesh._store.messages import Entries

    (a,) = entries("a")
    store = Store(tmp_path)
    assert store.append([("empty", []), ("q", [a]), ("none", Entries.of_rows([]))]) == [(1, 1)]
    assert live(store, "q") == [("a", 0)] and store.queues().keys() == {"q"}
    store.close()


def test_messages_stored_marked_redelivered_are_read_back_and_moved_so_marked(tmp_path: Path) -> None:
    """What a keeper is handed marked redelivered (a dead puller may have handled it) stays
    marked in its store: read back, across a restart, and moved to another queue."""
    a, b, c = entries("a", "b", "c")
    store = Store(tmp_path)
    store.append([("q", [a, (*b[:5], True), c])])
    store.close()

    store = Store(tmp_path)
    (segment,) = store.pending("q")
    assert [(msgpack.unpackb(m[BODY]), m[RECOVERED]) for m in segment.messages] == [("a", False), ("b", True),
                                                                                  ("c", False)]
    assert segment.messages[1][WIRE] is None  # (dealt marked, not in the form of a first delivery)
    assert store.requeue("q", "other") == 3
    assert [(msgpack.unpackb(m[BODY]), m[RECOVERED]) for m in store.pending("other")[0].messages] == [
        ("a", False), ("b", True), ("c", False)]
    store.close()
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:  # (a sixth field is damage, not a mark)
        ((seq,),) = db.execute("SELECT seq FROM outbox WHERE queue = 'other'").fetchall()
    damage(tmp_path, seq, msgpack.packb([["id-a", 1.0, None, b"a", True, True]]), count=1)
    store = Store(tmp_path)
    assert store.pending("other")[0].damaged
    store.close()


def test_parking_queues_binds_its_placeholders_as_every_supported_python_takes_them(tmp_path: Path) -> None:
    """Parking a queue (alone, and as segments are stored) keeps its first place and
    warns of nothing: Python 3.12 warned that its numbered placeholders were bound from a
    sequence (a `DeprecationWarning` on every park), which Python 3.14 refuses."""
    store = Store(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((first, _count),) = store.append([("q", entries("a", "b"))], park={"q"})
        store.park("q", first + 10, first + 20)
        store.append([("q", entries("c"))], park={"q"})
        assert store.parked("q") == (first, first + 2)  # (a queue parked already keeps its first)
        store.park("r", 5, 9)
        assert store.parked("r") == (5, 9)
    store.close()


def test_a_restart_reads_back_only_what_was_not_settled_with_the_attempts_counted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ((first, count),) = store.append([("orders", entries("a", "b", "c", "d", "e"))])
    assert count == 5
    store.forget([], settled=[(first, first + 1), (first + 3, first + 3)])  # a, b and d acknowledged
    store.count_attempt([first + 2])
    store.count_attempt([first + 2])
    store.close()

    store = Store(tmp_path)
    assert live(store, "orders") == [("c", 2), ("e", 0)]
    (segment,) = store.pending("orders")
    c, e = segment.messages
    assert (c[SEQ], c[SEGMENT], c[ID]) == (first + 2, first, "id-c")
    # read back with the form a first delivery sends; one with failed deliveries goes marked
    assert e[WIRE] == durable_item(e[BODY], False, "id-e", 1004.0, None, 0) and c[WIRE] is None
    store.move(c, "orders.dead", msgpack.packb({"x-attempts": "3"}))  # out of a segment of five
    store.close()

    assert {q: v["messages"] for q, v in inspect_store(tmp_path)["queues"].items()} == {"orders": 1, "orders.dead": 1}
    store = Store(tmp_path)
    assert live(store, "orders") == [("e", 0)]
    (dead,) = store.pending("orders.dead")[0].messages
    assert (msgpack.unpackb(dead[BODY]), msgpack.unpackb(dead[HEADERS]), dead[ATTEMPTS]) == ("c", {"x-attempts": "3"}, 0)
    store.forget([(first, 5)])  # the whole segment: its marks go with it
    assert live(store, "orders") == []
    assert store.requeue("orders.dead", "orders") == 1
    assert live(store, "orders") == [("c", 0)]
    store.close()
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:
        assert db.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM settled").fetchone()[0] == 0


def test_a_large_call_is_stored_as_several_segments_read_back_whole(tmp_path: Path) -> None:
    store = Store(tmp_path)
    names = [str(i) for i in range(2 * SEGMENT_MAX + 10)]
    segments = store.append([("q", entries(*names)), ("other", entries("x"))])
    assert [c for _, c in segments] == [SEGMENT_MAX, SEGMENT_MAX, 10, 1]
    assert [f for f, _ in segments] == [1, 1 + SEGMENT_MAX, 1 + 2 * SEGMENT_MAX, 11 + 2 * SEGMENT_MAX]
    read = store.pending("q", limit=SEGMENT_MAX + 1)  # whole segments, until the limit is reached
    assert [len(s.messages) for s in read] == [SEGMENT_MAX, SEGMENT_MAX]
    assert [len(s.messages) for s in store.pending("q", after=2 * SEGMENT_MAX, limit=5)] == [10]
    small = store.append([("many", entries("a", "b", "c")) for _ in range(100)])  # one segment each
    read = store.pending("many", limit=10)  # stops at the fourth of a hundred segments
    assert [s.first for s in read] == [f for f, _ in small[:4]] and sum(len(s.messages) for s in read) == 12
    assert len(store.pending("many", limit=50)) == 17  # past one fetch of rows
    assert len(store.pending("many", limit=1000)) == 100  # the limit never reached: every segment
    assert store.drop_queue("many") == 300
    assert store.drop_queue("q") == len(names)
    assert live(store, "other") == [("x", 0)]
    store.close()


def test_large_messages_close_a_segment_by_bytes_and_reads_stop_at_a_byte_budget(tmp_path: Path) -> None:
    store = Store(tmp_path)
    big = [(f"id-{i}", 1000.0, None, bytes([i]) * (400 * 1024), 0, False) for i in range(5)]
    huge = [("id-huge", 1000.0, None, b"h" * (3 * SEGMENT_BYTES), 0, False)]
    segments = store.append([("q", big), ("q", huge), ("q", entries("a", "b"))])
    assert [c for _, c in segments] == [2, 2, 1, 1, 2]  # 800 KiB, 800 KiB, 400 KiB; the huge one alone
    assert [len(s.messages) for s in store.pending("q", limit=1000, max_bytes=1)] == [2]  # at least one segment
    assert store.pending("q", limit=1000, max_bytes=1, at_least_one=False) == []
    read = store.pending("q", limit=1000, max_bytes=2 * SEGMENT_BYTES)  # only the segments that fit
    assert [len(s.messages) for s in read] == [2, 2, 1]
    everything = [m[BODY] for s in store.pending("q", limit=1000) for m in s.messages]
    assert everything == [e[3] for e in big + huge + entries("a", "b")]
    store.close()


def test_a_store_written_by_schema_1_is_upgraded_in_place(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:  # the layout schema 1 wrote, a row per message
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('app', 'zmqmesh'), ('schema_version', '1'), ('created', '0');
            CREATE TABLE outbox (seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, id TEXT NOT NULL,
                ts REAL NOT NULL, headers BLOB, body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE handled (queue TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL,
                PRIMARY KEY (queue, id)) WITHOUT ROWID;
            CREATE INDEX handled_age ON handled (queue, at);
        """)
        db.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)", [
            (4, "orders", "id-a", 1.0, None, msgpack.packb("a"), 0),
            (9, "orders", "id-b", 2.0, msgpack.packb({"k": "v"}), msgpack.packb("b"), 2)])
    store = Store(tmp_path)
    assert live(store, "orders") == [("a", 0), ("b", 2)]
    b = store.pending("orders")[1].messages[0]
    assert (b[SEQ], b[ID], b[TIMESTAMP], msgpack.unpackb(b[HEADERS])) == (9, "id-b", 2.0, {"k": "v"})
    ((first, _),) = store.append([("orders", entries("c"))])
    assert first == 10  # numbering goes on after the old rows
    store.close()
    assert inspect_store(tmp_path)["schema"] == SCHEMA_VERSION


@pytest.mark.parametrize("items", [
    b"\xc1",  # never used by msgpack
    msgpack.packb([["id-1", 1.0, None], ["id-2", 1.0, None]]),  # entries of three fields
    msgpack.packb([1, 2]),  # entries that are no arrays at all
    msgpack.packb([["id-1", 1.0, None, b"x"]]),  # one message where two were stored
    msgpack.packb([["id-1", 1.0, None, b"x"], ["id-2", 1.0, None, "text"]]),  # a body that is no bytes
    msgpack.packb([["id-1", 1.0, None, b"x"], ["id-2", "soon", None, b"x"]]),  # a time that is no number
    msgpack.packb([[7, 1.0, None, b"x"], ["id-2", 1.0, None, b"x"]]),  # an id that is no string
    msgpack.packb([["id-1", 1.0, {"h": "v"}, b"x"], ["id-2", 1.0, None, b"x"]]),  # headers not encoded
    # stored as columns (schema 8):
    msgpack.packb([1, ["id-1", "id-2"], 1.0, None]),  # no bodies
    msgpack.packb([2, ["id-1", "id-2"], 1.0, None, [b"x", b"y"]]),  # not columns
    msgpack.packb([1, ["id-1"], 1.0, None, [b"x", b"y"]]),  # one id for two bodies
    msgpack.packb([1, ["id-1", "id-2"], 1.0, None, [b"x"]]),  # one body for two ids
    msgpack.packb([1, "ab", 1.0, None, [b"x", b"y"]]),  # ids that are no array (a string of two)
    msgpack.packb([1, ["id-1", "id-2"], 1.0, None, [b"x", "text"]]),  # a body that is no bytes
    msgpack.packb([1, ["id-1", "id-2"], "soon", None, [b"x", b"y"]]),  # a time that is no number
    msgpack.packb([1, ["id-1", 7], 1.0, None, [b"x", b"y"]]),  # an id that is no string
    msgpack.packb([1, ["id-1", "id-2"], 1.0, {"h": "v"}, [b"x", b"y"]]),  # headers not encoded
], ids=["not-msgpack", "short-entries", "not-arrays", "short-segment", "text-body", "text-time", "int-id",
        "raw-headers", "columns-short", "columns-tag", "columns-few-ids", "columns-few-bodies", "columns-ids-text",
        "columns-text-body", "columns-text-time", "columns-int-id", "columns-raw-headers"])
def test_a_damaged_segment_is_reported_and_kept_and_the_others_still_read(tmp_path: Path, items: bytes) -> None:
    store = Store(tmp_path)
    store.append([("q", entries("a", "b"))])
    store.append([("q", entries("c"))])
    store.close()
    damage(tmp_path, 1, items)
    store = Store(tmp_path)
    damaged, good = store.pending("q")
    assert damaged.messages == [] and "damaged segment 1 (2 messages)" in (damaged.damaged or "")
    assert [msgpack.unpackb(m[BODY]) for m in good.messages] == ["c"]
    store.close()
    assert inspect_store(tmp_path)["queues"]["q"]["messages"] == 3  # still there for an operator


@pytest.mark.parametrize("items", [
    b"\xc1",
    msgpack.packb([["id-1", 1.0, None, b"x"], ["id-2", 1.0, None, "text"]]),
    # contents a puller would refuse, and with them the whole batch they were dealt in:
    msgpack.packb([["id-1", 1.0, None, b"\xc1"], ["id-2", 1.0, None, b"x"]]),  # a body that is no msgpack
    msgpack.packb([["id-1", 1.0, None, b"\x01\x02"], ["id-2", 1.0, None, b"x"]]),  # a body of two objects
    msgpack.packb([["id-1", 1.0, None, b"\xa1\xff"], ["id-2", 1.0, None, b"x"]]),  # a body of bad UTF-8
    msgpack.packb([["i" * 129, 1.0, None, b"x"], ["id-2", 1.0, None, b"x"]]),  # an id too long
    msgpack.packb([["id-1", 1.0, msgpack.packb([1]), b"x"], ["id-2", 1.0, None, b"x"]]),  # headers no map
    msgpack.packb([["id-1", 1.0, msgpack.packb({f"h{i}": "v" for i in range(65)}), b"x"],
                   ["id-2", 1.0, None, b"x"]]),  # too many headers
    # stored as columns (schema 8):
    msgpack.packb([1, ["id-1", "id-2"], 1.0, None, [b"x", "text"]]),
    msgpack.packb([1, ["id-1", "id-2"], 1.0, None, [b"\xc1", b"x"]]),
    msgpack.packb([1, ["i" * 129, "id-2"], 1.0, None, [b"x", b"x"]]),
    msgpack.packb([1, ["id-1", "id-2"], 1.0, msgpack.packb([1]), [b"x", b"x"]]),
], ids=["not-msgpack", "text-body", "body-not-msgpack", "body-of-two", "body-bad-utf8", "long-id", "headers-no-map",
        "too-many-headers", "columns-text-body", "columns-body-not-msgpack", "columns-long-id", "columns-headers-no-map"])
def test_a_node_delivers_around_a_damaged_segment_and_counts_it(tmp_path: Path, mesh: dict[str, Any],
                                                                items: bytes) -> None:
    """(A body, id or headers a puller would refuse, inside well-formed entries: before, read
    as healthy, every batch with it was refused, and the queue stalled: "c" never came.)"""
    store = Store(tmp_path)
    store.append([("q", entries("a", "b"))])
    store.append([("q", entries("c"))])
    store.close()
    damage(tmp_path, 1, items)
    got: list[str] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
        with puller:
            wait_until(lambda: got == ["c"], 20, "the readable message")
            assert pusher.stats()["rejected"]["store_damaged"] == 2
            # (its acknowledgement, before the puller leaves: a goodbye that overtakes it
            # has the message dealt again, as at-least-once allows)
            wait_until(lambda: pusher.stats()["gauges"]["queued"] == 0, 20, "the acknowledgement")
    assert inspect_store(tmp_path)["queues"]["q"]["messages"] == 2


@pytest.mark.parametrize("count", [50, 0, -3], ids=["past-the-next-segments", "zero", "negative"])
def test_a_damaged_segment_with_a_wrong_count_strands_nothing_after_it(tmp_path: Path, mesh: dict[str, Any],
                                                                       count: int) -> None:
    """A damaged segment's stored count cannot be trusted: one that claims the numbers of
    the segments after it must not hide them, and one of zero or less must not be read
    over and over; the store also numbers new messages after every stored one."""
    store = Store(tmp_path)
    for body in ("a", "c", "d"):
        store.append([("q", entries(body))])
    store.close()
    damage(tmp_path, 1, count=count)
    store = Store(tmp_path)
    assert [(s.first, s.size, bool(s.damaged)) for s in store.pending("q")] == [(1, 1, True), (2, 1, False), (3, 1, False)]
    store.close()
    got: list[str] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
        with puller:
            wait_until(lambda: got == ["c", "d"], 20, "the messages after the damaged segment")
            pusher.push("q", "e", durable=True)
            wait_until(lambda: got == ["c", "d", "e"], 20, "a message pushed after the restart")
            assert pusher.stats()["rejected"]["store_damaged"] == 1


@pytest.mark.parametrize(("sql", "delivered"), [
    ("UPDATE outbox SET items = 5 WHERE seq = 1", ["c"]),
    ("UPDATE outbox SET items = 2.5 WHERE seq = 1", ["c"]),
    ("UPDATE outbox SET count = 'two' WHERE seq = 1", ["c"]),
    ("UPDATE outbox SET count = 1.5 WHERE seq = 1", ["c"]),
    ("INSERT INTO attempts (seq, n) VALUES (1, -3)", ["a", "b", "c"]),
    ("INSERT INTO attempts (seq, n) VALUES (1, 'x')", ["a", "b", "c"]),
], ids=["integer-items", "real-items", "text-count", "real-count", "negative-attempts", "text-attempts"])
def test_a_damaged_value_of_the_wrong_type_strands_nothing(tmp_path: Path, mesh: dict[str, Any], sql: str,
                                                          delivered: list[str]) -> None:
    """A value of a type SQLite lets in but the store never writes (a damaged column: items
    that are no blob, a count or an attempt count that is no whole number, a negative
    one) spoils one segment at most, skipped as damaged; the messages around it are
    delivered. Before, a read of such items or count raised TypeError on every refill, and
    a negative or text attempt count made every batch with the message one its puller
    refused: the queue delivered nothing at all."""
    store = Store(tmp_path)
    store.append([("q", entries("a", "b"))])
    store.append([("q", entries("c"))])
    store.close()
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:
        db.execute(sql)
    got: list[str] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh):
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
        with puller:
            wait_until(lambda: sorted(got) == delivered, 20, f"the messages {delivered}")
            assert puller.stats()["rejected"].get("service_malformed", 0) == 0
    # (the damaged segment stays for an operator, counted as one message if its count is no whole number)
    assert ("q" in inspect_store(tmp_path)["queues"]) == (len(delivered) < 3)


def test_a_wrong_count_is_bounded_wherever_the_store_reads_one(tmp_path: Path) -> None:
    """Wherever the store reads a damaged segment's count, it bounds it: the span of one
    read alone (its next segment not read yet) stops at that segment, and one last in the
    store at the next number given; a negative count on the last row read neither hides
    what was settled before it nor lifts the read's limit; queue tails stay below the
    next number, so a new message is never numbered inside a damaged span."""
    def described(segments: list[Any]) -> list[tuple[int, int, bool, list[str]]]:
        return [(s.first, s.size, bool(s.damaged), [msgpack.unpackb(m[BODY]) for m in s.messages]) for s in segments]

    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    store = Store(one)
    for body in ("a", "b", "c"):
        store.append([("q", entries(body))])
    store.close()
    damage(one, 1, count=50)
    store = Store(one)
    assert described(store.pending("q", limit=1)) == [(1, 1, True, [])]  # (a read of one row: its span from the next)
    store.close()

    store = Store(two)
    store.append([("q", entries("a", "b", "c", "d", "e"))])  # 1..5
    store.append([("q", entries("f"))])  # 6
    store.forget([], settled=[(4, 5)])  # d and e acknowledged
    store.append([("r", entries("x"))])  # 7, another queue
    store.close()
    damage(two, 6, count=-3)
    store = Store(two)
    assert described(store.pending("q")) == [(1, 5, False, ["a", "b", "c"]), (6, 1, True, [])]
    store.close()

    store = Store(three)
    store.append([("q", entries("a"))])  # 1
    store.append([("r", entries("x"))])  # 2
    for k in range(10):
        store.append([("s", entries(str(k)))])  # 3..12
    store.close()
    damage(three, 1, count=50)
    damage(three, 3, count=-10**9)
    store = Store(three)
    assert len(store.pending("s", limit=4)) == 4
    assert described(store.pending("q")) == [(1, 12, True, [])]  # (up to the last number given: 12)
    assert store.queue_tails()["q"] == 12
    assert store.append([("q", entries("new"))]) == [(13, 1)]
    assert described(store.pending("q", after=1)) == [(13, 1, False, ["new"])]
    store.close()


def test_a_count_out_of_range_is_taken_as_damage_and_bounded(tmp_path: Path) -> None:
    """A count below 1 marks a segment damaged (one of no message read as healthy left the
    read back where it was, forever); a queue's tail comes from its last segment, not
    from an earlier damaged one's count; the summary never sums a count out of range; a
    huge count at the end of the store cannot push numbering out of SQLite's integers."""
    one, two = tmp_path / "one", tmp_path / "two"
    store = Store(one)
    store.append([("q", entries("a"))])  # 1
    store.append([("q", entries("b"))])  # 2
    for body in ("x", "y", "z"):
        store.append([("r", entries(body))])  # 3..5
    store.close()
    damage(one, 2, msgpack.packb([]), count=0)
    damage(one, 1, count=50)
    store = Store(one)
    assert [(s.first, s.size, bool(s.damaged)) for s in store.pending("q")] == [(1, 1, True), (2, 1, True)]
    assert store.queue_tails() == {"q": 2, "r": 5}
    assert inspect_store(one)["queues"]["r"]["messages"] == 3
    store.close()

    store = Store(two)
    store.append([("q", entries("a", "b"))])
    store.close()
    damage(two, 1, count=2**63 - 1)
    store = Store(two)
    assert store.append([("q", entries("c"))]) == [(1 + SEGMENT_MAX, 1)]
    store.close()


def test_a_batch_with_a_dead_letter_and_an_ack_keeps_the_rest_across_a_restart(tmp_path: Path) -> None:
    """The durable queues over a real store: in one segment of three, the first message is
    acknowledged and the second dead-lettered in the same moment; the third, not yet
    acknowledged, must still be there after a restart (and only it)."""
    from zmqmesh._patterns.durable import DurableQueues, Ticket
    from zmqmesh._patterns.reliable import Failure
    from zmqmesh._stats import Stats
    from zmqmesh._store.messages import Entries
    from zmqmesh._wire.codec import Codec

    store = Store(tmp_path)
    queues = DurableQueues(store, Codec(1 << 20), Stats(),
                           later=lambda delay, fn: None, wake_soon=lambda delay: None)
    queues.commit_in_turn(Ticket("q", Entries.of_rows(entries("a", "b", "c"))))
    batch = list(queues.refill()["q"])
    retry = queues.settle("q", batch[:2], [Failure(1, "q.dead", "ValueError: no")])
    assert retry == []
    queues.flush_acknowledged()
    store.close()

    store = Store(tmp_path)
    assert live(store, "q") == [("c", 0)]
    assert [msgpack.unpackb(m[BODY]) for s in store.pending("q.dead") for m in s.messages] == ["b"]
    assert {q: v["messages"] for q, v in store.queues().items()} == {"q": 1, "q.dead": 1}
    recovered = DurableQueues(store, Codec(1 << 20), Stats(),
                              later=lambda delay, fn: None, wake_soon=lambda delay: None)
    assert recovered.recover() == 2
    assert [msgpack.unpackb(m[BODY]) for m in recovered.refill()["q"]] == ["c"]
    store.close()


def test_a_pass_of_the_loop_looks_only_at_durable_queues_with_messages_to_deal(tmp_path: Path) -> None:
    """A pass of the loop (`refill`, then `reckon`) walks only the queues with messages to
    deal or to read back, and those named (messages to deal again): with 20,000 names,
    each push cost some 1.5 ms for walking them all. A queue with nothing left is
    forgotten, unless messages of it are in flight or to deal again (``busy``); one that
    gets messages again is looked at again."""
    from zmqmesh._patterns.durable import DurableQueues, Ticket
    from zmqmesh._stats import Stats
    from zmqmesh._store.messages import Entries
    from zmqmesh._wire.codec import Codec

    store = Store(tmp_path)
    queues = DurableQueues(store, Codec(1 << 20), Stats(), later=lambda delay, fn: None, wake_soon=lambda delay: None)
    for i in range(500):
        queues.commit_in_turn(Ticket(f"q{i}", Entries.of_rows(entries(f"m{i}"))))
    buffers = queues.refill()
    assert len(buffers) == 500
    for buffer in buffers.values():
        buffer.popleft()  # dealt
    queues.reckon(buffers, busy=lambda: {"q7"})
    assert list(queues.refill()) == ["q7"]  # (looked at while busy)
    queues.reckon(queues.refill(), busy=lambda: {"q7"})
    assert list(queues.refill(also=["q7", "not-durable"])) == ["q7"]  # (one with messages to deal again)
    assert list(queues.queues) == ["q7"]  # the others are forgotten
    queues.commit_in_turn(Ticket("q3", Entries.of_rows(entries("again"))))
    assert [msgpack.unpackb(m[BODY]) for m in queues.refill()["q3"]] == ["again"]
    assert sorted(queues.refill(every=True)) == ["q3", "q7"]
    queues.refill()["q3"].popleft()  # dealt
    queues.reckon(queues.refill())
    assert queues.refill() == {} and queues.queues == {}  # nothing to deal: no queue looked at, none kept
    store.close()


def test_a_backlog_behind_a_large_settled_segment_is_read_in_one_refill(tmp_path: Path) -> None:
    """A read back asks for about 1,024 messages at a time; one whose segments brought
    nothing to deal (settled before a restart, or damaged) must read on at once: no
    delivery would ever come back to ask for the rest."""
    from zmqmesh._patterns.durable import _REFILL_CHUNK, DurableQueues
    from zmqmesh._stats import Stats
    from zmqmesh._wire.codec import Codec

    assert _REFILL_CHUNK <= SEGMENT_MAX  # (so that the settled segment alone fills a read)
    store = Store(tmp_path)
    names = [f"s{i}" for i in range(SEGMENT_MAX)]
    ((first, count),) = store.append([("q", entries(*names))])
    store.forget([], settled=[(first, first + count - 1)])  # all acknowledged; the row not yet deleted
    store.append([("q", entries(*(f"b{i}" for i in range(10))))])
    store.close()

    store = Store(tmp_path)
    queues = DurableQueues(store, Codec(1 << 20), Stats(), later=lambda delay, fn: None, wake_soon=lambda delay: None)
    assert queues.recover() == 10
    assert [msgpack.unpackb(m[BODY]) for m in queues.refill()["q"]] == [f"b{i}" for i in range(10)]
    store.close()


def test_a_requeue_moves_a_queue_chunk_by_chunk_in_order(tmp_path: Path) -> None:
    """A dead-letter queue longer than one chunk moves whole, in order, a transaction per
    chunk; a damaged segment stays where it is, and the next ones are not skipped by its
    wrong count; and a queue moved onto itself moves once."""
    store = Store(tmp_path)
    for k in range(5):  # five segments of three; the second one gets damaged
        store.append([("jobs.dead", entries(*(f"{k}-{i}" for i in range(3))))])
    store.append([("jobs", entries("first"))])
    store.close()
    damage(tmp_path, 4, count=1000)  # (its count is wrong too)
    store = Store(tmp_path)
    assert store.requeue("jobs.dead", "jobs", chunk=4) == 12  # two segments (6 messages) per transaction
    assert [body for body, _ in live(store, "jobs")] == ["first", *(f"{k}-{i}" for k in (0, 2, 3, 4) for i in range(3))]
    (kept,) = store.pending("jobs.dead")
    assert kept.first == 4 and kept.damaged
    assert store.requeue("jobs", "jobs", chunk=4) == 13
    assert [body for body, _ in live(store, "jobs")][:2] == ["first", "0-0"]
    assert len(live(store, "jobs")) == 13
    store.close()


@pytest.mark.parametrize("operation", ["requeue", "drop"])
def test_a_whole_queue_is_moved_or_dropped_one_chunk_in_memory_at_a_time(tmp_path: Path, operation: str) -> None:
    """Moving or dropping a dead-letter queue of 48 MiB holds about one chunk of it in
    memory, not the whole queue (a move took over 100 MiB); every message is still moved,
    in order, or dropped."""
    store = Store(tmp_path)
    body = b"x" * 4096
    for k in range(48):  # 48 segments of 256 messages of 4 KiB
        store.append([("jobs.dead", [(f"id-{k}-{i}", 1.0, None, body, 0, False) for i in range(256)])])
    tracemalloc.start()
    try:
        done = store.requeue("jobs.dead", "jobs") if operation == "requeue" else store.drop_queue("jobs.dead")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done == 48 * 256
    assert peak < 32 * 1024 * 1024, f"{peak / 2**20:.1f} MiB held at once"
    assert store.pending("jobs.dead") == []
    ids = [m[ID] for s in store.pending("jobs", limit=20_000) for m in s.messages]
    assert ids == ([f"id-{k}-{i}" for k in range(48) for i in range(256)] if operation == "requeue" else [])
    store.close()


def test_a_read_with_a_byte_budget_holds_about_that_budget(tmp_path: Path) -> None:
    """Reading back a queue of large segments within a budget of 2 MiB reads (and then
    lets go of) at most one segment past it, not a fetch of 16 (16 MiB here)."""
    store = Store(tmp_path)
    for k in range(16):
        store.append([("q", [(f"id-{k}", 1.0, None, bytes([k]) * (1 << 20), 0, False)])])
    tracemalloc.start()
    try:
        segments = store.pending("q", limit=1024, max_bytes=2 * (1 << 20) + 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.first for s in segments] == [1, 2]
    assert [m[BODY][:1] for s in segments for m in s.messages] == [b"\x00", b"\x01"]
    assert peak < 8 * (1 << 20), f"{peak / 2**20:.1f} MiB held at once"
    store.close()


def test_a_drop_goes_chunk_by_chunk_past_a_damaged_segment(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for k in range(5):
        store.append([("q", entries(*(f"{k}-{i}" for i in range(3))))])
    store.close()
    damage(tmp_path, 4, count=1000)
    store = Store(tmp_path)
    assert store.drop_queue("q", chunk=4) == 12
    (kept,) = store.pending("q")
    assert kept.first == 4 and kept.damaged
    store.close()


def produce_and_acknowledge(store: Store, commits: int) -> tuple[int, list[tuple[int, int]]]:
    """Commit ``commits`` appends of 4 messages of 2 KB to ``store``, forgetting them 16
    segments at a time, as a producer and its acknowledgements write; the largest the
    ``-wal`` file was (looked at every 20 commits), and the segments not forgotten."""
    wal, largest, open_segments = store.path.with_name(store.path.name + "-wal"), 0, []
    body = msgpack.packb(b"x" * 2000)
    for k in range(commits):
        open_segments += store.append([("q", [(f"id-{k}-{i}", 1.0, None, body, 0, False) for i in range(4)])])
        if len(open_segments) >= 16:
            store.forget(open_segments)
            open_segments = []
        if k % 20 == 0:
            largest = max(largest, wal.stat().st_size)
    return largest, open_segments


def page_bytes(directory: Path) -> int:
    with contextlib.closing(sqlite3.connect(directory / "zmqmesh.db")) as db:
        return int(db.execute("PRAGMA page_size").fetchone()[0])


def test_checkpoints_are_a_thread_of_the_stores_and_the_log_stays_bounded(tmp_path: Path) -> None:
    """A commit leaves the checkpoint (the copy of the write-ahead log into the database,
    and its syncs) to the store's own thread, a moment later. Under commits without a
    pause the log still stays bounded (by the backstop, with some slack for a commit's
    checkpoint that met the thread's), closing the store stops the thread, and
    everything stored is there after a reopen."""
    def threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "zmqmesh-checkpoint")

    before = threads()
    store = Store(tmp_path)
    assert threads() == before + 1
    store.append([("kept", entries("a", "b"))])
    wait_until(lambda: store.checkpoints >= 1, timeout=10)
    largest, open_segments = produce_and_acknowledge(store, 7500)  # (about 5 backstops of frames through the log)
    assert largest <= 2 * BACKSTOP_PAGES * (page_bytes(tmp_path) + 24) + 32  # (a frame: a page and its header)
    assert store.checkpoints >= 2
    store.close()
    assert threads() == before
    store = Store(tmp_path)
    assert live(store, "kept") == [("a", 0), ("b", 0)]
    assert sum(len(s.messages) for s in store.pending("q", limit=100_000)) == 4 * len(open_segments)
    store.close()


@pytest.mark.timeout(120)
def test_the_log_stays_bounded_under_a_writer_without_pause_beside_a_reader_that_never_stops(
        tmp_path: Path, procs: list[ScriptProcess]) -> None:
    """Readers of another process, always one of them on some snapshot (``zmqmesh store
    inspect`` of a large store, run in a loop), leave SQLite no moment to start the log
    over, however often it is copied: the ``-wal`` file grew without end (here past
    100 MiB; 2 GiB in 30 s of a node's durable pushes). A commit starts it over (RESTART)
    once its file is past `LOG_LIMIT_BYTES`, waiting a moment for the readers: it stays
    under twice that, is cut back to it when started over, and nothing stored is lost."""
    store = Store(tmp_path)
    store.append([("kept", entries("a"))])
    reader = ScriptProcess(Path(__file__).parent / "store_reader.py", tmp_path, 0.03, 2)
    procs.append(reader)
    reader.wait_for("reading")
    largest, open_segments = produce_and_acknowledge(store, 40_000)  # (about 8 times the bound through the log)
    reader.close()
    assert largest <= 2 * LOG_LIMIT_BYTES
    assert store.log_restarts >= 1
    store.append([("kept", entries("b"))])  # (a commit after the last restart cuts the file back)
    wait_until(lambda: (tmp_path / "zmqmesh.db-wal").stat().st_size <= LOG_LIMIT_BYTES,
               timeout=10, what="the log cut back to its limit")
    store.close()
    store = Store(tmp_path)
    assert sum(len(s.messages) for s in store.pending("q", limit=100_000)) == 4 * len(open_segments)
    assert live(store, "kept") == [("a", 0), ("b", 0)]
    store.close()


def test_the_commit_that_starts_an_outgrown_log_over_leaves_its_file_cut_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader held a snapshot while the log grew past `LOG_LIMIT_BYTES`; once it lets go,
    the one commit that finds the file too large starts the log over and cuts the file back
    before it returns. (A RESTART checkpoint left the cutting to the commit after it: a
    store whose writes paused there kept the outgrown file, and `test_the_log_stays_bounded_
    ...` waited for that later commit in vain in 1 run of 4 on a loaded machine.) The
    checkpointer's thread is kept out of it: its checkpoint, once the reader let go, could
    let SQLite cut the file on the next write before that commit looked (log_restarts 0,
    the file cut back all the same: 1 fresh-clone CI run of many)."""
    monkeypatch.setattr(checkpointer, "CHECKPOINT_DELAY_S", 3600.0)
    store = Store(tmp_path)
    wal = store.path.with_name(store.path.name + "-wal")
    reader = sqlite3.connect(store.path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM outbox").fetchone()  # (on a snapshot until it ends)
    body = msgpack.packb(b"x" * 1_000_000)
    k = 0
    while wal.stat().st_size <= LOG_LIMIT_BYTES:
        store.append([("q", [(f"id-{k}", 1.0, None, body, 0, False)])])
        k += 1
    reader.execute("COMMIT")
    reader.close()
    time.sleep(0.02)  # (a commit looks at the file's size at most every 5 ms)
    store.append([("q", entries("last"))])
    assert wal.stat().st_size <= LOG_LIMIT_BYTES
    assert store.log_restarts >= 1
    assert len(live(store, "q")) == k + 1
    store.close()


def read_to_the_end(history: History, prefix: str) -> list[dict[str, Any]]:
    """Every page of a replay of ``prefix`` from its start, as a subscriber asks for them."""
    pages, after = [], 0
    while True:
        page = history.page(prefix, after, None, 1 << 20)
        pages.append(page)
        if page["rows"]:
            after = page["rows"][-1][0]
        if not page["more"]:
            return pages


def test_a_history_read_tells_each_topics_next_number_with_its_last_page_only(tmp_path: Path) -> None:
    """A page used to carry the next number of every kept topic: with thousands of topics,
    more than its rows, on every page."""
    store = Store(tmp_path)
    kept = [(f"t.{i % 3000:04d}", i // 3000, 1, 1000.0 + i, msgpack.packb(i), None) for i in range(5000)]
    store.history.keep(kept)
    store.history.keep([("other.x", 0, 1, 1.0, msgpack.packb("not under t."), None)])
    history = History(store, (HistoryPolicy("t.", 100_000),), Stats())
    pages = read_to_the_end(history, "t.")
    assert [len(p["rows"]) for p in pages] == [PAGE_ROWS, PAGE_ROWS, 5000 - 2 * PAGE_ROWS]
    assert [r[5] for p in pages for r in p["rows"]] == [msgpack.packb(i) for i in range(5000)]
    assert all("next" not in p for p in pages[:-1])
    numbers = {f"t.{t:04d}": (5000 - t + 2999) // 3000 for t in range(3000)}
    assert pages[-1]["next"] == numbers
    assert history.page("t.", 0, None, 1 << 20, max_rows=0) == {"rows": [], "more": False, "next": numbers}
    store.close()


def test_a_reader_that_takes_next_in_pieces_gets_each_topic_once_in_order_within_its_budget(
        tmp_path: Path) -> None:
    """The numbers of many kept topics come in pieces, each within what the rows leave of
    the budget (one topic at least), in topic order, each but the last naming the topic
    the next begins at; the whole map still comes to a reader that does not ask for pieces."""
    store = Store(tmp_path)
    store.history.keep([(f"t.{i:05d}", 0, 1, 1000.0 + i, b"\x01", None) for i in range(3000)])
    store.history.keep([("other.x", 0, 1, 1.0, b"\x01", None), ("t", 0, 1, 1.0, b"\x01", None)])
    history = History(store, (HistoryPolicy("t.", 10),), Stats())
    numbers = {f"t.{i:05d}": 1 for i in range(3000)}
    for max_rows in (PAGE_ROWS, 0):
        pieces, after, start = [], 0, ""
        while True:
            page = history.page("t.", after, None, 16 * 1024, max_rows, start)
            assert len(msgpack.packb(page)) <= 2 * 16 * 1024
            after = page["rows"][-1][0] if page["rows"] else after
            if page["more"]:
                assert "next" not in page and "next_from" not in page
                continue
            pieces.append(page["next"])
            if "next_from" not in page:
                break
            start = page["next_from"]
            assert start not in page["next"] and all(t < start for t in page["next"])
        assert len(pieces) > 2 and [t for p in pieces for t in p] == sorted(numbers)
        assert {t: n for p in pieces for t, n in p.items()} == numbers
    assert history.page("t.", 0, None, 10, 0, "t.02999") == {"rows": [], "more": False, "next": {"t.02999": 1}}
    assert history.page("t.", 0, None, 16 * 1024, 0)["next"] == numbers  # (a reader before pieces)
    store.close()


def test_a_page_of_history_of_topics_named_in_wide_characters_stays_within_its_budget(tmp_path: Path) -> None:
    """A page's rows are weighed by the UTF-8 bytes of their topics, and the ``"start"``
    of each topic numbered past 0 is weighed too: 400 one-message topics of 197 bytes
    (48 emoji, 4 bytes each, one character each), numbered from 5, came in pages of
    8,042 bytes against a budget of 2,048 (a reader of 4 KiB took none of them: the page
    was past its ``max_message_bytes``), and so did the pieces of ``next`` after them."""
    store = Store(tmp_path)
    payload = msgpack.packb([{"n": 1}])
    store.history.keep([("o." + "\U0001F600" * 48 + chr(0x4E00 + i), 5, 1, 1000.0 + i, payload, None)
                        for i in range(400)])
    history = History(store, (HistoryPolicy("o.", 10),), Stats())
    after, start, rows, pages = 0, "", 0, 0
    while True:
        page = history.page("o.", after, None, 2048, PAGE_ROWS, start)
        pages += 1
        assert len(msgpack.packb(page)) <= 2048 + 256, (len(page["rows"]), len(msgpack.packb(page)))
        rows += len(page["rows"])
        after = page["rows"][-1][0] if page["rows"] else after
        if page["more"]:
            continue
        if "next_from" not in page:
            break
        start = page["next_from"]
    assert rows == 400 and pages > 20
    store.close()


def test_the_next_numbers_of_a_last_page_are_those_of_its_rows_while_frames_are_kept_meanwhile(
        tmp_path: Path) -> None:
    """A subscriber takes a frame numbered below a topic's next number, and not replayed,
    as lost: the last page's numbers must never run ahead of the rows read."""
    store = Store(tmp_path)
    history = History(store, (HistoryPolicy("t.", 1_000_000),), Stats())
    stop = threading.Event()

    def keep() -> None:
        seq = 0
        while not stop.is_set():
            store.history.keep([(f"t.{seq % 7}", seq // 7, 1, 1.0, b"\x01", None)])
            seq += 1

    keeper = threading.Thread(target=keep)
    keeper.start()
    try:
        for _ in range(20):
            pages = read_to_the_end(history, "t.")
            reached: dict[str, int] = {}
            for _pos, topic, seq, count, *_rest in (r for p in pages for r in p["rows"]):
                reached[topic] = max(reached.get(topic, 0), seq + count)
            assert pages[-1]["next"] == reached
    finally:
        stop.set()
        keeper.join(10)
        store.close()


def test_a_failed_store_write_is_tried_again_ever_more_slowly_up_to_a_bound() -> None:
    """The delay before a failed store write (forgetting handled messages, a move to the
    dead letters) is tried again doubles from 0.5 s to 30 s and stays there, however many
    failures in a row (its formula overflowed a float past about a thousand: 8.5 hours of
    a full disk, and the retries then stopped)."""
    from zmqmesh._patterns.durable import _retry_delay

    assert [_retry_delay(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert _retry_delay(5000) == 30.0


def test_each_opening_of_a_store_is_a_run_named_in_its_lineage_and_a_copy_lacks_the_later_ones(
        tmp_path: Path) -> None:
    """The runs a store names (newest first) let a subscriber see a store restored from an
    older copy: the copy never saw the runs opened after it was taken."""
    first = Store(tmp_path / "s")
    first.close()
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    lineage = first.runs
    for _ in range(RUNS_KEPT + 2):
        store = Store(tmp_path / "s")
        assert store.runs[1:] == lineage[:RUNS_KEPT - 1] and store.runs[0] not in lineage
        lineage = store.runs
        store.close()
    assert len(lineage) == RUNS_KEPT
    restored = Store(tmp_path / "copy")
    assert restored.runs[1:] == first.runs and not set(restored.runs) & set(lineage)
    assert restored.stream_id == first.stream_id
    restored.close()


def opened(directory: Path, number: int = 0) -> tuple[str, ...]:
    """Open the store in ``directory`` (a run), number ``number`` messages in its history,
    close it; its runs."""
    store = Store(directory)
    runs = store.runs
    if number:
        nxt = store.history.numbering("t.").get("t.x", 0)
        store.history.keep([("t.x", nxt, number, 1.0, b"\x01", None)])
    store.close()
    return runs


def test_a_store_opened_again_and_again_without_numbering_still_names_the_last_run_that_numbered(
        tmp_path: Path) -> None:
    """A publisher that crash-loops (starts, then dies before publishing, again and
    again) opened a run each time: after 16 of them its store no longer named the run its
    subscribers followed, and they took it for a store restored from a copy (a whole
    history read again, marked redelivered). A run that numbered nothing is left out once
    16 openings followed it; one that numbered stays named, also after expiry deleted
    what it numbered. The lineage stays bounded."""
    published = opened(tmp_path, 5)[0]
    empty: list[str] = []  # (newest first)
    for n in range(RUNS_KEPT + 4):
        runs = opened(tmp_path)
        assert runs[0] not in empty and runs[0] != published, n
        empty.insert(0, runs[0])
        newest = (*empty, published)[:RUNS_KEPT]
        assert runs == (newest if published in newest else (*newest, published)), n
    assert len(runs) == RUNS_KEPT + 1 and runs[-1] == published, "the newest 16, and the run that numbered"
    # a run that numbers, then everything it numbered expires: it numbered all the same
    store = Store(tmp_path)
    expired = store.runs[0]
    store.history.keep([("t.x", 5, 3, 1.0, b"\x01", None)])
    assert store.history.expire("t.", 2.0, keep_empty=0) == (["t.x"], 8)
    store.close()
    for _ in range(RUNS_KEPT + 4):
        runs = opened(tmp_path)
    assert runs[RUNS_KEPT:] == (expired, published)
    # each numbering: past the newest 16, up to 16 more that numbered, newest first
    numbered = [opened(tmp_path, 1)[0] for _ in range(2 * RUNS_KEPT + 2)]
    for _ in range(3):  # (and between them, runs that numbered nothing: left out past the newest 16)
        numbered.append(opened(tmp_path, 1)[0])
        opened(tmp_path)
    runs = opened(tmp_path)
    assert len(runs) == 2 * RUNS_KEPT
    assert [r for r in runs[RUNS_KEPT:]] == [r for r in reversed(numbered) if r not in runs[:RUNS_KEPT]][:RUNS_KEPT]


def test_a_copy_taken_after_a_run_that_numbered_nothing_is_still_told_from_the_runs_after_it(
        tmp_path: Path) -> None:
    """Each opening is a new run, even after one that numbered nothing: a copy taken (the
    publisher stopped) after such a run, put back after the next run numbered messages,
    lacks that run, so its subscribers read the history again instead of skipping the
    numbers given anew. (Had the opening after a run that numbered nothing gone on under
    that run's token, the copy would have gone on under it too: the restore unseen.) A
    copy taken after a crash loop lacks what followed it likewise."""
    opened(tmp_path / "s", 5)
    opened(tmp_path / "s")
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    after = opened(tmp_path / "s", 5)  # subscribers followed this run and took its numbers
    restored = opened(tmp_path / "copy")
    assert after[0] not in restored and restored[1:] == after[1:]
    for _ in range(RUNS_KEPT + 4):  # a crash loop, then a run that numbers
        opened(tmp_path / "s")
    shutil.rmtree(tmp_path / "copy")
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    later = opened(tmp_path / "s", 5)
    assert after[0] in later
    restored = opened(tmp_path / "copy")
    assert later[0] not in restored and after[0] in restored


def test_a_store_of_a_version_before_run_marks_keeps_the_runs_it_named(tmp_path: Path) -> None:
    """A store whose runs were recorded without marks (a version before them): its runs
    count as runs that numbered, kept past the newest 16; its first run opened now is
    marked, and a crash loop after it leaves them named."""
    store = Store(tmp_path)
    store.close()
    old = tuple(f"{i:016x}" for i in range(RUNS_KEPT))
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:
        db.execute("DELETE FROM meta WHERE key IN ('run_mark', 'runs_empty')")
        db.execute("UPDATE meta SET value = ? WHERE key = 'runs'", (",".join(old),))
    db.close()
    for _ in range(RUNS_KEPT + 4):
        runs = opened(tmp_path)
    assert runs[RUNS_KEPT:] == old


def test_the_dead_letter_tools_open_a_store_without_starting_a_run(tmp_path: Path) -> None:
    """Only a node's opening is a run: the command-line tools' (dead letters) leave the
    lineage as it is. (Each use recorded one; after 16 of them a publisher's subscribers
    took it for a store restored from a copy and read its whole history again.)"""
    store = Store(tmp_path)
    lineage = store.runs
    store.close()
    for _ in range(RUNS_KEPT + 1):
        retry_dead_letters(tmp_path, "orders.dead")
        drop_dead_letters(tmp_path, "orders.dead")
    store = Store(tmp_path)
    assert store.runs[1:] == lineage
    store.close()


def test_a_store_of_schema_4_is_upgraded_with_its_durable_cursors(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.cursors.save([("d", "s1", "t.x", 7, 9, 3)])
    store.history.keep([("t.x", 0, 5, 1.0, b"\x01", None)])
    store.close()
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:  # as schema 4 left it
        db.executescript("""
            DROP TABLE cursor_runs; DROP TABLE cursor_began; DROP INDEX history_topics_emptied;
            CREATE TABLE topics_4 AS SELECT topic, next FROM history_topics; DROP TABLE history_topics;
            CREATE TABLE history_topics (topic TEXT PRIMARY KEY, next INTEGER NOT NULL) WITHOUT ROWID;
            INSERT INTO history_topics SELECT * FROM topics_4; DROP TABLE topics_4;
            UPDATE meta SET value = '4' WHERE key = 'schema_version'; DELETE FROM meta WHERE key = 'runs';""")
    store = Store(tmp_path)
    assert store.cursors.load("d") == {"s1": {"t.x": (7, 9, 3)}} and store.cursors.load_runs("d") == {}
    assert store.history.state() == {"t.x": (0, 5)}
    store.cursors.save([], [("d", "s1", "abc")])
    assert store.cursors.load_runs("d") == {"s1": "abc"} and len(store.runs) == 1
    store.close()
    assert inspect_store(tmp_path)["schema"] == SCHEMA_VERSION == 8


def test_a_store_of_schema_6_is_upgraded_its_runs_read_as_then_and_an_older_zmqmesh_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store as schema 6 left it: durable subscriptions' places and the publisher runs
    they followed, one stream ("s2") with a run and no place. Schema 6 recorded a run at a
    subscription's first start, before any read of the history went through (mid-stream:
    ``replay="new"`` or in seconds), and took a stream with no place for one never met.
    Upgraded to 7, such a run goes (the stream is begun again as ``replay`` says, as then:
    kept, it was resumed from the start of the history, the whole of it under the prefix
    delivered once); a stream with places keeps its run. The new table records where a
    subscription began mid-stream until a read goes through; an older zmqmesh (schema 6)
    refuses the store, as any newer one, and read-only tools still read a schema 6 store as
    it is."""
    store = Store(tmp_path)
    store.cursors.save([("d", "s1", "t.x", 7, 9, 3)], [("d", "s1", "r1"), ("d", "s2", "r2"), ("e", "s3", "r3")])
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "zmqmesh.db")) as db, db:  # as schema 6 left it
        db.execute("DROP TABLE cursor_began")
        db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    assert inspect_store(tmp_path)["schema"] == 6
    assert zmqmesh.durable_subscriptions(tmp_path) == {"d": {"streams": 2, "topics": 1},
                                                       "e": {"streams": 1, "topics": 0}}
    store = Store(tmp_path)
    assert store.cursors.load("d") == {"s1": {"t.x": (7, 9, 3)}}
    assert store.cursors.load_runs("d") == {"s1": "r1"} and store.cursors.load_runs("e") == {}
    store.cursors.save([], [], [("d", "s4", 5, 1.5), ("d", "s5", 0, None)])
    assert store.cursors.load_began("d") == {"s4": (5, 1.5), "s5": (0, None)}
    store.cursors.save([], [], [], [("d", "s4")])
    assert store.cursors.load_began("d") == {"s5": (0, None)}
    store.close()
    assert inspect_store(tmp_path)["schema"] == SCHEMA_VERSION == 8
    assert zmqmesh.durable_subscriptions(tmp_path) == {"d": {"streams": 2, "topics": 1}}  # (s1, and s5 begun)
    import zmqmesh._store.store as store_module

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 6)  # (the check of a zmqmesh of schema 6)
    with pytest.raises(zmqmesh.StoreError, match="newer zmqmesh"):
        Store(tmp_path)
    monkeypatch.undo()
    assert zmqmesh.forget_durable_subscription(tmp_path, "d") == {"streams": 2, "topics": 1}
    assert zmqmesh.durable_subscriptions(tmp_path) == {}


def test_the_numbering_of_topics_with_nothing_kept_goes_past_a_cap_and_the_floor_rises_past_it(
        tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.history.keep([(f"t.{i:03}", 0, i + 1, 1.0, b"\x01", None) for i in range(300)])
    store.history.keep([("t.kept", 0, 1, 2e9, b"\x01", None)])  # (not expired)
    forgotten, floor = store.history.expire("t.", 100.0, keep_empty=100)
    assert forgotten == [f"t.{i:03}" for i in range(200)] and floor == 200  # (the oldest emptied first)
    assert set(store.history.state()) == {f"t.{i:03}" for i in range(200, 300)} | {"t.kept"}
    assert store.history.floor() == 200
    store.history.keep([("t.250", 250, 1, 2e9, b"\x01", None)])  # kept again: no longer empty
    assert store.history.forget_emptied(keep_empty=0) == ([f"t.{i:03}" for i in range(200, 300) if i != 250], 300)
    assert set(store.history.state()) == {"t.250", "t.kept"}
    store.close()


def test_a_topic_numbered_afresh_whose_first_commit_failed_says_where_it_began_when_sent_again(
        tmp_path: Path) -> None:
    """Past the floor, a new topic's first frame says where its numbering began (`began`).
    When the history could not keep that frame (a full store: it is not sent), the topic's
    number is taken back: the next frame is again its first, and must say so."""
    store = Store(tmp_path, max_bytes=1 << 20)
    store.history.keep([(f"t.{i}", 0, 1, 1.0, b"\x01", None) for i in range(3)])
    assert store.history.expire("t.", 100.0, keep_empty=0)[1] == 1  # (the floor rises past them)
    history = History(store, (HistoryPolicy("t.", 100),), Stats())
    first = history.number(b"t.new", 1)
    assert first == 1 and history.began
    history.began = False  # (as its publisher does, once said)
    history.record(b"t.new", first, 1, b"\x00" * (2 << 20), None)  # (more than the store may hold)
    assert not history.commit()
    assert history.number(b"t.new", 1) == first and history.began
    history.began = False
    history.record(b"t.new", first, 1, b"\x01", None)
    assert history.commit()
    assert history.number(b"t.new", 1) == first + 1 and not history.began
    store.close()


def test_a_history_that_keeps_failing_logs_once_and_counts_every_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full store refuses every commit of the history, one or more a pass of the loop:
    each message is counted, and the error is logged once, not once a commit (a flood at
    high publishing rates)."""
    store = Store(tmp_path, max_bytes=1 << 20)
    stats = Stats()
    history = History(store, (HistoryPolicy("t.", 100),), stats)
    with caplog.at_level(logging.ERROR, logger="zmqmesh.history"):
        for _ in range(50):
            seq = history.number(b"t.x", 2)
            history.record(b"t.x", seq, 2, b"\x00" * (2 << 20), None)  # (more than the store may hold)
            assert not history.commit()
    assert stats.snapshot()["pubsub"]["history_failed"] == 100
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot keep 2 published message(s)" in errors[0].getMessage()
    store.close()


def test_a_queue_parked_while_its_offer_was_gone_is_read_back_when_the_offer_is_back(tmp_path: Path) -> None:
    """Durable queues over a real store: a push parks a queue whose puller's offer went
    away, and the offer comes back before the loop looked again (two rebuilds of the offers
    between two refills). The queue must be read back for the puller, not left parked with
    the key present in the offers both times the loop looked (it waited for another push,
    a change of offers or a restart)."""
    from zmqmesh._patterns.durable import DurableQueues
    from zmqmesh._wire.codec import Codec

    offers: dict[str, dict[str, tuple[str, ...]]] = {"ackqueues": {"q": ("A",)}}
    store = Store(tmp_path)
    queues = DurableQueues(store, Codec(1 << 20), Stats(), later=lambda delay, fn: None, wake_soon=lambda delay: None,
                           offered=lambda: offers["ackqueues"])
    queues.recover()
    assert queues.refill() == {}  # (the loop saw q offered)
    offers["ackqueues"] = {}  # (its puller's offer goes ...)
    queues.submit("q", [("id-1", 1000.0, None, msgpack.packb("m1"), 0, False)])  # (... a push parks it ...)
    assert store.parked("q") is not None and "q" not in queues.queues
    offers["ackqueues"] = {"q": ("B",)}  # (... and another's comes, before the loop looks again)
    dealt: list[Any] = []
    for _ in range(3):
        buffers = queues.refill()
        for buffer in buffers.values():
            dealt += [msgpack.unpackb(message[BODY]) for message in buffer]
            buffer.clear()
        queues.reckon(buffers)
    assert dealt == ["m1"], dealt
    store.close()


def test_inspect_reads_a_store_of_schema_5_as_it_is_and_refuses_older_and_newer_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.append([("q", entries("a"))])
    store.close()

    def written_as(version: int) -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / "zmqmesh.db")) as db, db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))

    written_as(5)  # (5 has the tables of 6: read as it is, not upgraded)
    seen = inspect_store(tmp_path)
    assert seen["schema"] == 5 and seen["queues"]["q"]["messages"] == 1
    written_as(4)
    with pytest.raises(zmqmesh.StoreError, match="older zmqmesh"):
        inspect_store(tmp_path)
    written_as(SCHEMA_VERSION + 1)
    with pytest.raises(zmqmesh.StoreError, match="newer zmqmesh"):
        inspect_store(tmp_path)
