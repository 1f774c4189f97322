"""Replayable topics and durable subscriptions: a publisher keeps its topics (history=), a
subscriber replays them (replay=), resumes where it was (durable_name=), and is told of
what it missed (msg.gap). Real sockets, real stores, real processes killed with SIGKILL."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptProcess, rejected, rss_bytes, wait_until

import zmqmesh
import zmqmesh._patterns.history
from zmqmesh import inspect_store

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "replay_process.py"


def worker(*args: Any) -> ScriptProcess:
    """A replay_process.py child (see its docstring for the roles)."""
    return ScriptProcess(WORKER, *args)


def publish_all(node: zmqmesh.Node, topics: list[str], first: int, count: int) -> None:
    for i in range(first, first + count):
        node.publish(topics[i % len(topics)], {"n": i})


@pytest.mark.parametrize("kept_topics", [2, 2500])  # (2500: pages of one-message frames, the last one numbering 2500 topics)
def test_a_late_subscriber_replays_the_history_then_goes_live_with_no_gap_or_duplicate(
        tmp_path: Path, mesh: dict[str, Any], kept_topics: int) -> None:
    topics = [f"logs.{t}" for t in range(kept_topics)]
    live: list[tuple[str, int, str]] = []
    late: list[tuple[str, int, str, int]] = []
    publisher = zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 10_000}, **mesh)
    with publisher:
        early = zmqmesh.Node("early", **mesh)
        early.subscribe("logs.", lambda m: live.append((m.topic, m.data["n"], m.id)))
        with early:
            publisher.wait_for_peers(1)
            publish_all(publisher, topics, 0, 3000)
            wait_until(lambda: len(live) == 3000, 20, "the live messages")
            subscriber = zmqmesh.Node("late", **mesh)
            subscriber.subscribe("logs.", lambda m: late.append((m.topic, m.data["n"], m.id, m.gap)), replay="all")
            with subscriber:
                wait_until(lambda: len(late) >= 3000, 20, "the replay")
                publisher.wait_for_peers(2)
                publish_all(publisher, topics, 3000, 1000)  # live again, right after the replay
                wait_until(lambda: len(late) >= 4000 and len(live) >= 4000, 20, "the live messages")
                assert subscriber.stats()["pubsub"].get("gap", 0) == 0
    assert [n for _t, n, _i, _g in late] == list(range(4000)), "in order per publisher, no gap, no duplicate"
    assert all(g == 0 for *_rest, g in late)
    assert [(t, n, i) for t, n, i, _g in late] == live, "a replayed message has the id it had live"


@pytest.mark.timeout(60)
def test_publishers_that_left_for_good_make_way_for_new_streams_to_replay(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived subscriber whose publishers come and go, each run on a fresh store (a
    new stream): past the streams it follows (here 2), the cursor of a stream whose
    publisher left makes way for the new one. (Before, the cursors of the publishers gone
    for good were kept: 10 publisher runs left 10 cursors, 20 left 20, and once the table
    was full no new publisher's history was replayed: here the third's and fourth's.)"""
    from zmqmesh._patterns.replay import replays

    monkeypatch.setattr(replays, "_MAX_CURSORS", 2)
    got: list[tuple[int, int]] = []
    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("kept.", lambda m: got.append((m.data["run"], m.data["n"])), replay="all")
    with subscriber:
        for run in range(4):
            store = str(tmp_path / f"run{run}")
            # published out of the mesh: the subscriber can have them from the history only
            alone = {**mesh, "mesh": f"{mesh['mesh']}-alone"}
            with zmqmesh.Node(f"alone{run}", store=store, history={"kept.": 100}, **alone) as publisher:
                for n in range(3):
                    publisher.publish("kept.x", {"run": run, "n": n})
            with zmqmesh.Node(f"publisher{run}", store=store, history={"kept.": 100}, **mesh) as publisher:
                publisher.wait_for_peers(1)
                wait_until(lambda run=run: sum(1 for r, _n in got if r == run) >= 3, 10, f"the history of run {run}")
            wait_until(lambda: not subscriber.peers(), 10, "the publisher gone")
        assert len(subscriber._engine.inbox.replays.cursors) <= 2
        assert subscriber.stats()["rejected"].get("replay_streams_full", 0) == 0
    assert got == [(run, n) for run in range(4) for n in range(3)]


@pytest.mark.timeout(90)
def test_a_long_lived_subscriber_keeps_the_cursors_of_few_publishers_gone(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived replaying subscriber among publishers that come and go, each run on a
    fresh store (a new stream): it keeps the cursors of at most `MAX_CURSORS_GONE` streams
    whose publisher is gone (here 2), those found gone first forgotten, counted; a
    publisher of a stream still kept that comes back on its store goes on where it was.
    (Before, every stream's cursor stayed up to 65,536, ~2 kB each: churn of 3,000
    short-lived publishers left 3,000 cursors after they all left; here 6 runs left 6.)"""
    from zmqmesh._patterns.replay import replays

    monkeypatch.setattr(replays, "MAX_CURSORS_GONE", 2, raising=False)
    runs = 6
    history = {"kept.": 100}
    got: list[tuple[int, int]] = []
    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("kept.", lambda m: got.append((m.data["run"], m.data["n"])), replay="all")

    def publisher_run(run: int, numbers: range) -> None:
        with zmqmesh.Node(f"publisher{run}", store=str(tmp_path / f"run{run}"), history=history, **mesh) as publisher:
            publisher.wait_for_subscribers("kept.", 1)
            for n in numbers:
                publisher.publish("kept.x", {"run": run, "n": n})
            wait_until(lambda: (run, numbers[-1]) in got, 10, f"run {run} delivered")
        wait_until(lambda: not subscriber.peers(), 10, "the publisher gone")

    with subscriber:
        for run in range(runs):
            publisher_run(run, range(3))
        cursors = subscriber._engine.inbox.replays.cursors
        wait_until(lambda: len(cursors) <= 2, 10, f"at most 2 cursors of publishers gone, not {len(cursors)}")
        publisher_run(runs - 1, range(3, 5))  # (its cursor kept: on from where it was, nothing again)
        forgotten = subscriber.stats()["rejected"].get("replay_streams_forgotten")
    assert forgotten == runs - 2
    assert got == [(run, n) for run in range(runs) for n in range(3)] + [(runs - 1, 3), (runs - 1, 4)]


def read_only(store: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """The rows ``sql`` selects in the store ``store``, read-only (while its node runs, too)."""
    db = sqlite3.connect(f"file:{store / 'zmqmesh.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def stored_streams(store: Path, name: str) -> tuple[set[str], set[str]]:
    """The streams the durable subscription ``name`` has rows of in the store's ``cursors``
    and ``cursor_runs`` tables (read-only)."""
    return ({s for (s,) in read_only(store, "SELECT DISTINCT stream FROM cursors WHERE name = ?", (name,))},
            {s for (s,) in read_only(store, "SELECT stream FROM cursor_runs WHERE name = ?", (name,))})


def stream_of(store: Path) -> str:
    """The stream id of the publisher store ``store`` (read-only)."""
    return str(read_only(store, "SELECT value FROM meta WHERE key = 'stream'")[0][0])


@pytest.mark.timeout(60)
def test_a_durable_subscription_forgets_the_streams_of_publishers_gone_past_its_bound(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived durable subscriber whose publishers come and go, each run on a fresh
    store (a new stream): past the streams its name keeps places in (here 2), the places in
    the streams of publishers gone go, in memory and in its store, counted, and every
    message of every run is still delivered; a publisher of a forgotten stream that comes
    back is followed as a new stream (``replay="all"``: its history again). (Before, the
    name kept a place per stream for good: 10 publisher runs left 10 streams in memory and
    in the store, 20 left 20.)"""
    from zmqmesh._patterns.replay import places, replays

    monkeypatch.setattr(places, "MAX_DURABLE_STREAMS", 2)
    # (no second read of a history after its catch-up: one on its way as its publisher stops
    # would keep that stream being read, for `AWAY_HOLD_S`, past the next run)
    monkeypatch.setattr(replays, "TAIL_LOOKS_S", ())
    runs = 5
    history = {"kept.": 100}
    got: list[tuple[int, int, bool]] = []
    sub_store = tmp_path / "subscriber"
    subscriber = zmqmesh.Node("subscriber", store=str(sub_store), **mesh)
    subscriber.subscribe("kept.", lambda m: got.append((m.data["run"], m.data["n"], m.redelivered)),
                         replay="all", durable_name="d")

    def publisher_run(run: int, published: bool = False) -> None:
        store = str(tmp_path / f"run{run}")
        if not published:  # published out of the mesh: the subscriber can have them from the history only
            alone = {**mesh, "mesh": f"{mesh['mesh']}-alone"}
            with zmqmesh.Node(f"alone{run}", store=store, history=history, **alone) as publisher:
                for n in range(3):
                    publisher.publish("kept.x", {"run": run, "n": n})
        seen = sum(1 for r, _n, _re in got if r == run)
        with zmqmesh.Node(f"publisher{run}", store=store, history=history, **mesh) as publisher:
            publisher.wait_for_peers(1)
            wait_until(lambda: sum(1 for r, _n, _re in got if r == run) >= seen + 3, 10, f"the history of run {run}")
        wait_until(lambda: not subscriber.peers(), 10, "the publisher gone")

    with subscriber:
        for run in range(runs):
            publisher_run(run)
        cursors = subscriber._engine.store.cursors
        last = stream_of(tmp_path / f"run{runs - 1}")
        wait_until(lambda: cursors.load("d").get(last, {}).get("kept.x", (-1,))[0] == 2, 10, "the last run recorded")
        assert len(cursors.load("d")) <= 2 and len(cursors.load_runs("d")) <= 2, \
            f"at most 2 streams in the store, not {len(cursors.load('d'))}"
        publisher_run(0, published=True)  # forgotten: followed afresh, its history replayed again
        stats = subscriber.stats()["rejected"]
    in_memory = subscriber._engine.inbox.replays.places  # (stopped: its state is final)
    assert len(in_memory.streams("d")) <= 2 and len(in_memory.runs("d")) <= 2, "at most 2 streams in memory"
    in_cursors, in_runs = stored_streams(sub_store, "d")
    assert len(in_cursors) <= 2 and len(in_runs) <= 2, "and in the store (none written back at the stop)"
    assert stats.get("durable_streams_forgotten") == runs - 2 + 1
    assert stats.get("durable_streams_full", 0) == 0
    assert got == [(run, n, False) for run in [*range(runs), 0] for n in range(3)], \
        "every message of every run, once, and run 0's again as a new stream's"


@pytest.mark.timeout(60)
def test_a_stream_delivered_plainly_at_the_bound_marks_what_it_delivered_redelivered_once_followed(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A durable subscription's name at its bound of streams (here 2), every one of a
    publisher present: a third publisher's messages come plainly, counted and logged; once
    a publisher left, that stream is followed (``replay="all"``: its history from the
    start), and the messages it delivered plainly come again marked ``redelivered``.
    (Before, nothing was logged, and they came again unmarked: duplicates no handler could
    tell.)"""
    from zmqmesh._patterns.replay import places, replays

    monkeypatch.setattr(places, "MAX_DURABLE_STREAMS", 2)
    monkeypatch.setattr(replays, "TAIL_LOOKS_S", ())
    got: list[tuple[str, int, bool]] = []
    subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
    subscriber.subscribe("kept.", lambda m: got.append((m.data["p"], m.data["n"], m.redelivered)),
                         replay="all", durable_name="d")
    publishers: dict[str, zmqmesh.Node] = {}

    def publish(name: str, numbers: range) -> None:
        if name not in publishers:
            publishers[name] = zmqmesh.Node(name, store=str(tmp_path / name), history={"kept.": 100}, **mesh).start()
            publishers[name].wait_for_subscribers("kept.", 1, timeout=10)
        for n in numbers:
            publishers[name].publish("kept.x", {"p": name, "n": n})
        wait_until(lambda: (name, numbers[-1]) in {(p, n) for p, n, _r in got}, 10, f"{name} {numbers[-1]}")

    with subscriber, caplog.at_level(logging.WARNING, logger="zmqmesh.replay"):
        try:
            publish("a", range(3))
            publish("b", range(3))
            publish("c", range(3))  # (past the bound, a and b present: plainly)
            assert subscriber.stats()["rejected"].get("durable_streams_full", 0) > 0
            publishers.pop("a").stop()
            wait_until(lambda: len(subscriber.peers()) == 2, 10, "a gone")
            publish("c", range(3, 6))  # (a's places make way: c's history from its start)
            wait_until(lambda: len([1 for p, _n, _r in got if p == "c"]) >= 9, 10, "c's history")
        finally:
            for publisher in publishers.values():
                publisher.stop()
    assert got[:9] == [(p, n, False) for p in "abc" for n in range(3)]
    assert got[9:] == [("c", n, n < 3) for n in range(6)], "what came plainly comes again marked redelivered"
    assert any("past its 2 streams" in r.getMessage() and "plainly" in r.getMessage() for r in caplog.records)


def test_a_subscription_dropped_and_made_again_replays_the_whole_history_again(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A replaying subscription made again is a new one: it replays from the start, as
    ``replay="all"`` says, and not from where the dropped one had got to."""
    got: list[int] = []

    def handle(msg: zmqmesh.Message) -> None:
        got.append(msg.data["n"])

    with zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 1000}, **mesh) as publisher:
        publish_all(publisher, ["logs.x"], 0, 50)
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("logs.", handle, replay="all")
        with subscriber:
            wait_until(lambda: len(got) == 50, 20, "the replay")
            assert subscriber.unsubscribe("logs.", handle)
            publish_all(publisher, ["logs.x"], 50, 10)  # (while nobody subscribes)
            got.clear()
            subscriber.subscribe("logs.", handle, replay="all")
            wait_until(lambda: len(got) >= 60, 20, "the second replay")
            publish_all(publisher, ["logs.x"], 60, 5)
            wait_until(lambda: len(got) >= 65, 20, "the live messages")
            time.sleep(0.2)
            assert subscriber.stats()["pubsub"].get("gap", 0) == 0
    assert got == list(range(65)), "the whole history again, then live: no gap, no duplicate"


def test_a_durable_name_is_refused_to_a_second_subscription_that_shares_its_topics(tmp_path: Path) -> None:
    """A durable name keeps one place per publisher stream and topic: two subscriptions of
    one node moving it (two handlers of "app." under "collector", measured with real
    processes) lost, after a SIGKILL, 1,792 of 20,000 messages for the slower one, with no
    gap reported. A second subscription whose prefix shares topics with the first cannot
    take the name; one of other topics, or the same subscription made again, can."""
    node = zmqmesh.Node("subscriber", store=str(tmp_path))

    def first(msg: zmqmesh.Message) -> None: ...

    def second(msg: zmqmesh.Message) -> None: ...

    node.subscribe("app.", first, replay="all", durable_name="collector")
    for prefix, handler in (("app.", second), ("app.a", second), ("app.a", first), ("ap", second)):
        with pytest.raises(zmqmesh.ConfigError, match="collector"):
            node.subscribe(prefix, handler, durable_name="collector")
        assert not node.unsubscribe(prefix, handler), "a refused subscription leaves nothing"
    node.subscribe("app.", first, replay="all", durable_name="collector")  # (made again: a new one, allowed)
    node.subscribe("audit.", second, durable_name="collector")  # (no topic shared)
    node.subscribe("app.", second, durable_name="other")
    assert node.unsubscribe("app.", first)
    node.subscribe("app.a", second, durable_name="collector")  # (free again)
    node.stop()


def test_a_durable_subscription_dropped_by_its_handler_records_what_it_handled(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """The places of a durable subscription were written after a burst only while some
    replaying subscription was made: one dropped meanwhile (by its handler, or another
    thread between the gathering of a burst and its handling) left them unwritten. Measured:
    a handler that dropped its subscription at the last of 50 messages, its node stopped
    cleanly and started again, got all 50 again; 150 drops and makes from another thread
    handled 537 messages twice, 260 of them not marked redelivered. Now what was handled is
    recorded, and the restarted subscription resumes right after it."""
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"logs.": 1000}, **mesh) as publisher:
        publish_all(publisher, ["logs.x"], 0, 50)
        got: list[tuple[int, bool]] = []
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)

        def handle_then_leave(msg: zmqmesh.Message) -> None:
            got.append((msg.data["n"], msg.redelivered))
            if msg.data["n"] == 49:
                subscriber.unsubscribe("logs.", handle_then_leave)

        subscriber.subscribe("logs.", handle_then_leave, replay="all", durable_name="reader")
        with subscriber:
            wait_until(lambda: len(got) == 50, 20, "the replay")
        got.clear()
        again = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
        again.subscribe("logs.", lambda m: got.append((m.data["n"], m.redelivered)), replay="all",
                        durable_name="reader")
        with again:
            again.wait_for_peers(1)  # (published before its subscription reaches the publisher: read from the history)
            publish_all(publisher, ["logs.x"], 50, 5)
            wait_until(lambda: got and got[-1][0] == 54, 20, "the live messages")
    assert got == [(n, False) for n in range(50, 55)], "resumed right after what was handled"


def test_a_durable_subscription_dropped_mid_burst_gets_what_it_never_handled_when_taken_again(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A handler that drops its durable subscription at the 26th of 50 replayed messages:
    the rest of its burst (24 messages) still reached it after `unsubscribe` returned, and
    was recorded as handled. Now none does (counted in ``pubsub["after_unsubscribe"]``), its
    place stays after what it handled, and the subscription taken again gets those 24,
    marked redelivered (its node had reached them), then what is new."""
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"logs.": 1000}, **mesh) as publisher:
        publish_all(publisher, ["logs.x"], 0, 50)
        got: list[tuple[int, bool]] = []
        late: list[int] = []
        gone = threading.Event()
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)

        def handle_then_leave(msg: zmqmesh.Message) -> None:
            if gone.is_set():
                late.append(msg.data["n"])
                return
            got.append((msg.data["n"], msg.redelivered))
            if msg.data["n"] == 25:
                subscriber.unsubscribe("logs.", handle_then_leave)
                gone.set()

        subscriber.subscribe("logs.", handle_then_leave, replay="all", durable_name="reader")
        with subscriber:
            wait_until(gone.is_set, 20, "the unsubscribe")
            wait_until(lambda: subscriber.stats()["pubsub"].get("after_unsubscribe", 0) == 24, 20, "the rest passed over")
        assert late == []
        assert got == [(n, False) for n in range(26)]
        got.clear()
        again = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
        again.subscribe("logs.", lambda m: got.append((m.data["n"], m.redelivered)), replay="all",
                        durable_name="reader")
        with again:
            wait_until(lambda: len(got) >= 24, 20, "what was never handled")
            again.wait_for_peers(1)
            publish_all(publisher, ["logs.x"], 50, 5)
            wait_until(lambda: got and got[-1][0] == 54, 20, "the live messages")
    assert got == [(n, True) for n in range(26, 50)] + [(n, False) for n in range(50, 55)]


def test_what_fell_out_of_the_history_is_reported_as_a_gap(tmp_path: Path, mesh: dict[str, Any]) -> None:
    got: list[tuple[int, int]] = []
    recent: list[tuple[int, int]] = []
    history = {"count.": 100, "age.": {"max_messages": 1000, "max_age_s": 0.5}}
    with zmqmesh.Node("publisher", store=str(tmp_path), history=history, **mesh) as publisher:
        publish_all(publisher, ["count.x"], 0, 500)  # only about the last 100 are kept
        publish_all(publisher, ["age.x"], 0, 50)
        wait_until(lambda: "age.x" in inspect_store(tmp_path)["topics"], 10, "the messages kept")
        wait_until(lambda: "age.x" not in inspect_store(tmp_path)["topics"], 10, "the old messages to expire")
        publish_all(publisher, ["age.x"], 50, 10)
        subscriber = zmqmesh.Node("late", **mesh)
        subscriber.subscribe("count.", lambda m: got.append((m.data["n"], m.gap)), replay="all")
        subscriber.subscribe("age.", lambda m: recent.append((m.data["n"], m.gap)), replay="all")
        with subscriber:
            wait_until(lambda: got and got[-1][0] == 499 and recent and recent[-1][0] == 59, 20, "the replays")
            counted = subscriber.stats()["pubsub"]["gap"]
            shown = subprocess.run([sys.executable, "-m", "zmqmesh", "store", "inspect", str(tmp_path)],
                                   capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert "KEPT TOPIC" in shown.stdout and "count.x" in shown.stdout and "..499" in shown.stdout
    first, gap = got[0]
    # (whole frames are trimmed: at least the last 100 are kept)
    assert 0 < first <= 400 and gap == first, "the messages trimmed by max_messages are reported"
    assert [n for n, _g in got] == list(range(first, 500)) and all(g == 0 for _n, g in got[1:])
    assert recent == [(50, 50), *[(n, 0) for n in range(51, 60)]], "and those expired by max_age_s"
    assert counted == first + 50


def test_numbering_goes_on_after_a_restart_even_when_everything_kept_expired(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A subscriber's place must never be taken by reused numbers; and a topic kept by a
    longer prefix follows that prefix's rule, not a shorter prefix's age limit."""
    history = {"logs.": {"max_messages": 1000, "max_age_s": 0.5}, "logs.audit.": 1000}
    with zmqmesh.Node("publisher", store=str(tmp_path), history=history, **mesh) as publisher:
        publish_all(publisher, ["logs.x"], 0, 10)
        publish_all(publisher, ["logs.audit.x"], 0, 10)
        wait_until(lambda: "logs.x" in inspect_store(tmp_path)["topics"], 10, "the messages kept")
        wait_until(lambda: "logs.x" not in inspect_store(tmp_path)["topics"], 10, "the old messages to expire")
    assert inspect_store(tmp_path)["topics"]["logs.audit.x"]["messages"] == 10
    got: list[tuple[int, int | None]] = []
    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("logs.", lambda m: got.append((m.data["n"], m.sequence)))
    with subscriber, zmqmesh.Node("publisher", store=str(tmp_path), history=history, **mesh) as publisher:
        publisher.wait_for_peers(1)
        publish_all(publisher, ["logs.x"], 10, 1)
        wait_until(lambda: got, 10, "the publication")
    assert got == [(10, 10)]


def test_a_publication_right_after_start_reaches_every_subscribed_member(mesh: dict[str, Any]) -> None:
    """The start-up window: the publisher's own handler, and every subscriber among the
    peers wait_for_peers returned, get a publication made at once; none is reported
    sent when it reached no one."""
    seen: dict[str, list[Any]] = {"publisher": [], "a": [], "b": []}
    subscribers = [zmqmesh.Node(name, **mesh) for name in ("a", "b")]
    for node in subscribers:
        node.subscribe("news.", lambda m, name=node.name: seen[name].append(m.data))
        node.start()
    try:
        publisher = zmqmesh.Node("publisher", **mesh)
        publisher.subscribe("news.", lambda m: seen["publisher"].append(m.data))
        with publisher:
            publisher.publish("news.first", 1)  # before any peer is known: its own handler still gets it
            publisher.wait_for_peers(2)
            publisher.publish("news.second", 2)
            publisher.publish("nobody.listens", 3)
            wait_until(lambda: all(len(v) >= (2 if k == "publisher" else 1) for k, v in seen.items()), 10,
                       "every subscriber")
            # (the loop counts a pass's unrouted publications at its end: it may still be on it)
            wait_until(lambda: "unrouted" in publisher.stats()["pubsub"], 10, "the unrouted publication counted")
            counters = publisher.stats()["pubsub"]
    finally:
        for node in subscribers:
            node.stop()
    assert seen["publisher"] == [1, 2]
    assert seen["a"][-1] == 2 and seen["b"][-1] == 2
    assert counters["unrouted"] == 1, "the publication nobody subscribed to is counted as such"


def test_kept_and_unkept_topics_of_a_publisher_arrive_in_the_order_published(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    got: list[int] = []
    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("", lambda m: got.append(m.data))
    with subscriber, zmqmesh.Node("publisher", store=str(tmp_path), history={"kept.": 1000}, **mesh) as publisher:
        publisher.wait_for_peers(1)
        for i in range(2000):
            publisher.publish("kept.x" if i % 7 < 3 else "other.x", i)
        wait_until(lambda: len(got) == 2000, 20, "every publication")
    assert got == list(range(2000))


def test_a_publisher_taken_for_gone_while_a_subscriber_catches_up_costs_it_nothing(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A subscriber that fell behind reads what was dropped on the way from the history;
    meanwhile its publisher stops (SIGSTOP) for longer than ``peer_timeout_s``, is taken
    for gone, and resumes. The read in flight fails: the subscription holds on and reads
    on once the publisher is back, then asks it where its topics are. (Before, the failed
    read reported messages the history held as missed, and the last ones, dropped on the
    way, never came: 2240 of 3000 arrived, 74 reported.)"""
    got: list[int] = []
    left: list[str] = []

    def slow(msg: zmqmesh.Message) -> None:
        time.sleep(0.0005)
        got.append(msg.data["n"])

    publisher = worker("bursting_publisher", tmp_path, mesh["mesh"], mesh["beacon_port"], 3000)
    procs.append(publisher)
    publisher.wait_for("ready")
    subscriber = zmqmesh.Node("slow", recv_hwm=5, **mesh)
    subscriber.subscribe("logs.", slow, replay="all")
    subscriber.on_leave(lambda peer: left.append(peer.name))
    with subscriber:
        subscriber.wait_for_peers(1)
        time.sleep(1.0)  # its catch-up of the (empty) history is over
        assert publisher.proc.stdin is not None
        publisher.proc.stdin.write("go\n")
        publisher.proc.stdin.flush()
        wait_until(lambda: subscriber.stats()["pubsub"].get("replayed", 0) > 0, 30, "a read of the history")
        publisher.proc.send_signal(signal.SIGSTOP)  # (mid-stream: more reads are to come)
        try:
            wait_until(lambda: left, 10, "the publisher taken for gone")
            time.sleep(2.5)  # away for longer than a quiet spell (QUIET_LOOK_S)
        finally:
            publisher.proc.send_signal(signal.SIGCONT)
        publisher.wait_for("published")
        wait_until(lambda: len(got) >= 3000, 60, "every message")
        assert got == list(range(3000))
        assert subscriber.stats()["pubsub"].get("gap", 0) == 0
        assert subscriber.stats()["pubsub"].get("replayed", 0) > 0


def test_a_durable_subscriber_killed_mid_stream_handles_every_message_once_in_order(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    total = 50_000
    out = tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    publisher = worker("publisher", tmp_path / "publisher", name, port, total, 10_000)
    procs.append(publisher)
    publisher.wait_for("ready")
    for kill_at in (total // 4, total // 2):
        subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out)
        procs.append(subscriber)
        wait_until(lambda kill_at=kill_at: out.exists() and out.stat().st_size > 0
                   and len(out.read_text().splitlines()) >= kill_at,
                   60, f"{kill_at} messages handled")
        subscriber.kill()
    subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out)
    procs.append(subscriber)
    publisher.wait_for("published", 60)
    wait_until(lambda: len({line.split()[1] for line in out.read_text().splitlines()}) >= total, 60,
               "every message handled")  # (by number: the lines of messages handled again count once)
    handled: list[int] = []
    repeats = Counter[int]()
    for line in out.read_text().splitlines():
        topic, n, redelivered, gap = line.split()
        assert gap == "0" and topic == f"app.{int(n) % 3}"
        if handled and int(n) <= handled[-1]:
            assert redelivered == "1", f"message {n} handled twice, not marked redelivered"
            repeats[int(n)] += 1
            continue
        handled.append(int(n))
    assert handled == list(range(total)), "every message exactly once, in order"
    assert sum(repeats.values()) <= 2 * 256, "at most a burst marked again per kill"
    subscriber.close()
    publisher.close()


def test_a_durable_subscriber_killed_while_it_reads_the_history_redelivers_at_most_a_burst(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A subscriber that catches up handles pages of history (2048 rows): it still commits
    its place every 256 messages, so a kill redelivers at most that many, whatever the
    speed of the machine."""
    total = 20_000
    out = tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    publisher = worker("publisher", tmp_path / "publisher", name, port, total, 1e9)
    procs.append(publisher)
    publisher.wait_for("published", 60)

    def handled() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    for kill_at in (total // 4, total // 2):
        subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out)
        procs.append(subscriber)
        wait_until(lambda kill_at=kill_at: handled() >= kill_at, 60, f"{kill_at} messages handled")
        subscriber.kill()
    subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out)
    procs.append(subscriber)
    wait_until(lambda: _last_line_is(out, total - 1), 60, "every message handled")
    seen: set[int] = set()
    repeats = 0
    for line in out.read_text().splitlines():
        n = int(line.split()[1])
        if n in seen:
            repeats += 1
            assert line.split()[2] == "1", f"message {n} handled twice, not marked redelivered"
        seen.add(n)
    assert seen == set(range(total))
    assert repeats <= 2 * 256, f"{repeats} messages handled again after two kills"
    subscriber.close()
    publisher.close()


def test_a_durable_subscribers_burst_cut_by_a_kill_and_trimmed_from_the_history_is_reported_as_a_gap(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A subscriber killed while it handled a burst (100 messages, 40 handled) resumes after
    its recorded place; the history, which keeps 20, has dropped that burst meanwhile, so
    it cannot come again marked redelivered: it is counted missed in ``msg.gap``, the 40
    handled with the 60 not (the subscriber cannot tell them apart), and nothing is skipped
    unreported. (Found by benchmarks/soak_replay.py: "193 false gaps" over 11 lives of a
    subscriber of histories of 300 a topic; docs/durability.md promised only that such a
    burst comes again.)"""
    out = tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]

    def handled() -> list[tuple[int, int]]:
        lines = out.read_text().split("\n")[:-1] if out.exists() else []  # (whole lines only)
        return [(int(line.split()[1]), int(line.split()[3])) for line in lines]

    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"app.": 20}, **mesh) as publisher:
        subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out, 0.02)
        procs.append(subscriber)
        subscriber.wait_for("ready")
        publisher.wait_for_subscribers("app.0", 1)
        publisher.publish_many("app.0", [{"n": i} for i in range(100)])
        wait_until(lambda: len(handled()) >= 40, 30, "40 messages handled")
        subscriber.kill()
        before = handled()
        publisher.publish_many("app.0", [{"n": i} for i in range(100, 200)])
        wait_until(lambda: inspect_store(tmp_path / "publisher")["topics"]["app.0"]["first_seq"] >= 100, 10,
                   "the first 100 trimmed")
        again = worker("subscriber", tmp_path / "subscriber", name, port, out)
        procs.append(again)
        wait_until(lambda: handled() and handled()[-1][0] == 199, 30, "the rest")
        after = handled()[len(before):]
    first, gap = after[0]
    reported = set(range(first - gap, first))
    assert all(g == 0 for _n, g in before) and all(g == 0 for _n, g in after[1:])
    assert first >= 100 and [n for n, _g in after] == list(range(first, 200))
    assert {n for n, _g in before} | reported | {n for n, _g in after} == set(range(200)), "nothing unreported"
    assert {n for n, _g in before} <= reported, "the burst the kill cut short, handled or not, is counted missed"
    again.close()


def _last_line_is(out: Path, n: int) -> bool:
    lines = out.read_text().split("\n")[:-1]  # (whole lines only: a write may be under way)
    return bool(lines) and int(lines[-1].split()[1]) == n


def test_an_async_node_replays_and_resumes_as_a_node_does(tmp_path: Path, mesh: dict[str, Any]) -> None:
    import asyncio

    async def collect(got: list[int], until: int) -> None:
        subscriber = zmqmesh.AsyncNode("async-late", store=str(tmp_path / "subscriber"), **mesh)

        @subscriber.subscribe("jobs.", replay="all", durable_name="worker")
        async def handle(msg: zmqmesh.Message) -> None:
            got.append(msg.data["n"])

        async with subscriber:
            for _ in range(400):
                if got and got[-1] == until:
                    break
                await asyncio.sleep(0.025)

    first: list[int] = []
    second: list[int] = []
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"jobs.": 10_000}, **mesh) as publisher:
        publish_all(publisher, ["jobs.x", "jobs.y"], 0, 500)
        asyncio.run(collect(first, 499))
        publish_all(publisher, ["jobs.x", "jobs.y"], 500, 500)
        asyncio.run(collect(second, 999))
    assert first == list(range(500))
    assert second == list(range(500, 1000)), "resumed right after the last message handled"


@pytest.mark.timeout(60)
def test_publications_a_stop_leaves_unread_for_durable_subscriptions_are_named_as_coming_again(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Frames still unread in the socket when a stop's timeout passes, of a topic only
    durable subscriptions take, come again after a restart (read from the history): the
    stop's warning says so (it called them publications dropped). Every message still
    arrives once the subscriber is back."""
    got: list[int] = []
    total = 600
    with zmqmesh.Node("publisher", store=str(tmp_path / "pub"), history={"logs.": total}, **mesh) as publisher:
        first = zmqmesh.Node("late", store=str(tmp_path / "sub"), **mesh)
        first.subscribe("logs.", lambda m: (time.sleep(0.02), got.append(m.data["n"])), replay="all",
                        durable_name="reader")
        with first:
            publisher.wait_for_subscribers("logs.a", 1)
            for n in range(total):  # (a frame each, most of them left in the socket)
                publisher.publish("logs.a", {"n": n})
                time.sleep(0.0005)
            first.stop(timeout=0.3)
        assert "publication(s) of durable subscriptions not handled" in caplog.text
        assert "publication(s) not handled, dropped" not in caplog.text
        second = zmqmesh.Node("late", store=str(tmp_path / "sub"), **mesh)
        second.subscribe("logs.", lambda m: got.append(m.data["n"]), replay="all", durable_name="reader")
        with second:
            wait_until(lambda: set(got) == set(range(total)), 30, "every message, after the restart")


def test_a_message_whose_handler_a_stop_cut_short_comes_again_to_a_durable_subscription(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A handler still running at the stop's deadline did not handle its message: the
    subscription resumes from it. (It was recorded as handled, and skipped after the
    restart.)"""
    import asyncio

    started = threading.Event()

    async def hang_on_one(msg: zmqmesh.Message) -> None:
        if msg.data["n"] == 1:
            started.set()
            await asyncio.sleep(30)

    got: list[tuple[int, bool]] = []
    with zmqmesh.Node("publisher", store=str(tmp_path / "pub"), history={"logs.": 100}, **mesh) as publisher:
        publish_all(publisher, ["logs.a"], 0, 3)
        first = zmqmesh.Node("late", store=str(tmp_path / "sub"), **mesh)
        first.subscribe("logs.", hang_on_one, replay="all", durable_name="reader")
        with first:
            assert started.wait(20)
            first.stop(timeout=0.5)
        second = zmqmesh.Node("late", store=str(tmp_path / "sub"), **mesh)
        second.subscribe("logs.", lambda msg: got.append((msg.data["n"], msg.redelivered)),
                         replay="all", durable_name="reader")
        with second:
            wait_until(lambda: [n for n, _ in got] == [1, 2], 20, "messages 1 and 2 again")
    assert got[0] == (1, True)


def test_a_durable_subscriptions_handler_that_raises_is_logged_and_counted(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    got: list[int] = []

    def handler(msg: zmqmesh.Message) -> None:
        if msg.data["n"] == 1:
            raise ValueError("message one refused")
        got.append(msg.data["n"])

    publisher = zmqmesh.Node("publisher", store=str(tmp_path / "pub"), history={"logs.": 100}, **mesh)
    with caplog.at_level(logging.ERROR, logger="zmqmesh"), publisher:
        publish_all(publisher, ["logs.a"], 0, 3)
        subscriber = zmqmesh.Node("late", store=str(tmp_path / "sub"), **mesh)
        subscriber.subscribe("logs.", handler, replay="all", durable_name="reader")
        with subscriber:
            wait_until(lambda: got == [0, 2], 20, "the replay")
            assert subscriber.stats()["pubsub"]["errors"] == 1
    assert "message one refused" in caplog.text


def test_a_replaying_subscriber_that_falls_behind_gets_every_message_in_order(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """Frames dropped at the high-water marks of a slow subscriber come from the history,
    in order, none twice. (Which frames drop is up to timing; that the last ones, which
    no next frame shows missing, are read once the publisher is quiet, is shown without
    I/O in test_layers.py.)"""
    got: list[int] = []

    def slow(msg: zmqmesh.Message) -> None:
        time.sleep(0.0005)
        got.append(msg.data["n"])

    publisher = zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 10_000}, send_hwm=5, **mesh)
    with publisher:
        subscriber = zmqmesh.Node("slow", recv_hwm=5, **mesh)
        subscriber.subscribe("logs.", slow, replay="all")
        with subscriber:
            publisher.wait_for_peers(1)
            time.sleep(1.0)  # its catch-up of the (empty) history is over
            for i in range(3000):  # 3 MB: more than the sockets' buffers hold, so frames drop
                publisher.publish("logs.a", {"n": i, "pad": "x" * 1000})
            wait_until(lambda: len(got) >= 3000, 30, "every message")
            assert subscriber.stats()["pubsub"].get("replayed", 0) > 0  # some came from the history
    assert got == list(range(3000))


@pytest.mark.parametrize("subscriber_restarts", [False, True])
def test_a_publisher_restored_from_an_older_copy_of_its_store_is_noticed_and_nothing_new_skipped(
        tmp_path: Path, mesh: dict[str, Any], subscriber_restarts: bool) -> None:
    """A publisher's store replaced by a copy taken at 900 (the publisher stopped) numbers
    its next messages 900.. again: a durable subscriber that handled up to 999 must not
    take them for handled. It notices the publisher's numbering went back (counted as
    ``rewound``), replays its history again, marks redelivered what may have been handled
    (numbers up to 1009: it cannot tell which are new), and gets every new message, whether
    it ran meanwhile or resumed."""
    store, copy = tmp_path / "publisher", tmp_path / "copy"
    history = {"logs.": 10_000}
    got: list[tuple[int, bool]] = []

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
        node.subscribe("logs.", lambda m: got.append((m.data["n"], m.redelivered)), replay="all",
                       durable_name="d")
        return node

    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
        publish_all(publisher, ["logs.x"], 0, 900)
    shutil.copytree(store, copy)  # (the publisher stopped: a consistent copy)
    sub = subscriber().start()
    try:
        with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
            wait_until(lambda: len(got) >= 900, 20, "the replay")
            publisher.wait_for_peers(1)
            publish_all(publisher, ["logs.x"], 900, 100)
            wait_until(lambda: len(got) >= 1000, 20, "the live messages")
        with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:  # (a plain restart)
            publisher.wait_for_peers(1)
            publish_all(publisher, ["logs.x"], 1000, 10)
            wait_until(lambda: len(got) >= 1010, 20, "the live messages after a restart")
        assert got == [(n, False) for n in range(1010)]
        assert sub.stats()["pubsub"].get("rewound", 0) == 0, "a restart on the same store goes on"
        if subscriber_restarts:
            sub.stop()
        shutil.rmtree(store)
        copy.rename(store)  # the store restored from the copy: numbering back at 900
        with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
            if subscriber_restarts:
                publish_all(publisher, ["logs.x"], 2000, 50)  # numbered 900 .. 949 again
                sub = subscriber().start()
            else:
                publisher.wait_for_peers(1)
                publish_all(publisher, ["logs.x"], 2000, 50)
            wait_until(lambda: {n for n, _r in got} >= set(range(2000, 2050)), 20, "the new messages")
            publish_all(publisher, ["logs.x"], 2050, 10)  # (numbered 950 .. 959: live after the replay)
            wait_until(lambda: {n for n, _r in got} >= set(range(2050, 2060)), 20, "the live messages")
            stats = sub.stats()["pubsub"]
    finally:
        sub.stop()
    assert stats.get("rewound") == 1, "the numbering going back is counted"
    again = got[1010:]
    assert [n for n, _r in again if n < 2000] == list(range(900)), "the history again, in order"
    assert [n for n, _r in again if n >= 2000] == list(range(2000, 2060)), "every new message once, in order"
    assert all(r for _n, r in again), "numbered up to where it was (1009): marked, they may have been handled"


@pytest.mark.timeout(90)
def test_frames_of_a_killed_publisher_taken_after_it_left_are_its_streams_not_plain_duplicates(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A subscriber behind a publisher killed with SIGKILL (its handler slow, the frames still
    on their way to it) takes them after the publisher was found gone: their sender was no
    peer any more, so they waited 2 s as a stranger's and went plainly, with ids of the
    sender's node, not of its stream, and the publisher back on its store delivered them
    again from its history: 57,376 of 319,657 deliveries were such duplicates, not marked,
    in a run of 4 kills. They are the stream's still, which a cursor names: taken in order,
    each once, with its stream's id."""
    store = tmp_path / "publisher"
    got: list[tuple[str, int, bool]] = []
    release = threading.Event()

    def handle(msg: zmqmesh.Message) -> None:
        release.wait(30)
        got.append((msg.id, msg.data["n"], msg.redelivered))

    subscriber = zmqmesh.Node("subscriber", **mesh)
    subscriber.subscribe("app.", handle, replay="all")
    with subscriber:
        publisher = worker("publisher", store, mesh["mesh"], mesh["beacon_port"], 2000, 20_000)  # (a frame a message)
        procs.append(publisher)
        wait_until(lambda: bool(subscriber.peers()), 20, "the publisher")
        publisher.wait_for("published")
        time.sleep(0.5)  # (the frames on their way)
        publisher.kill()
        wait_until(lambda: not subscriber.peers(), 20, "the publisher found gone")
        time.sleep(2.5)  # (past the 2 s a stranger's frames wait)
        release.set()
        # back, publishing none: what its high-water mark dropped meanwhile comes from its history
        again = worker("publisher", store, mesh["mesh"], mesh["beacon_port"], 0, 1_000_000)
        procs.append(again)
        again.wait_for("published")
        wait_until(lambda: len(got) >= 2000, 30, "the 2000 messages")
        time.sleep(3)  # (what it would deliver again from its history comes meanwhile)
        stats = subscriber.stats()["pubsub"]
    stems = Counter(msg_id.rsplit("/", 2)[0] for msg_id, _n, _r in got)
    assert stems == {stream_of(store): 2000}, f"ids not of the stream: {stems}"
    assert [n for _id, n, _r in got] == list(range(2000)), "each once, in order"
    assert stats.get("gap", 0) == 0


@pytest.mark.parametrize("subscriber_restarts", [False, True])
def test_a_publisher_put_back_from_a_copy_taken_while_it_ran_is_seen_by_its_numbers(
        tmp_path: Path, mesh: dict[str, Any], subscriber_restarts: bool) -> None:
    """A copy of a publisher's store taken while it ran holds the run that went on after it,
    so the runs do not tell that the numbers went back (a documented limit). Put back, the
    publisher numbered 100 .. 199 again, and the subscriber, which had reached 200, skipped
    them, unreported: live, 100 of the 300 new messages (a busy publisher, never quiet);
    resumed on its store, the 50 new ones. The publisher's numbers say it: a subscription
    past what its publisher numbered in a topic reads it again from the start of the
    history, what was numbered so far marked redelivered; logged, ``rewound`` counted."""
    store, copy = tmp_path / "publisher", tmp_path / "copy"
    history = {"logs.": 10_000}
    got: list[tuple[int, bool, int]] = []

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
        node.subscribe("logs.", lambda m: got.append((m.data["n"], m.redelivered, m.gap)), replay="all",
                       durable_name="d")
        return node

    sub = subscriber().start()
    try:
        with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
            publisher.wait_for_peers(1)
            publish_all(publisher, ["logs.x"], 0, 100)
            wait_until(lambda: len(got) >= 100, 20, "the first 100")
            shutil.copytree(store, copy)  # (while it runs: the copy holds its run)
            publish_all(publisher, ["logs.x"], 100, 100)
            wait_until(lambda: len(got) >= 200, 20, "the next 100")
        if subscriber_restarts:
            sub.stop()
        shutil.rmtree(store)
        copy.rename(store)  # numbering back at 100
        new = 50 if subscriber_restarts else 300
        with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
            if subscriber_restarts:
                publish_all(publisher, ["logs.x"], 1000, new)  # numbered 100 .. 149
                sub = subscriber().start()
            else:
                publisher.wait_for_peers(1)
                for n in range(1000, 1000 + new):
                    publisher.publish("logs.x", {"n": n})
                    time.sleep(0.005)  # (busy: never quiet for 2 s)
            wait_until(lambda: {n for n, _r, _g in got} >= set(range(1000, 1000 + new)), 20, "every new message")
            stats = sub.stats()["pubsub"]
    finally:
        sub.stop()
    assert stats.get("rewound") == 1 and stats.get("gap", 0) == 0
    again = got[200:]
    assert [n for n, _r, _g in again if n < 1000] == list(range(100)), "the history again, in order"
    assert [n for n, _r, _g in again if n >= 1000] == list(range(1000, 1000 + new)), "every new message once"
    assert all(r for n, r, _g in again if n < 1000), "what it had before: marked, it may have been handled"


@contextlib.contextmanager
def _reader_back_after_damage(tmp_path: Path, mesh: dict[str, Any], damage: str,
                              ) -> Iterator[tuple[zmqmesh.Node, zmqmesh.Node, list[tuple[str, int, bool]]]]:
    """A durable subscriber of ``logs.`` (``replay="all"``, named "reader") that handled 20
    messages of logs.a and logs.b and stopped; its store then changed by the SQL
    ``damage`` and 60 more published: yields the publisher and the subscriber started
    again, with what it got since, ``(topic, data, redelivered)``."""
    got: list[tuple[str, int, bool]] = []

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("sub", store=str(tmp_path / "sub"), **mesh)
        node.subscribe("logs.", lambda m: got.append((m.topic, m.data, m.redelivered)), replay="all",
                       durable_name="reader")
        return node

    with zmqmesh.Node("publisher", store=str(tmp_path / "pub"), history={"logs.": 1000}, **mesh) as publisher:
        for i in range(20):
            publisher.publish(("logs.a", "logs.b")[i % 2], i)
        with subscriber():
            wait_until(lambda: len(got) == 20, 20, "the first 20")
        with sqlite3.connect(tmp_path / "sub" / "zmqmesh.db") as db:
            db.execute(damage)
        got.clear()
        for i in range(20, 80):
            publisher.publish(("logs.a", "logs.b")[i % 2], i)
        with subscriber() as node:
            yield publisher, node, got


def test_a_durable_subscription_whose_place_is_past_its_publisher_reads_the_topic_again(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A place recorded past anything its publisher numbered (a number damaged on disk, of
    the right type: 10**12) made the subscription skip every message of that topic below it,
    unreported (0 of the 30 new logs.a messages, no counter, no log). The publisher's numbers
    show it: the topic is read again from the start of the history, marked redelivered up
    to what the publisher had numbered (its messages may have been handled); logged, counted
    in ``rewound``; the other topics resume where they were."""
    damage = "UPDATE cursors SET seq = 1000000000000, upto = 1000000000000 WHERE topic = 'logs.a'"
    with _reader_back_after_damage(tmp_path, mesh, damage) as (publisher, node, got):
        wait_until(lambda: {n for _t, n, _r in got} >= set(range(20, 80)), 20, "the 60 published since")
        publisher.publish("logs.a", 80)  # (after the look: new, not marked)
        wait_until(lambda: any(n == 80 for _t, n, _r in got), 20, "a message published after")
        stats = node.stats()["pubsub"]
    assert stats.get("rewound") == 1 and stats.get("gap", 0) == 0
    assert [n for t, n, _r in got if t == "logs.b"] == list(range(21, 80, 2)), "logs.b resumes where it was"
    assert [(n, r) for t, n, r in got if t == "logs.a"] == [(n, n < 80) for n in range(0, 81, 2)]


@pytest.mark.timeout(240)
def test_a_durable_subscriber_away_while_its_publisher_crash_loops_is_not_taken_for_a_restore(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A publisher process that starts and is killed before it publishes, 20 times (a
    crash loop under a supervisor), while a durable subscriber is away: each start was a
    run, and after 16 the subscriber no longer found the run it followed, took the store
    for one restored from a copy and read the whole history again, marked redelivered.
    Back, it reads no history again (no ``rewound``) and gets each new message once, not
    marked."""
    store = tmp_path / "publisher"
    port, name = mesh["beacon_port"], mesh["mesh"]
    got: list[tuple[str, int, bool, int]] = []

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
        node.subscribe("app.", lambda m: got.append((m.topic, m.data["n"], m.redelivered, m.gap)), replay="all",
                       durable_name="collector")
        return node

    def publisher(total: int) -> ScriptProcess:
        proc = worker("publisher", store, name, port, total, 100_000)
        procs.append(proc)
        proc.wait_for("published")
        return proc

    sub = subscriber().start()
    try:
        first = publisher(30)
        wait_until(lambda: len(got) >= 30, 20, "the first run's messages")
    finally:
        sub.stop()
    first.close()
    for _ in range(20):  # (killed once started: its store opened, nothing published)
        publisher(0).kill()
    sub = subscriber().start()
    try:
        last = publisher(30)
        wait_until(lambda: len(got) >= 60, 20, "the new messages")
        time.sleep(1.5)  # (a rewind would read the first 30 again meanwhile)
        stats = sub.stats()["pubsub"]
    finally:
        sub.stop()
    last.close()
    assert stats.get("rewound", 0) == 0, "not taken for a store restored from a copy"
    assert got == [(f"app.{i % 3}", i, False, 0) for i in [*range(30), *range(30)]], "each once, not marked"


def numbered_topics(store: Path) -> int:
    """How many topics the store keeps a numbering for (read-only, while its node runs)."""
    return int(read_only(store, "SELECT count(*) FROM history_topics")[0][0])


def test_a_topic_of_which_everything_expired_is_forgotten_and_numbered_anew_past_its_old_numbers(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A topic per order id, each published once: once their messages expired, their
    numbering goes too, past `MAX_EMPTY_TOPICS` such topics (it stayed for good: 400,000
    topics, 32 MiB of store and 85 MiB of memory). A topic published again is numbered
    past every number given before, and a subscriber that followed its old numbering is
    told (``renumbered``), never skipping the new messages; a topic new to a replaying
    subscriber shows no gap."""
    monkeypatch.setattr(zmqmesh._patterns.history, "MAX_EMPTY_TOPICS", 0)  # (every one emptied: forgotten)
    history = {"orders.": {"max_messages": 100, "max_age_s": 0.3}}
    got: list[tuple[str, int, int | None, int]] = []
    late: list[tuple[str, int, int | None, int]] = []
    with zmqmesh.Node("publisher", store=str(tmp_path), history=history, **mesh) as publisher:
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("orders.", lambda m: got.append((m.topic, m.data["n"], m.sequence, m.gap)),
                             replay="all")
        with subscriber:
            publisher.wait_for_peers(1)
            for i in range(2000):
                publisher.publish(f"orders.{i}", {"n": 0})
            publish_all(publisher, ["orders.0"], 1, 9)  # orders.0: numbered 0 .. 9
            publish_all(publisher, ["orders.1"], 1, 49)  # orders.1: 0 .. 49
            wait_until(lambda: len(got) == 2058, 20, "the first messages")
            wait_until(lambda: numbered_topics(tmp_path) == 0, 20, "the numbering of the expired topics forgotten")
            # (the store commits before its node counts what it forgot: the count follows soon after)
            wait_until(lambda: publisher.stats()["pubsub"].get("history_topics_forgotten", 0) >= 2000, 5,
                       "the forgotten topics counted")
            assert inspect_store(tmp_path)["topics"] == {}
            assert publisher.stats()["pubsub"]["history_topics_forgotten"] == 2000
            publish_all(publisher, ["orders.0"], 10, 5)  # numbered anew, from 50 (the floor): past 9
            publish_all(publisher, ["orders.new"], 0, 3)
            wait_until(lambda: len(got) == 2066, 20, "the messages of the topics numbered anew")
            assert subscriber.stats()["pubsub"].get("renumbered") == 1
            assert subscriber.stats()["pubsub"].get("gap", 0) == 0
            again = zmqmesh.Node("late", **mesh)
            again.subscribe("orders.", lambda m: late.append((m.topic, m.data["n"], m.sequence, m.gap)),
                            replay="all")
            with again:
                wait_until(lambda: len(late) == 8, 20, "the replay")
                assert again.stats()["pubsub"].get("gap", 0) == 0
    assert got[2058:] == [*[("orders.0", n, 40 + n, 0) for n in range(10, 15)],
                          *[("orders.new", n, 50 + n, 0) for n in range(3)]]
    assert sorted(late) == sorted(got[2058:]), "replayed from the history, numbers and no gap as live"
    assert numbered_topics(tmp_path) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durable", [False, True])
def test_a_topic_numbered_afresh_past_the_floor_says_so_live_and_no_page_is_read_for_it(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    """A topic numbered afresh once the store's floor is above 0 begins past 0, and its
    first live frame, if it has headers, says where (``"s"`` in its meta frame): a
    replaying subscriber new to it delivers it live, in order, once, with no gap. Before,
    it took the first number for a gap and read a page of history to learn where the topic
    began: 182 to 199 pages for the 400 messages on 200 new topics, nearly all replayed
    from the history, not live. (A frame without headers stays three frames, for readers
    of protocol 1: its subscriber reads a page, as before.)"""
    monkeypatch.setattr(zmqmesh._patterns.history, "MAX_EMPTY_TOPICS", 0)  # (every one emptied: forgotten)
    # (only the old topics expire: the floor stays where they left it, however slow the run)
    history = {"old.": {"max_messages": 100, "max_age_s": 0.3}, "orders.": {"max_messages": 100}}
    got: list[tuple[str, int, int | None, int, dict[str, str]]] = []
    options: dict[str, Any] = {"durable_name": "audit"} if durable else {}
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history=history, **mesh) as publisher:
        for i in range(20):
            publisher.publish(f"old.{i}", {"n": -1})  # (each numbered 0: the floor becomes 1)
        wait_until(lambda: publisher.stats()["pubsub"].get("history_topics_forgotten") == 20, 20,
                   "the numbering of the expired topics forgotten")
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber") if durable else None, **mesh)
        subscriber.subscribe("orders.", lambda m: got.append((m.topic, m.data["n"], m.sequence, m.gap, m.headers)),
                             replay="all", **options)
        with subscriber:
            publisher.wait_for_peers(1)
            publisher.publish("orders.first", {"n": -1}, headers={"order": "first"})  # (live: the subscription met its publisher)
            wait_until(lambda: len(got) == 1, 20, "the first message")
            time.sleep(0.2)  # (a page it read, if any, answered)
            before = subscriber.stats()
            for i in range(200):  # two messages a topic (a frame or two)
                publisher.publish(f"orders.new{i}", {"n": 2 * i}, headers={"order": str(i)})
                publisher.publish(f"orders.new{i}", {"n": 2 * i + 1}, headers={"order": str(i)})
                time.sleep(0.002)  # (a stream of orders, not one burst: one page each, before)
            wait_until(lambda: len(got) == 401, 20, "the messages of the new topics")
            after = subscriber.stats()
    pages = after["request"]["sent"] - before["request"]["sent"]
    replayed = after["pubsub"].get("replayed", 0) - before["pubsub"].get("replayed", 0)
    assert (pages, replayed) == (0, 0), f"{pages} page(s) of history read for them, {replayed} message(s) replayed"
    assert after["pubsub"].get("gap", 0) == 0 and after["pubsub"].get("renumbered", 0) == 0
    assert got[0][:4] == ("orders.first", -1, 1, 0)
    assert got[1:] == [(f"orders.new{i}", n, 1 + n % 2, 0, {"order": str(i)})
                       for i in range(200) for n in (2 * i, 2 * i + 1)], "each once, in order, no gap"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durable", [False, True])
def test_a_topic_begun_after_the_first_read_of_a_subscription_replaying_seconds_is_not_missed_when_dropped_live(
        tmp_path: Path, mesh: dict[str, Any], durable: bool) -> None:
    """``replay=3600``: the subscription reads the history (of "t.x"), then its handler
    blocks while its publisher floods it with a topic it does not keep ("t.f", a frame of
    60 kB each, past ``pub_hwm=1`` and ``recv_hwm=1``): the first 22 messages of a new kept
    topic ("t.c"), sent among them, are dropped at the high-water mark. Once the handler
    goes on, "t.c" 22 comes live: its 0 to 21 come from the history before it, none
    missed, no gap. Before 98f92f9, "t.c" 22 was taken for where the topic began: 0 to 21
    were neither delivered nor reported (the replay soak's durable subscriber d1 lost a new
    topic's first 22 so). (Fails before it: "t.c" delivered from 15 or 22.)"""
    got: list[tuple[str, Any, int]] = []
    blocked, go_on = threading.Event(), threading.Event()

    def handle(m: zmqmesh.Message) -> None:
        if m.topic == "t.f" and not blocked.is_set():
            blocked.set()
            go_on.wait(30)
        got.append((m.topic, None if m.topic == "t.f" else m.data, m.gap))

    history = {"t.c": 1000, "t.x": 1000}
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history=history, pub_hwm=1, **mesh) as publisher:
        for n in range(3):
            publisher.publish("t.x", n)
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber") if durable else None,
                                  recv_hwm=1, **mesh)
        subscriber.subscribe("t.", handle, replay=3600, **({"durable_name": "d1"} if durable else {}))
        with subscriber:
            publisher.wait_for_peers(1)
            wait_until(lambda: len(got) == 3, 20, "the history read")
            publisher.publish("t.x", 3)
            wait_until(lambda: len(got) == 4, 20, "a live message: the subscription reached the publisher")
            big = b"f" * 60_000
            for _ in range(300):
                publisher.publish("t.f", big)
            wait_until(blocked.is_set, 20, "the handler to block")
            time.sleep(0.5)  # (the pipes full)
            for _ in range(50):
                publisher.publish("t.f", big)
            for n in range(22):
                publisher.publish("t.c", n)
                for _ in range(5):
                    publisher.publish("t.f", big)
            time.sleep(0.5)
            go_on.set()
            seen = [-1]

            def settled() -> bool:  # (nothing more came in 0.3 s: the flood that got through is handled)
                before, seen[0] = seen[0], len(got)
                return before == seen[0]

            wait_until(settled, 20, "the flood that got through", every=0.3)
            publisher.publish("t.c", 22)
            wait_until(lambda: ("t.c", 22, 0) in got, 20, "t.c 22")
            stats = subscriber.stats()["pubsub"]
    assert stats["dropped"] > 0, "the flood was dropped at the high-water mark"
    assert [(t, n, g) for t, n, g in got if t != "t.f"] == [*(("t.x", n, 0) for n in range(4)),
                                                         *(("t.c", n, 0) for n in range(23))]
    assert stats.get("gap", 0) == 0


@contextlib.contextmanager
def _publisher_with_old_messages(tmp_path: Path, mesh: dict[str, Any]) -> Iterator[zmqmesh.Node]:
    """A publisher keeping "t." (its store ``tmp_path / "publisher"``) whose "t.old" 0 to 9
    are older than 2 s (the seconds the subscriptions of these tests replay)."""
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"t.": 1000}, **mesh) as publisher:
        for n in range(10):
            publisher.publish("t.old", n)
        time.sleep(2.5)
        yield publisher


@pytest.mark.timeout(60)
def test_a_durable_subscription_replaying_seconds_restarted_reports_no_gap_for_a_topic_older_than_its_seconds(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A durable subscription's first start with ``replay=2`` reads none of "t.old" (all 10
    older than 2 s) and takes "t.x" live. Stopped, "t.old" 10 is published; restarted on its
    store, it gets "t.old" 10, with no gap: 0 to 9 were older than it replays. Before, its
    places named "t.old" not, so it followed "t.old" from its start: 10 reported missed
    (``msg.gap`` 10, ``pubsub.gap`` 10) though it never was to have them (fails so at
    98f92f9); or, its place in "t.x" (taken live) at position 0, it read the whole history
    again and got "t.old" 0 to 9 (fails so at 1bcd8f3, where a look again at the history
    after the first read, no live message having come yet, also read it all from 0 in the
    first life, and gave "t.old" 0 to 9 then)."""
    got: list[tuple[int, str, int, int]] = []
    with _publisher_with_old_messages(tmp_path, mesh) as publisher:
        gaps = 0
        for life in range(2):
            subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
            subscriber.subscribe("t.", lambda m, life=life: got.append((life, m.topic, m.data, m.gap)), replay=2.0,
                                 durable_name="d")
            with subscriber:
                publisher.wait_for_peers(1)
                if life == 0:
                    time.sleep(0.5)  # (the history read, its subscription in place at the publisher)
                    publisher.publish("t.x", 0)
                    wait_until(lambda: (0, "t.x", 0, 0) in got, 20, "t.x")
                else:
                    wait_until(lambda: any(g[:3] == (1, "t.old", 10) for g in got), 20, "t.old 10")
                    time.sleep(0.3)  # (nothing more)
                gaps += subscriber.stats()["pubsub"].get("gap", 0)
            if life == 0:
                publisher.publish("t.old", 10)
    assert got == [(0, "t.x", 0, 0), (1, "t.old", 10, 0)]
    assert gaps == 0


@pytest.mark.timeout(60)
def test_a_durable_subscription_new_to_a_restarted_publishers_topic_gets_every_message_of_it(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A durable subscription's first start with ``replay="new"`` follows a topic from its
    first live message (it never read the history). Its publisher, restarted on its store
    (a new node), sends "t.a" 10 and then 300 messages of "t.b", a topic the subscription
    never met: at the first frame of the new node it asks where the topics are (a look at
    the numbers alone), and holds the frames that come meanwhile. Every one of "t.b" is
    delivered, once, in order. With 98f92f9 alone, the look's numbers made it expect "t.b"
    past the frames held (they were published before it was answered): all 300 were
    dropped as delivered, unreported (fails so)."""
    got: list[tuple[str, int, int]] = []
    subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
    subscriber.subscribe("t.", lambda m: got.append((m.topic, m.data, m.gap)), durable_name="d")
    with subscriber:
        for life in range(2):
            with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"t.": 10_000},
                              **mesh) as publisher:
                publisher.wait_for_peers(1)
                time.sleep(0.5)  # (its subscription in place at the publisher)
                if life == 0:
                    for n in range(10):
                        publisher.publish("t.a", n)
                    wait_until(lambda: len(got) == 10, 20, "t.a")
                else:
                    publisher.publish("t.a", 10)
                    for n in range(300):
                        publisher.publish("t.b", n)
                    wait_until(lambda: len(got) == 311, 20, "t.a 10 and t.b")
                    time.sleep(0.5)  # (nothing more)
        stats = subscriber.stats()["pubsub"]
    assert got == [*(("t.a", n, 0) for n in range(11)), *(("t.b", n, 0) for n in range(300))]
    assert stats.get("gap", 0) == 0


def _published_out_of_the_mesh(store: Path, history: dict[str, int], mesh: dict[str, Any], topic: str,
                               numbers: range) -> None:
    """Publish ``numbers`` on ``topic`` from a publisher on ``store`` in a mesh of its own:
    a subscriber of ``mesh`` can have them from its history only."""
    alone = {**mesh, "mesh": f"{mesh['mesh']}-alone"}
    with zmqmesh.Node("alone", store=str(store), history=history, **alone) as publisher:
        for n in numbers:
            publisher.publish(topic, n)


def _restarted_after(store: Path, history: dict[str, int], mesh: dict[str, Any], topic: str, meanwhile: range,
                     subscriber: zmqmesh.Node, got: list[tuple[str, int, int]]) -> int:
    """``meanwhile``'s numbers of ``topic`` published by the stopped publisher out of the
    mesh, then the publisher restarted on its ``store`` and the next number published live:
    once ``subscriber`` (whose handler appends to ``got``) got it, the gaps it counted."""
    _published_out_of_the_mesh(store, history, mesh, topic, meanwhile)
    last = meanwhile.stop
    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
        publisher.wait_for_peers(1)
        publisher.wait_for_subscribers(topic, 1, timeout=10)
        publisher.publish(topic, last)
        wait_until(lambda: (topic, last) in [(t, n) for t, n, _g in got], 20, f"{topic} {last}")
        time.sleep(0.5)  # (nothing more)
        gaps: int = subscriber.stats()["pubsub"].get("gap", 0)
        return gaps


@pytest.mark.timeout(60)
@pytest.mark.parametrize("restarted", ["publisher", "subscriber"])
def test_a_durable_subscription_replaying_new_gets_nothing_published_before_it_when_it_reads_the_history(
        tmp_path: Path, mesh: dict[str, Any], restarted: str) -> None:
    """A durable subscription's first start with ``replay="new"``: "t.old" 0 to 9 were
    published before it, "t.a" 0 to 4 come live. Then it reads its publisher's history:
    ``restarted="publisher"``, "t.a" 5 to 9 published while its publisher was out of the
    mesh, and "t.a" 10 live once it is back, a jump the history fills; ``"subscriber"``,
    "t.a" 5 to 9 and "t.old" 10 published while the subscriber was stopped, which it
    resumes from its place. It gets "t.a" 5 to 10 (or 5 to 9 and "t.old" 10), nothing of
    "t.old" 0 to 9 (published before it subscribed: ``replay="new"`` promises none of it),
    and no gap. Before, the read went from the start of the history (the subscription's
    place, taken from live messages only, was position 0), and "t.old" 0 to 9 came (fails
    so at c0d1069). Its first start now reads the history from where its publisher answered
    its replay marker, and so records where "t.old" was: restarted, it takes "t.old" 10 for
    no gap."""
    got: list[tuple[str, int, int]] = []
    history = {"t.": 1000}
    store = tmp_path / "publisher"
    subscriber_store = str(tmp_path / "subscriber")

    def handle(m: zmqmesh.Message) -> None:
        got.append((m.topic, m.data, m.gap))

    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
        for n in range(10):
            publisher.publish("t.old", n)
        subscriber = zmqmesh.Node("subscriber", store=subscriber_store, **mesh)
        subscriber.subscribe("t.", handle, durable_name="d")
        with subscriber:
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers("t.a", 1, timeout=10)
            for n in range(5):
                publisher.publish("t.a", n)
            wait_until(lambda: len(got) == 5, 20, "t.a 0 to 4")
            if restarted == "publisher":
                publisher.stop()
                gaps = _restarted_after(store, history, mesh, "t.a", range(5, 10), subscriber, got)
        if restarted == "subscriber":
            for n in range(5, 10):
                publisher.publish("t.a", n)
            publisher.publish("t.old", 10)
            subscriber = zmqmesh.Node("subscriber", store=subscriber_store, **mesh)
            subscriber.subscribe("t.", handle, durable_name="d")
            with subscriber:
                wait_until(lambda: len(got) >= 11, 20, "t.a 5 to 9 and t.old 10")
                time.sleep(0.5)  # (nothing more)
                gaps = subscriber.stats()["pubsub"].get("gap", 0)
    after = [("t.a", 10, 0)] if restarted == "publisher" else [("t.old", 10, 0)]
    assert got == [*(("t.a", n, 0) for n in range(10)), *after]
    assert gaps == 0


@pytest.mark.timeout(90)
def test_a_durable_subscription_replaying_new_of_a_publisher_of_many_kept_topics_resumes_them_with_no_gap(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A publisher keeps 3,000 topics, one message each, all published before a durable
    subscription's first start with ``replay="new"``: the numbers they reached outweigh what
    the subscriber (64 KiB ``max_message_bytes``) takes in a message, and its first read
    gets them in pieces. A live message comes with no gap; then, the subscriber stopped, the
    first and last topics and a new one get a message each: restarted, it gets those three,
    no gap, nothing older. (Before, its first start read nothing, its place was position 0,
    and restarted it read the whole history: every topic's message published before it.)"""
    topics = sorted(f"orders.{uuid.uuid4()}" for _ in range(3000))
    got: list[tuple[str, int, int]] = []
    subscriber_store = str(tmp_path / "subscriber")

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=subscriber_store, max_message_bytes=64 * 1024, **mesh)
        node.subscribe("orders.", lambda m: got.append((m.topic, m.data["n"], m.gap)), durable_name="d")
        return node

    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"orders.": 10}, **mesh) as publisher:
        for n, topic in enumerate(topics):
            publisher.publish(topic, {"n": n})
        wait_until(lambda: inspect_store(tmp_path / "publisher")["topics"].get(topics[-1], {}).get("messages") == 1,
                   20, "the history kept")
        with subscriber() as node:
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers(topics[1], 1, timeout=10)
            time.sleep(1.0)  # (its first read done)
            publisher.publish(topics[1], {"n": 3000})
            wait_until(lambda: len(got) >= 1, 20, "the live message")
            time.sleep(0.5)  # (nothing more)
            gaps = node.stats()["pubsub"].get("gap", 0)
        publisher.publish(topics[0], {"n": 3001})
        publisher.publish(topics[-1], {"n": 3002})
        publisher.publish("orders.new", {"n": 3003})
        with subscriber() as node:
            wait_until(lambda: len(got) >= 4, 20, "what was published while it was stopped")
            time.sleep(0.5)  # (nothing more)
            gaps += node.stats()["pubsub"].get("gap", 0)
    assert got == [(topics[1], 3000, 0), (topics[0], 3001, 0), (topics[-1], 3002, 0), ("orders.new", 3003, 0)]
    assert gaps == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("replay", ["new", 1.0])
def test_a_durable_subscription_whose_first_read_found_nothing_kept_resumes_after_a_restart(
        tmp_path: Path, mesh: dict[str, Any], replay: str | float) -> None:
    """A durable subscription's first start (``replay="new"``, or in seconds) reads its
    publisher's history through while it keeps nothing under the subscription's prefix: no
    topic to record a place in. Stopped, it misses "t.a" 0 to 4 (older than the seconds it
    replays when it is back); restarted, it gets them, then 5 live, no gap. Before, the
    stream had no record and the restart was a first start again: 0 to 4 were lost, and 5
    came with no gap reported (fails so at a6107c2). It now records the publisher's run once
    its first read went through (`Replays._read_through`), and a stream with a run recorded
    is resumed (`DurablePlaces.known`)."""
    got: list[tuple[str, int, int]] = []
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"t.": 1000}, **mesh) as publisher:
        publisher.publish("other", 0)  # (a store with a run, keeping nothing under "t.")
        with _t_subscriber(tmp_path, mesh, got, replay) as node:
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers("t.a", 1, timeout=10)
            time.sleep(2.5)  # (its first read done)
        for n in range(5):
            publisher.publish("t.a", n)
        time.sleep(1.5)  # (older than the seconds it replays)
        with _t_subscriber(tmp_path, mesh, got, replay) as node:
            gaps = _caught_up_then_one_live(publisher, node, got, 5)
    assert got == [("t.a", n, 0) for n in range(6)]
    assert gaps == 0


def _caught_up_then_one_live(publisher: zmqmesh.Node, node: zmqmesh.Node, got: list[Any], n: int) -> int:
    """``node`` got the ``n`` messages of "t.a" published while it was stopped, then "t.a"
    ``n`` comes live and is handled, and a moment more (nothing else comes): the gaps it counted."""
    wait_until(lambda: len(got) >= n, 20, "what was published while it was stopped")
    publisher.wait_for_peers(1)
    publisher.wait_for_subscribers("t.a", 1, timeout=10)
    publisher.publish("t.a", n)
    wait_until(lambda: len(got) >= n + 1, 20, f"t.a {n}")
    time.sleep(0.5)  # (nothing more)
    gaps: int = node.stats()["pubsub"].get("gap", 0)
    return gaps


def _lines_of(out: Path) -> list[str]:
    """The lines a subscriber process wrote to ``out`` so far."""
    return out.read_text().splitlines() if out.exists() else []


def _restarted_until_it_handles(tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess], out: Path,
                                replay: str | float, line_start: str) -> None:
    """The durable subscriber process (`worker`, its handler quick) started again until it
    handled the message whose line in ``out`` starts with ``line_start``, and a moment more
    (nothing else comes), then closed."""
    subscriber = worker("subscriber", tmp_path / "subscriber", mesh["mesh"], mesh["beacon_port"], out, 0.0, replay)
    procs.append(subscriber)
    wait_until(lambda: any(line.startswith(line_start) for line in _lines_of(out)), 30, f"{line_start}handled")
    time.sleep(0.5)  # (nothing more)
    subscriber.close()


@pytest.mark.timeout(90)
def test_a_durable_subscriber_killed_while_it_handles_its_first_message_of_a_topic_gets_nothing_older_again(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A durable subscription replaying 2 s (in its own process): "app.0" 0 to 9 are older
    than that, 10 and 11 are not. Its first read hands it 10, and it is killed while it
    handles it; restarted, it gets 10 and 11, marked ``redelivered``, and nothing of 0 to 9
    (never handed to it: older than it replays). Before, the place recorded before the
    burst was handled was the topic's start (no place yet: ``-1``), and the restart got 0 to
    9 too, marked ``redelivered`` (fails so at a6107c2). Now a
    topic with no place is placed just before the first number handed out of it
    (`DurablePlaces.before_handling`)."""
    out = tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]

    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"app.": 1000}, **mesh) as publisher:
        for n in range(10):
            publisher.publish("app.0", {"n": n})
        time.sleep(2.5)  # (older than the subscription replays)
        publisher.publish("app.0", {"n": 10})
        publisher.publish("app.0", {"n": 11})
        subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out, 30.0, 2.0)
        procs.append(subscriber)
        wait_until(lambda: len(_lines_of(out)) >= 1, 30, "10 being handled")
        subscriber.kill()
        _restarted_until_it_handles(tmp_path, mesh, procs, out, 2.0, "app.0 11 ")
    assert _lines_of(out) == ["app.0 10 0 0", "app.0 10 1 0", "app.0 11 1 0"]


@pytest.mark.timeout(90)
def test_a_durable_subscriber_killed_while_it_handles_a_live_message_before_a_read_went_through_gets_nothing_older(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, procs: list[ScriptProcess]) -> None:
    """A durable subscription's first start with ``replay="new"`` (in its own process):
    "app.0" 0 to 9 were published before it. Its first read of the history fails until it
    is given up; "app.1" 0 comes live, and it is killed while it handles it. Restarted, it
    gets "app.1" 0 again (marked ``redelivered``) and 1, nothing of "app.0". Before, the
    place written before that message was handled (position 0: `before_handling`) took the
    restarted cursor's reads below where it began mid-stream (the lowest of its places and
    that bound), and with no time to bound them ("new", its marker answered), "app.0" 0 to
    9 came, published before it subscribed."""
    failing = _failing_pages(monkeypatch)  # (the publisher's, in this process: the subscriber tries its own way)
    out = tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]

    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"app.": 1000}, **mesh) as publisher:
        for n in range(10):
            publisher.publish("app.0", {"n": n})
        subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out, 30.0, "new")
        procs.append(subscriber)
        publisher.wait_for_subscribers("app.1", 1, timeout=20)
        publisher.publish("app.1", {"n": 0})  # (held while the read fails, handed out once it is given up)
        wait_until(lambda: len(_lines_of(out)) >= 1, 30, "app.1 0 being handled")
        subscriber.kill()
        failing.clear()
        publisher.publish("app.1", {"n": 1})
        _restarted_until_it_handles(tmp_path, mesh, procs, out, "new", "app.1 1 ")
    assert _lines_of(out) == ["app.1 0 0 0", "app.1 0 1 0", "app.1 1 0 0"]


@pytest.mark.timeout(90)
def test_durable_subscriptions_whose_store_refused_where_they_began_record_it_once_the_store_takes_it(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """30 durable subscriptions replaying 2 s ("t.old" 0 to 9 older than that) made while
    their node's store is full (its own history of "f.", 1 KB messages, past
    ``store_max_bytes``): the records of where they began need pages the store has not, and
    are refused (``durable_record_failed``). Their first read fails until given up; the
    "f." messages expire, and "t.a" 0 comes live and is handled (places recorded: the
    store takes writes again). Restarted, each gets "t.old" 10 and "t.a" 1, published while
    it was stopped, nothing older than its seconds. Before, where a subscription began was
    written once, at its first start, and lost when refused: restarted with a place and no
    such record, those it was lost for read the history from its start: "t.old" 0 to 9."""
    failing = _failing_pages(monkeypatch)
    names = [f"{i:02d}" + "d" * 198 for i in range(30)]  # (long: their records take pages)
    got: dict[str, list[tuple[str, int, int]]] = {name: [] for name in names}
    sub_store = str(tmp_path / "subscriber")

    def subscribe(node: zmqmesh.Node) -> None:
        for name in names:
            node.subscribe("t.", lambda m, name=name: got[name].append((m.topic, m.data, m.gap)), replay=2.0,
                           durable_name=name)

    with _publisher_with_old_messages(tmp_path, mesh) as publisher:
        node = zmqmesh.Node("subscriber", store=sub_store, store_max_bytes=1 << 20,
                            history={"f.": {"max_messages": 1_000_000, "max_age_s": 5.0}}, **mesh)
        with node:
            full = lambda: node.stats()["pubsub"].get("history_failed", 0)  # noqa: E731
            for n in range(3000):  # (the store holds about half)
                node.publish("f.x", {"n": n, "pad": "x" * 1000})
                if n % 50 == 49:
                    wait_until(lambda: full() or inspect_store(sub_store)["topics"].get("f.x"), 10, "kept")
                    if full():
                        break
            kept = lambda: inspect_store(sub_store)["topics"].get("f.y", {}).get("next_seq", 0)  # noqa: E731
            for n in range(3000):  # (then one at a time, until one is refused: no page left)
                before, numbered = full(), kept()
                node.publish("f.y", {"n": n, "pad": "x" * 1000})
                wait_until(lambda b=before, k=numbered: full() > b or kept() > k, 10, "kept or refused")
                if full() > before:
                    break
            subscribe(node)
            _first_read_given_up(node, failing)
            assert node.stats()["pubsub"].get("durable_record_failed", 0) >= 1
            wait_until(lambda: not {"f.x", "f.y"} & inspect_store(sub_store)["topics"].keys(), 20,
                       "the f. messages expired")
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers("t.a", 1, timeout=10)
            refused = node.stats()["pubsub"].get("durable_record_failed", 0)
            publisher.publish("t.a", 0)
            wait_until(lambda: all(got.values()), 20, "t.a 0")
            node.stop()
            assert node.stats()["pubsub"].get("durable_record_failed", 0) == refused  # (the store took them)
        publisher.publish("t.old", 10)
        publisher.publish("t.a", 1)
        node = zmqmesh.Node("subscriber", store=sub_store, **mesh)
        subscribe(node)
        with node:
            wait_until(lambda: all(len(g) >= 3 for g in got.values()), 20, "what was published while it was stopped")
            time.sleep(0.5)  # (nothing more)
    wrong = {name[:2]: g for name, g in got.items() if sorted(g) != [("t.a", 0, 0), ("t.a", 1, 0), ("t.old", 10, 0)]}
    assert not wrong


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durable", [False, True])
def test_a_subscription_replaying_seconds_whose_first_read_failed_reads_nothing_older_later(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    """``replay=2``: "t.old" 0 to 9 are older than that; the subscription's first read of
    the history fails (its publisher's store fails every page, the read tried again and
    given up: ``replay_failed``), then "t.a" 0 comes live. "t.a" 1 to 4, published while the
    publisher was out of the mesh, and 5 live once it is back, make it read the history:
    it gets "t.a" 1 to 5, nothing of "t.old", no gap. Before, that read (and every one after
    the first) went without the first's time bound, from the start of the history: "t.old"
    0 to 9 came, older than the seconds asked."""
    failing = _failing_pages(monkeypatch)
    got: list[tuple[str, int, int]] = []
    history = {"t.": 1000}
    store = tmp_path / "publisher"
    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
        for n in range(10):
            publisher.publish("t.old", n)
        time.sleep(2.5)  # (older than the subscription replays)
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber") if durable else None, **mesh)
        subscriber.subscribe("t.", lambda m: got.append((m.topic, m.data, m.gap)), replay=2.0,
                             **({"durable_name": "d"} if durable else {}))
        with subscriber:
            _first_read_given_up(subscriber, failing)
            publisher.wait_for_peers(1)
            publisher.publish("t.a", 0)
            wait_until(lambda: len(got) >= 1, 20, "t.a 0")
            publisher.stop()
            gaps = _restarted_after(store, history, mesh, "t.a", range(1, 5), subscriber, got)
    assert got == [("t.a", n, 0) for n in range(6)]
    assert gaps == 0


def _failing_pages(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every publisher's `History.page` fail (a store's I/O error) while the event
    returned is set (it is at first), and a failed read be tried again once, 0.2 s later:
    a subscription's first read of a history is given up (``replay_failed``) soon."""
    import zmqmesh._patterns.replay.replays as replays

    monkeypatch.setattr(replays, "FETCH_RETRIES_S", (0.2,))
    failing = threading.Event()
    failing.set()
    real = zmqmesh._patterns.history.History.page

    def page(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if failing.is_set():
            raise zmqmesh.StoreError("disk I/O error (the test's)")
        served: dict[str, Any] = real(self, *args, **kwargs)
        return served

    monkeypatch.setattr(zmqmesh._patterns.history.History, "page", page)
    return failing


def _first_read_given_up(node: zmqmesh.Node, failing: threading.Event) -> None:
    """Wait until ``node``'s first read of a history was given up, then let pages be read."""
    wait_until(lambda: node.stats()["pubsub"].get("replay_failed"), 20, "the first read given up")
    failing.clear()


def _t_subscriber(tmp_path: Path, mesh: dict[str, Any], got: list[tuple[str, int, int]],
                  replay: str | float) -> zmqmesh.Node:
    """The durable subscription "d" of "t." on the store ``tmp_path / "subscriber"``,
    recording ``(topic, data, gap)`` in ``got``."""
    node = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
    node.subscribe("t.", lambda m: got.append((m.topic, m.data, m.gap)), replay=replay, durable_name="d")
    return node


def _handles_live_after_its_first_read_failed(publisher: zmqmesh.Node, node: zmqmesh.Node, failing: threading.Event,
                                             got: list[Any]) -> None:
    """``node``'s first read of ``publisher``'s history given up, "t.a" 0 comes live and is handled."""
    _first_read_given_up(node, failing)
    publisher.wait_for_peers(1)
    publisher.wait_for_subscribers("t.a", 1, timeout=10)
    publisher.publish("t.a", 0)
    wait_until(lambda: len(got) >= 1, 20, "t.a 0")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replay", ["new", 2.0])
def test_a_durable_subscription_restarted_before_its_first_read_went_through_resumes_from_where_it_began(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, replay: str | float) -> None:
    """A durable subscription's first start mid-stream (``replay="new"``, or 2 s: "t.old"
    0 to 9 published before it, or older than its seconds): its first read of the history
    fails until it is given up, then "t.a" 0 comes live and is handled. Stopped, "t.old" 10
    and "t.a" 1 are published; restarted, it gets those two, no gap, nothing older. Before,
    it had recorded where it began in no topic it had not met: restarted, it read the
    history from the start (2 s: "t.old" 0 to 9 came, older than its seconds) or from
    where it began ("new": "t.old" 10 came with ``msg.gap`` 10, messages published before
    it subscribed). Now it records that it began mid-stream, and where, until a read goes
    through, and a restart resumes mid-stream from there."""
    failing = _failing_pages(monkeypatch)
    got: list[tuple[str, int, int]] = []

    with _publisher_with_old_messages(tmp_path, mesh) as publisher:
        with _t_subscriber(tmp_path, mesh, got, replay) as node:
            _handles_live_after_its_first_read_failed(publisher, node, failing, got)
        publisher.publish("t.old", 10)
        publisher.publish("t.a", 1)
        with _t_subscriber(tmp_path, mesh, got, replay) as node:
            wait_until(lambda: len(got) >= 3, 20, "what was published while it was stopped")
            time.sleep(0.5)  # (nothing more)
            gaps = node.stats()["pubsub"].get("gap", 0)
    assert got == [("t.a", 0, 0), ("t.old", 10, 0), ("t.a", 1, 0)]
    assert gaps == 0


@pytest.mark.timeout(90)
def test_a_durable_name_taken_again_with_replay_all_before_a_read_went_through_gets_every_topic_from_its_start(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A durable subscription's first start with ``replay="new"`` ("t.old" 0 to 9 published
    before it): its first read fails until given up, and "t.a" 0 comes live and is handled.
    Stopped, "t.old" 10 is published; the name taken again with ``replay="all"`` follows
    every topic from its start: it gets "t.old" 0 to 10, no gap. Before, it read the history
    from its place in "t.a" (where the first start began, after "t.old" 0 to 9), and "t.old"
    10 came with ``msg.gap`` 10: messages the history still holds counted missed."""
    failing = _failing_pages(monkeypatch)
    got: list[tuple[str, int, int]] = []

    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"t.": 1000}, **mesh) as publisher:
        for n in range(10):
            publisher.publish("t.old", n)
        with _t_subscriber(tmp_path, mesh, got, "new") as node:
            _handles_live_after_its_first_read_failed(publisher, node, failing, got)
        publisher.publish("t.old", 10)
        with _t_subscriber(tmp_path, mesh, got, "all") as node:
            wait_until(lambda: ("t.old", 10, 0) in got or ("t.old", 10, 10) in got, 20, "t.old 10")
            time.sleep(0.5)  # (nothing more)
            gaps = node.stats()["pubsub"].get("gap", 0)
    assert got == [("t.a", 0, 0), *[("t.old", n, 0) for n in range(11)]]
    assert gaps == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replay", ["new", 2.0])
def test_a_durable_subscription_stopped_before_its_first_read_went_through_gets_what_was_published_meanwhile(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, replay: str | float) -> None:
    """A durable subscription's first start mid-stream ("t.old" 0 to 9 published before it,
    or older than its seconds), its first read given up, nothing handled. Stopped, "t.a" 0
    to 2 are published (older than its seconds once it is back); restarted, it gets them,
    then 3 live, no gap, nothing of "t.old". Before, it had no record of the stream (no
    place, and its run was recorded only once a read went through): restarted, it began
    again as ``replay`` says, and "t.a" 0 to 2 were lost, unreported (fails so at
    e832448: timed out waiting for them)."""
    failing = _failing_pages(monkeypatch)
    got: list[tuple[str, int, int]] = []

    with _publisher_with_old_messages(tmp_path, mesh) as publisher:
        with _t_subscriber(tmp_path, mesh, got, replay) as node:
            _first_read_given_up(node, failing)
        for n in range(3):
            publisher.publish("t.a", n)
        time.sleep(2.5)  # (older than the seconds it replays, once it is back)
        with _t_subscriber(tmp_path, mesh, got, replay) as node:
            gaps = _caught_up_then_one_live(publisher, node, got, 3)
    assert got == [("t.a", n, 0) for n in range(4)]
    assert gaps == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replay", ["new", 2.0])
def test_a_durable_subscription_restarted_before_its_first_read_went_through_sees_its_publisher_put_back(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, replay: str | float) -> None:
    """A durable subscription's first start mid-stream, its first read given up: it handles
    "t.a" 0 to 2 live. Stopped, its publisher's store is put back from a copy taken before
    them, which numbers "t.a" 10 to 14 from 0 again; restarted, the subscription sees the
    publisher's run it followed missing (``rewound``), reads the history again, and gets
    every new message, those numbered up to 2 marked ``redelivered``. Before, a cursor that
    began mid-stream recorded its publisher's run only once a read went through: restarted,
    it had none to miss, and took "t.a" 10 to 12 for 0 to 2, handled (never delivered)."""
    failing = _failing_pages(monkeypatch)
    store, copy = tmp_path / "publisher", tmp_path / "copy"
    history = {"t.": 1000}
    got: list[tuple[str, int, bool]] = []

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
        node.subscribe("t.", lambda m: got.append((m.topic, m.data, m.redelivered)), replay=replay,
                       durable_name="d")
        return node

    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh):
        pass  # (a run, nothing kept)
    shutil.copytree(store, copy)  # (the publisher stopped: a consistent copy)
    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh) as publisher:
        with subscriber() as node:
            _first_read_given_up(node, failing)
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers("t.a", 1, timeout=10)
            for n in range(3):
                publisher.publish("t.a", n)
            wait_until(lambda: len(got) >= 3, 20, "t.a 0 to 2")
    shutil.rmtree(store)
    copy.rename(store)  # the store put back from the copy: "t.a" numbered from 0 again
    _published_out_of_the_mesh(store, history, mesh, "t.a", range(10, 15))
    with zmqmesh.Node("publisher", store=str(store), history=history, **mesh):
        with subscriber() as node:
            wait_until(lambda: len(got) >= 8, 20, "t.a 10 to 14")
            time.sleep(0.5)  # (nothing more)
            stats = node.stats()["pubsub"]
    assert got == [*(("t.a", n, False) for n in range(3)), *(("t.a", n, n <= 12) for n in range(10, 15))]
    assert stats.get("rewound") == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replay", ["new", 2.0])
def test_a_durable_subscription_of_a_store_an_older_zmqmesh_wrote_gets_nothing_older_than_it_replays(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, replay: str | float) -> None:
    """A subscriber store as the previous version left it (schema 6) after a durable
    subscription's first start mid-stream whose first read never went through: it recorded
    the publisher's run at the start (before any read), and no place. Restarted on this
    version, the subscription gets nothing published before it began ("t.old" 0 to 9,
    published before it, or older than its seconds), and "t.a" 0 live. Before, a stream
    with a run recorded was taken for one read through (`DurablePlaces.known`), resumed
    from the start of the history: "t.old" 0 to 9 came. The upgrade reads such a run with
    no place as the previous version did: no record of the stream, a first start again."""
    failing = _failing_pages(monkeypatch)
    publisher_store, subscriber_store = tmp_path / "publisher", tmp_path / "subscriber"
    got: list[tuple[str, int, int]] = []

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=str(subscriber_store), **mesh)
        node.subscribe("t.", lambda m: got.append((m.topic, m.data, m.gap)), replay=replay, durable_name="d")
        return node

    with zmqmesh.Node("publisher", store=str(publisher_store), history={"t.": 1000}, **mesh) as publisher:
        for n in range(10):
            publisher.publish("t.old", n)
        time.sleep(2.5)  # (older than the seconds it replays)
        with subscriber() as node:
            _first_read_given_up(node, failing)
        run = str(read_only(publisher_store, "SELECT value FROM meta WHERE key = 'runs'")[0][0]).split(",")[0]
        with contextlib.closing(sqlite3.connect(subscriber_store / "zmqmesh.db")) as db, db:  # as 6 left it
            db.execute("DROP TABLE IF EXISTS cursor_began")
            db.execute("DELETE FROM cursors")
            db.execute("DELETE FROM cursor_runs")
            db.execute("INSERT INTO cursor_runs VALUES ('d', ?, ?)", (stream_of(publisher_store), run))
            db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
        with subscriber() as node:
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers("t.a", 1, timeout=10)
            time.sleep(1.0)  # (its first read done)
            publisher.publish("t.a", 0)
            wait_until(lambda: len(got) >= 1, 20, "t.a 0")
            time.sleep(0.5)  # (nothing more)
    assert got == [("t.a", 0, 0)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durable", [False, True])
def test_a_subscriber_forgets_the_topics_its_publisher_forgot_and_gets_every_message_once(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    """A topic per order id: the publisher forgets the numbering of those that expired, and
    a replaying subscriber, which kept a place in every topic it met for good (in memory,
    and a row in its store if durable), forgets them too (`CURSOR_TOPICS`), each message
    still delivered once, in order, with no gap. A topic forgotten on both sides and
    published again is a new one (not renumbered); a durable subscriber restarted after
    forgetting takes nothing again, and goes on."""
    import zmqmesh._patterns.history
    from zmqmesh._patterns.replay import cursor

    monkeypatch.setattr(zmqmesh._patterns.history, "MAX_EMPTY_TOPICS", 0)  # (every one emptied: forgotten)
    monkeypatch.setattr(cursor, "CURSOR_TOPICS", 50)
    history = {"orders.": {"max_messages": 100, "max_age_s": 0.3}}
    got: list[tuple[str, int, int, bool]] = []
    options: dict[str, Any] = {"durable_name": "audit"} if durable else {}
    store = tmp_path / "subscriber"

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("subscriber", store=str(store) if durable else None, **mesh)
        node.subscribe("orders.", lambda m: got.append((m.topic, m.data["n"], m.gap, m.redelivered)),
                       replay="all", **options)
        return node

    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history=history, **mesh) as publisher:
        with subscriber() as sub:
            publisher.wait_for_peers(1)
            for i in range(600):  # (headers: a new topic says where it begins, live)
                publisher.publish(f"orders.{i}", {"n": i}, headers={"order": str(i)})
                if i % 100 == 99:
                    time.sleep(0.4)  # (expired meanwhile, and forgotten at the next expiry)
            wait_until(lambda: len(got) == 600, 20, "the orders")
            wait_until(lambda: publisher.stats()["pubsub"].get("history_topics_forgotten", 0) == 600, 20,
                       "the publisher forgetting them")
            # (but, durable, the one that holds its place in the stream: the highest position)
            wait_until(lambda: sub.stats()["pubsub"].get("cursor_topics_forgotten", 0) == 600 - durable, 20,
                       "the subscriber forgetting them (once its publisher is quiet)")
            publisher.publish("orders.3", {"n": 600}, headers={"order": "3"})  # forgotten on both sides
            wait_until(lambda: len(got) == 601, 20, "the order published again")
            stats = sub.stats()["pubsub"]
        if durable:
            assert inspect_store(store)["subscriptions"]["audit"] == 2, "its places in forgotten topics gone too"
            with subscriber() as sub:  # restarted: nothing again
                time.sleep(1.5)
                publisher.publish("orders.new", {"n": 601}, headers={"order": "new"})
                wait_until(lambda: len(got) >= 602, 20, "a new order")
                time.sleep(0.5)
    assert stats.get("gap", 0) == 0 and stats.get("renumbered", 0) == 0
    assert got == [(f"orders.{i}", i, 0, False) for i in range(600)] + [("orders.3", 600, 0, False)] + (
        [("orders.new", 601, 0, False)] if durable else []), "each once, in order"


def test_a_durable_subscriber_process_resumes_a_publisher_process_restored_from_a_copy(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """The restored-copy case with real processes: a publisher stopped, its store copied,
    then run again (300 more); the subscriber, killed, resumes after the publisher came
    back on the copy and published 300 new messages under the numbers of the second run.
    It gets them (before: none, skipped as handled), marked redelivered."""
    out, store = tmp_path / "out", tmp_path / "publisher"
    port, name = mesh["beacon_port"], mesh["mesh"]

    def publisher_run() -> ScriptProcess:
        proc = worker("publisher", store, name, port, 300, 100_000)
        procs.append(proc)
        proc.wait_for("published")
        return proc

    def lines() -> list[list[str]]:
        return [line.split() for line in out.read_text().splitlines()] if out.exists() else []

    publisher_run().close()
    shutil.copytree(store, tmp_path / "copy")  # (stopped: a consistent copy)
    subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out)
    procs.append(subscriber)
    subscriber.wait_for("ready")
    second = worker("publisher", store, name, port, 300, 100_000)
    procs.append(second)
    second.wait_for("published")
    wait_until(lambda: len(lines()) >= 600, 30, "the first run replayed, the second live")
    second.close()
    subscriber.kill()
    assert len(lines()) == 600 and all(r == "0" and g == "0" for _t, _n, r, g in lines())
    shutil.rmtree(store)
    (tmp_path / "copy").rename(store)
    publisher_run()  # numbered as the second run was: 100 .. 199 per topic
    subscriber = worker("subscriber", tmp_path / "subscriber", name, port, out)
    procs.append(subscriber)
    wait_until(lambda: len(lines()) >= 1200, 30, "both runs of the copy read again")
    third = lines()[600:]
    assert [int(n) for _t, n, _r, _g in third] == [*range(300), *range(300)], "each run once, in order"
    assert all(r == "1" and g == "0" for _t, _n, r, g in third), "marked: the numbers were handled before"


def test_a_subscriber_frozen_past_peer_timeout_gets_its_publishers_messages_in_order_and_counts_the_drops(
        tmp_path: Path, mesh: dict[str, Any], spawn: Any) -> None:
    """A subscriber stopped (SIGSTOP) for longer than ``peer_timeout_s`` while its publisher
    publishes fast is taken for gone and connected again: the frames the first connection
    still held then arrive interleaved with those of the new one. The late ones go: what it
    handles of a topic stays in order, and the drops counted (``pubsub.dropped``) are the messages it
    did not get (before, the late ones were handled out of order, and every turn between
    the two connections counted the whole jump again: 88 million drops for 85,000). Also
    once the publisher is gone (its goodbye at the end) while the old connection still
    delivers: those were handled out of order (1 run in 4 of the suite)."""
    published = 0
    with zmqmesh.Node("publisher", store=str(tmp_path), history={"app.": 100_000}, **mesh) as publisher:
        frozen = spawn("frozen", subscribe=["app."])
        publisher.wait_for_peers(1)
        publisher.wait_for_subscribers("app.", 1)
        frozen.signal(signal.SIGSTOP)
        deadline = time.monotonic() + 2.5 * mesh["peer_timeout_s"]
        while time.monotonic() < deadline:  # (taken for gone meanwhile: its connection is made again)
            for _ in range(500):
                publisher.publish(f"app.{published % 3}", {"n": published, "pad": "x" * 200})
                published += 1
            time.sleep(0.005)
        wait_until(lambda: publisher.stats()["membership"].get("left", 0) >= 1, 10,
                   "the frozen subscriber taken for gone")  # (the case under test, not only a while for it)
        frozen.signal(signal.SIGCONT)
        publisher.wait_for_peers(1, timeout=15)
        counted = lambda: sum(publisher.stats()["pubsub"].get(k, 0) for k in ("sent", "unrouted"))  # noqa: E731
        wait_until(lambda: counted() >= published, 15, "the publications sent")
        last = published + 2000
        while published < last:  # (on the new connection, while the old one still delivers)
            publisher.publish(f"app.{published % 3}", {"n": published, "pad": "x" * 200})
            published += 1
            if published % 200 == 0:
                time.sleep(0.01)
        wait_until(lambda: frozen.with_prefix(f'SUB app.{(last - 1) % 3} {{"n":{last - 1},'), 30,
                   "the last publication", every=0.2)
        dropped = publisher.node_stats(frozen.id)["pubsub"]["dropped"]

    def quiet() -> bool:  # (nothing printed for half a second)
        count = len(frozen.lines)
        time.sleep(0.5)
        return len(frozen.lines) == count

    # the publisher's goodbye may come while its old connection still delivers: what the
    # subscriber handles after it is read too, not only what it handled up to the last publication
    frozen.wait_line("LEAVE publisher", 15)
    wait_until(quiet, 15, "the subscriber done with what it holds")
    got: dict[str, list[int]] = {}
    for line in frozen.with_prefix("SUB "):
        _sub, topic, data = line.split(" ", 2)
        got.setdefault(topic, []).append(json.loads(data)["n"])
    for topic, numbers in got.items():
        assert numbers == sorted(numbers), f"{topic} handled out of order"
    missed = published - sum(map(len, got.values()))
    assert dropped == missed, f"{dropped} drops counted, {missed} missed"


def test_a_history_whose_store_is_full_sends_nothing_it_could_not_keep_and_counts_it(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """`publish` returns once queued: a kept frame the full store refuses raises nothing
    there; it is sent to no subscriber, none of them sees a gap for it (its numbers go to
    the next frame kept), and the publisher counts it (``pubsub.history_failed``), as
    docs/durability.md says (it said `publish` raised `StoreFullError`)."""
    got: list[tuple[int, int | None, int]] = []
    publisher = zmqmesh.Node("publisher", store=str(tmp_path), store_max_bytes=1 << 20,
                             history={"logs.": 1_000_000}, **mesh)
    with publisher:
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("logs.", lambda m: got.append((m.data["n"], m.sequence, m.gap)), replay="all")
        with subscriber:
            publisher.wait_for_peers(1)
            publisher.wait_for_subscribers("logs.", 1)
            failed = lambda: publisher.stats()["pubsub"].get("history_failed", 0)  # noqa: E731
            for n in range(2000):  # 2 MB of 1 KB messages: the store holds about half
                publisher.publish("logs.a", {"n": n, "pad": "x" * 1000})
                if n % 50 == 49:  # (a commit too large for the room left would be refused whole)
                    wait_until(lambda n=n: len(got) + failed() > n, 10, "the messages sent or refused")
            wait_until(lambda: len(got) + failed() == 2000, 20, "every message sent or refused")
    numbers = [n for n, _seq, _gap in got]
    assert numbers == sorted(numbers) and 0 < len(numbers) < 2000
    assert [seq for _n, seq, _gap in got] == list(range(len(got)))  # numbered without a hole
    assert not any(gap for _n, _seq, gap in got)


@pytest.mark.timeout(60)
def test_a_subscriber_with_a_smaller_max_message_bytes_than_a_page_replays(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A page of history holds no more than its reader takes in one message: a subscriber
    whose ``max_message_bytes`` (256 KiB) is below the publisher's page size (1 MiB)
    replays a history of 20 KB messages. (Before, the 1 MiB page ended the subscriber's
    connection, again at every try: nothing was replayed.)"""
    got: list[int] = []
    with zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 1000}, **mesh) as publisher:
        for i in range(100):
            publisher.publish("logs.a", {"n": i, "pad": b"x" * 20_000})
        wait_until(lambda: inspect_store(tmp_path)["topics"].get("logs.a", {}).get("messages") == 100, 10,
                   "the history kept")
        subscriber = zmqmesh.Node("subscriber", max_message_bytes=256 * 1024, **mesh)
        subscriber.subscribe("logs.", lambda m: got.append(m.data["n"]), replay="all")
        with subscriber:
            wait_until(lambda: len(got) >= 100, 20, "the replay")
            assert subscriber.stats()["rejected"].get("request_link_dropped", 0) == 0
    assert got == list(range(100))


@pytest.mark.timeout(60)
def test_a_history_request_with_a_position_past_64_bits_is_malformed_not_a_store_error(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A stranger's request for a page after a position SQLite cannot hold is answered
    ``0x03`` and counted as malformed, as a request of wrong types is. (Before, the store's
    read failed: each such request logged an error and was answered ``0x01`` StoreError.)"""
    import msgpack
    import zmq

    with zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 1000}, **mesh) as publisher:
        publisher.publish("logs.a", {"n": 0})
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger, sock.rcvtimeo = 0, 5000
        try:
            sock.connect(publisher.endpoints["service"])
            statuses = []
            for request in ({"p": "logs.", "a": (1 << 64) - 1}, {"p": "logs.", "a": 0, "s": (1 << 64) - 1},
                            {"p": "logs.", "a": 0, "b": 0},
                            {"p": "logs.", "a": 0, "b": 1, "t": ""}):  # (without "t": `next` whole, too large)
                sock.send_multipart([b"\x00history", b"r", msgpack.packb(request)])
                statuses.append(sock.recv_multipart()[1])
        finally:
            sock.close()
            ctx.term()
        assert statuses == [b"\x03", b"\x03", b"\x03", b"\x00"], "a budget of 1 byte still gets a row"
        assert publisher.stats()["rejected"].get("history_malformed") == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.timeout(60)
def test_frames_of_a_sender_no_hello_names_wait_for_it_in_bounded_memory(mesh: dict[str, Any]) -> None:
    """A stranger's PUB sends 1 MB frames under a sender id no HELLO names to a node with a
    replaying subscription: its frames wait for that HELLO up to `UNKNOWN_MAX_BYTES` in all,
    and past it go at once. (Before, only their count was bounded, 100,000 frames: the node
    grew by 2.2 GiB in 4 s.)"""
    import msgpack
    import zmq

    handled = [0]
    # (a subscribing socket reads ahead by recv_hwm frames while its node is busy: 10,000
    # of these by default, which on a loaded machine would measure that, not the wait)
    node = zmqmesh.Node("victim", **{**mesh, "recv_hwm": 16})
    node.subscribe("logs.", lambda m: handled.__setitem__(0, handled[0] + 1), replay="all")
    with node:
        ctx = zmq.Context()
        pub = ctx.socket(zmq.XPUB)
        pub.linger, pub.sndhwm, pub.rcvtimeo = 0, 100, 10_000
        try:
            pub.connect(node.endpoints["sub"])
            assert pub.recv() == b"\x01logs.", "the node's subscription, seen by the stranger"
            body, sender = msgpack.packb(["x" * 1_000_000]), uuid.uuid4().bytes
            before = peak = rss_bytes()
            deadline, seq = time.monotonic() + 2.0, 0
            while time.monotonic() < deadline:
                pub.send_multipart([b"logs.a", sender + seq.to_bytes(8, "big"), body], copy=False)
                seq += 1
                if seq % 50 == 0:
                    peak = max(peak, rss_bytes())
        finally:
            pub.close()
            ctx.term()
        assert peak - before < 400 << 20, f"the node grew by {(peak - before) >> 20} MiB"
        wait_until(lambda: handled[0] > 0, 10, "the frames, delivered plainly")


@pytest.mark.timeout(90)
def test_a_catching_up_subscription_holds_live_frames_in_bounded_bytes(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """While its first page of history is slow to come, a replaying subscription holds the
    live frames that come meanwhile, up to `MAX_HELD_BYTES`: past it, they come from the
    history, every one in order, none missed. (Before, only their count was bounded,
    100,000 messages: 80 messages of 1 MB were all held.)"""
    from zmqmesh._patterns.replay import cursor

    monkeypatch.setattr(cursor, "MAX_HELD_BYTES", 16 << 20)  # (80 MB: past it)
    real_page, slow = zmqmesh._patterns.history.History.page, threading.Event()

    def slow_page(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not slow.is_set():
            slow.set()
            time.sleep(3)
        return real_page(self, *args, **kwargs)

    monkeypatch.setattr(zmqmesh._patterns.history.History, "page", slow_page)
    got: list[int] = []
    caplog.set_level(logging.INFO, logger="zmqmesh.replay")
    with zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 1000}, **mesh) as publisher:
        publisher.publish("logs.a", {"n": 0})
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("logs.", lambda m: got.append(m.data["n"]), replay="all")
        with subscriber:
            wait_until(slow.is_set, 10, "the first page asked for")
            publisher.wait_for_subscribers("logs.a", 1, timeout=10)
            for i in range(1, 81):
                publisher.publish("logs.a", {"n": i, "pad": b"x" * 1_000_000})
            wait_until(lambda: len(got) >= 81, 60, "every message")
            assert subscriber.stats()["pubsub"].get("gap", 0) == 0
    assert got == list(range(81))
    assert any("will come from the history" in r.getMessage() for r in caplog.records), "held past the bound"


@pytest.mark.timeout(90)
def test_a_publisher_of_more_kept_topics_than_a_message_numbers_is_replayed_to_the_end(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A topic per order id, kept by ``max_messages`` alone (so never emptied): the numbers
    its 3,000 topics reached (``"next"``) outweigh what a subscriber with a 64 KiB
    ``max_message_bytes`` takes in one message. They come in pieces: every message is
    replayed once, with no gap, and the look at the numbers a quiet publisher is asked
    (``"n": 0``) succeeds too. (Before, the last page was too large: 1,328 of 30,000
    messages never came with 1 MiB on both sides, and every look failed.)"""
    from zmqmesh._patterns.replay import replays

    monkeypatch.setattr(replays, "QUIET_LOOK_S", 0.5)
    looks: list[dict[str, Any]] = []  # the pages of no rows served (the looks at the numbers)
    page = zmqmesh._patterns.history.History.page

    def recorded(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        served: dict[str, Any] = page(self, *args, **kwargs)
        if args[4:5] == (0,) or kwargs.get("max_rows") == 0:
            looks.append(served)
        return served

    monkeypatch.setattr(zmqmesh._patterns.history.History, "page", recorded)
    topics = [f"orders.{uuid.uuid4()}" for _ in range(3000)]
    got: list[tuple[str, int, int]] = []
    with zmqmesh.Node("publisher", store=str(tmp_path), history={"orders.": 10}, **mesh) as publisher:
        for n, topic in enumerate(topics):
            publisher.publish(topic, {"n": n})
        wait_until(lambda: inspect_store(tmp_path)["topics"].get(topics[-1], {}).get("messages") == 1, 20,
                   "the history kept")
        subscriber = zmqmesh.Node("subscriber", max_message_bytes=64 * 1024, **mesh)
        subscriber.subscribe("orders.", lambda m: got.append((m.topic, m.data["n"], m.gap)), replay="all")
        with subscriber:
            wait_until(lambda: len(got) >= 3000, 30, "the replay")
            publisher.wait_for_peers(1)
            publisher.publish(topics[0], {"n": 3000})  # (live: the publisher is looked at once quiet)
            wait_until(lambda: len(got) >= 3001, 20, "the live message")
            wait_until(lambda: any(look["next"] and "next_from" not in look for look in looks), 20,
                       "a whole look at the numbers, in pieces")
            time.sleep(0.5)  # (the look applied: a failure, or a gap, would show meanwhile)
            # topics of the first piece and of the last: a look applied by halves would have
            # forgotten the one or the other, and its next message would not come as the next
            first, last = min(topics), max(topics)
            publisher.publish(first, {"n": 3001})
            publisher.publish(last, {"n": 3002})
            wait_until(lambda: len(got) >= 3003, 20, "the live messages after the look")
            time.sleep(0.3)  # (a duplicate or a replay of what was forgotten would show meanwhile)
            stats = subscriber.stats()
    live = [(topics[0], 3000, 0), (first, 3001, 0), (last, 3002, 0)]
    assert got == [(t, n, 0) for n, t in enumerate(topics)] + live, "each once, in order, no gap"
    assert stats["pubsub"].get("replay_failed", 0) == 0 and stats["pubsub"].get("gap", 0) == 0
    assert stats["rejected"].get("request_link_dropped", 0) == 0
    assert max(len(look["next"]) for look in looks) < 3000, "the numbers came in pieces"


@contextlib.contextmanager
def _keeper_of_topics(tmp_path: Path, mesh: dict[str, Any], count: int) -> Iterator[tuple[zmqmesh.Node, Any]]:
    """A publisher that keeps a message of each of ``count`` topics ``logs.NNNN``, and a raw
    DEALER connected to its service endpoint, a reader of its history by hand (closed after)."""
    import zmq

    with zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 10}, **mesh) as publisher:
        for i in range(count):
            publisher.publish(f"logs.{i:04d}", {"n": i})
        last = f"logs.{count - 1:04d}"
        wait_until(lambda: inspect_store(tmp_path)["topics"].get(last, {}).get("messages") == 1, 10, "the history kept")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger, sock.rcvtimeo = 0, 5000
        try:
            sock.connect(publisher.endpoints["service"])
            yield publisher, sock
        finally:
            sock.close()
            ctx.term()


@pytest.mark.timeout(60)
def test_a_page_too_large_for_a_reader_that_takes_next_whole_is_refused_and_counted(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A reader before pieces (no ``"t"``) that takes less than the numbers of every kept
    topic is answered ``0x01`` and counted (``history_page_too_large``), logged once: sent,
    the page ended its connection, again at every try. One that asks for pieces gets them."""
    import msgpack

    with _keeper_of_topics(tmp_path, mesh, 500) as (publisher, sock):
        replies = []
        for request in ({"p": "logs.", "a": 0, "n": 0, "b": 2048}, {"p": "logs.", "a": 1 << 40, "b": 2048},
                        {"p": "logs.", "a": 0, "n": 0, "b": 2048, "t": ""}):
            sock.send_multipart([b"\x00history", b"r", msgpack.packb(request)])
            replies.append(sock.recv_multipart()[1:])
        assert [status for status, _body in replies] == [b"\x01", b"\x01", b"\x00"]
        assert "MessageTooLargeError" in msgpack.unpackb(replies[0][1])["type"]
        piece = msgpack.unpackb(replies[2][1])
        assert len(replies[2][1]) <= 4096 and 0 < len(piece["next"]) < 500 and piece["next_from"] > "logs.0000"
        assert publisher.stats()["pubsub"].get("history_page_too_large") == 2
    assert len([r for r in caplog.records if "too large for its reader" in r.getMessage()]) == 1


def test_frames_that_waited_for_their_senders_hello_keep_their_size() -> None:
    """A frame released once its sender's HELLO came goes on with the bytes it came in, so
    that a catching-up cursor counts them against `MAX_HELD_BYTES` (sans-I/O). (Before, it
    went on as 0 bytes: up to `UNKNOWN_MAX_BYTES` of held frames went uncounted.)"""
    from types import SimpleNamespace

    from zmqmesh._patterns.replay import Replays
    from zmqmesh._patterns.replay.awaiting import AwaitingHello

    replays = Replays.__new__(Replays)
    replays.awaiting, replays.cursors = AwaitingHello(), {}
    replays._stream_left = lambda sender_id: None  # type: ignore[method-assign]  # (a sender no cursor follows)
    replays.directory = SimpleNamespace(alive_ids=frozenset(), epoch=0)  # type: ignore[assignment]
    replays.live("logs.a", 0, [1], None, "sender", [], [], None, size=123)
    assert replays.awaiting.bytes == 123 and "sender" in replays.awaiting
    went: list[int] = []
    replays.live = lambda *args, **kwargs: went.append(kwargs.get("size", 0))  # type: ignore[method-assign]
    replays.directory = SimpleNamespace(alive_ids=frozenset({"sender"}))  # type: ignore[assignment]
    replays.release_unknown([])
    assert went == [123] and replays.awaiting.bytes == 0 and not replays.awaiting


@pytest.mark.timeout(60)
def test_a_reader_before_pieces_still_gets_every_row_when_the_numbers_are_too_large(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A reader before pieces (no ``"t"``) whose last page would hold the numbers of more
    kept topics than it takes gets the rows of that page without them (``"more"``); only
    the numbers, asked for again from its last row, are refused (``0x01``). (Refused with
    them, the rows of the last page never came: 1,328 of 30,000 messages, with no gap.)"""
    import msgpack

    with _keeper_of_topics(tmp_path, mesh, 500) as (publisher, sock):
        topics: list[str] = []
        after, status = 0, b"\x00"
        for _ in range(1000):
            sock.send_multipart([b"\x00history", b"r", msgpack.packb({"p": "logs.", "a": after, "b": 2048})])
            status, body = sock.recv_multipart()[1:]
            if status != b"\x00":
                break
            page = msgpack.unpackb(body)
            assert len(body) <= 2 * 2048
            topics.extend(row[1] for row in page["rows"])
            after = page["rows"][-1][0] if page["rows"] else after
            if not page["more"]:
                break
        assert status == b"\x01", "the whole of next is still too large"
        assert topics == [f"logs.{i:04d}" for i in range(500)], "every row, once, in order"
        assert publisher.stats()["pubsub"].get("history_page_too_large") == 1


def test_the_pieces_of_next_are_kept_until_the_page_that_completes_them_is_taken() -> None:
    """`Cursor.map_piece` hands out the whole of ``next`` without letting its pieces go:
    a page that completes them but is malformed further on (its ``"start"``) is asked for
    again, and then the pieces read before are still there (sans-I/O). (Before, they were
    let go at once, and the page asked again completed only its own piece: a look at the
    numbers would have forgotten the topics of the pieces before.)"""
    from zmqmesh._mesh.registry import SubscribeOptions
    from zmqmesh._patterns.replay import Cursor

    cursor = Cursor("stream", "node", SubscribeOptions(), True)
    first = {"p": "logs.", "a": 0, "n": 0, "t": ""}
    assert cursor.map_piece(first, {"rows": [], "more": False, "next": {"logs.a": 3}, "next_from": "logs.b"}) is None
    last = {"p": "logs.", "a": 0, "n": 0, "t": "logs.b"}
    page = {"rows": [], "more": False, "next": {"logs.b": 5}}
    assert cursor.map_piece(last, page) == {"logs.a": 3, "logs.b": 5}
    assert cursor.map_piece(last, page) == {"logs.a": 3, "logs.b": 5}, "asked again: still whole"


@pytest.mark.parametrize("damage", ["UPDATE cursors SET seq = 'abc' WHERE topic = 'logs.a'",
                                    "UPDATE cursors SET upto = x'00', pos = 1.5 WHERE topic = 'logs.a'",
                                    "UPDATE cursors SET topic = x'00' WHERE topic = 'logs.a'",
                                    "UPDATE cursors SET topic = CAST(x'ff6c6f6773' AS TEXT) WHERE topic = 'logs.a'",
                                    "UPDATE cursors SET stream = x'00' WHERE topic = 'logs.a'",
                                    "UPDATE cursors SET stream = CAST(x'ff00' AS TEXT) WHERE topic = 'logs.a'"])
def test_a_durable_subscription_whose_stored_place_is_damaged_replays_it_and_says_so(
        tmp_path: Path, mesh: dict[str, Any], damage: str) -> None:
    """A row of a durable subscription's place whose values are of the wrong type (damage on
    disk that SQLite's check does not see) stopped the subscription for good: 'following the
    publishers' histories failed' (a TypeError) on every frame, and 0 of the 60 messages
    published since were delivered. Such a row is now reported (logged, counted in
    ``rejected["store_damaged"]``) and taken as no place at all: that topic is read again
    from the start of the history; the others resume where they were. A row whose topic
    (or stream) cannot be read is so too, for the topics of its stream (of every stream)
    that have no other row: before, it was left out and the stream resumed from the place
    of its other topics, where logs.a's first message reported a false gap of 10 (its
    earlier messages were still kept); and a topic of text that is no UTF-8 made the load
    fail, and nothing more was delivered (0 of 60)."""
    with _reader_back_after_damage(tmp_path, mesh, damage) as (_publisher, node, got):
        wait_until(lambda: {n for _t, n, _r in got} >= set(range(0, 80, 2)) | set(range(21, 80, 2)), 20,
                   "the 60 published since, and logs.a read again")
        stats = node.stats()
    assert stats["rejected"].get("store_damaged", 0) == 1
    assert stats["pubsub"].get("gap", 0) == 0, "no message was missed"
    assert [n for t, n, _r in got if t == "logs.b"] == list(range(21, 80, 2)), "logs.b resumes where it was"
    assert [n for t, n, _r in got if t == "logs.a"] == list(range(0, 80, 2)), "logs.a read again whole"


def test_a_durable_subscription_whose_one_place_in_a_stream_names_no_topic_reads_it_again(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A stream whose only stored place names a topic that cannot be read (a single-topic
    publisher): the stream is not new to the durable subscription, whatever its ``replay``
    says. Before, it was followed afresh as ``replay="new"`` says: the 40 messages published
    while the subscriber was away were skipped, with no gap said (``store_damaged`` 1 alone).
    Now it is read again from the start of the history, as any damaged place is."""
    got: list[int] = []
    publisher = zmqmesh.Node("publisher", store=str(tmp_path / "pub"), history={"logs.": 1000}, **mesh)

    def subscriber() -> zmqmesh.Node:
        node = zmqmesh.Node("sub", store=str(tmp_path / "sub"), **mesh)
        node.subscribe("logs.", lambda m: got.append(m.data), durable_name="reader")  # (replay="new")
        return node

    with publisher:
        with subscriber():
            publisher.wait_for_peers(1)
            for i in range(20):
                publisher.publish("logs.a", i)
            wait_until(lambda: len(got) == 20, 20, "the first 20")
        with sqlite3.connect(tmp_path / "sub" / "zmqmesh.db") as db:
            assert db.execute("UPDATE cursors SET topic = x'00'").rowcount == 1
        got.clear()
        for i in range(20, 60):
            publisher.publish("logs.a", i)
        with subscriber() as node:
            wait_until(lambda: set(got) >= set(range(20, 60)), 20, "the 40 published while it was away")
            stats = node.stats()
    assert got == list(range(60)), "read again from the start of the history, in order"
    assert stats["rejected"].get("store_damaged", 0) == 1 and stats["pubsub"].get("gap", 0) == 0


# (every row of the topic damaged: the start reads its lowest number, and SQLite's min()
# passes over a text beside numbers, so one damaged row of several goes unseen there; the
# five publications make one row or several, as the node's loop batches them)
@pytest.mark.parametrize("damage", ["UPDATE history_topics SET next = 'x'", "UPDATE history SET seq = 'x'"])
def test_a_publisher_whose_kept_numbering_is_damaged_is_refused_with_a_store_error(
        tmp_path: Path, mesh: dict[str, Any], damage: str) -> None:
    """A kept topic's numbering damaged on disk (a value of the wrong type) cannot be
    trusted: the start is refused, as for any damaged store, with `StoreError` naming it
    (before: a bare ``ZmqMeshError`` wrapping ``ValueError: invalid literal for int()``),
    the store let go and left as it was."""
    with zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 100}, **mesh) as node:
        publish_all(node, ["logs.a"], 0, 5)
    with sqlite3.connect(tmp_path / "zmqmesh.db") as db:
        db.execute(damage)
    for _ in range(2):  # (let go: the second start is refused for the same reason, not as locked)
        with pytest.raises(zmqmesh.StoreError, match=f"{tmp_path}.*damaged"):
            zmqmesh.Node("publisher", store=str(tmp_path), history={"logs.": 100}, **mesh).start()


def _lying_pages(monkeypatch: pytest.MonkeyPatch, liar: str, lie: Callable[[dict[str, Any]], None]) -> None:
    """Make the publisher whose store is the directory named ``liar`` serve pages of history
    changed by ``lie`` (a peer whose word is false); other publishers serve theirs."""
    real = zmqmesh._patterns.history.History.page

    def page(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        served: dict[str, Any] = real(self, *args, **kwargs)
        if self.store.directory.name == liar:
            served = {**served, "rows": [list(row) for row in served["rows"]]}
            lie(served)
        return served

    monkeypatch.setattr(zmqmesh._patterns.history.History, "page", page)


@contextlib.contextmanager
def _replaying_from_a_liar(tmp_path: Path, mesh: dict[str, Any],
                           handler: Callable[[zmqmesh.Message], Any]) -> Iterator[tuple[zmqmesh.Node, zmqmesh.Node]]:
    """A publisher whose store is the directory named "liar" (`_lying_pages`), with 10
    messages of "app.a" kept ({"n": 0} to {"n": 9}), and a node subscribed to "app." with
    ``handler``, replaying them all: ``(liar, subscriber)``, both running."""
    with zmqmesh.Node("liar", store=str(tmp_path / "liar"), history={"app.": 100}, **mesh) as liar:
        for i in range(10):
            liar.publish("app.a", {"n": i})
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("app.", handler, replay="all")
        with subscriber:
            yield liar, subscriber


@pytest.mark.parametrize("field", [0, 2])  # (its position; its number)
def test_a_page_numbered_past_what_a_store_holds_is_malformed_and_costs_no_other_stream_its_place(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        field: int) -> None:
    """A publisher whose pages of history give a row a position or a number past 2**63 - 1
    (a lie: no store numbers so far), replayed by a durable subscription. Before, the row was
    delivered, and every record of the subscription's places that held its topic failed
    ('Python int too large to convert to SQLite INTEGER', logged once per burst: 400 times
    for 400 live messages), with the places in every other stream written in the same
    transaction: restarted, the subscriber got an honest publisher's messages again, not
    marked redelivered (6 of them). Such a row is now malformed (counted in
    ``rejected["history_malformed"]``), and every place is recorded."""
    def lie(page: dict[str, Any]) -> None:
        if page["rows"]:
            page["rows"][-1][field] = 1 << 63

    _lying_pages(monkeypatch, "liar", lie)
    got: list[tuple[str, int]] = []
    caplog.set_level(logging.ERROR, logger="zmqmesh.replay")
    with zmqmesh.Node("liar", store=str(tmp_path / "liar"), history={"app.": 100}, **mesh) as liar, \
            zmqmesh.Node("honest", store=str(tmp_path / "honest"), history={"app.": 100}, **mesh) as honest:
        for i in range(10):
            liar.publish("app.liar", {"n": i})
            honest.publish("app.honest", {"n": i})
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "sub"), **mesh)
        subscriber.subscribe("app.", lambda m: got.append((m.topic, m.data["n"])), replay="all", durable_name="c")
        with subscriber:
            wait_until(lambda: ("app.honest", 9) in got, 20, "the honest history")
            honest.wait_for_peers(2)
            for i in range(10, 20):
                honest.publish("app.honest", {"n": i})
            wait_until(lambda: ("app.honest", 19) in got, 20, "the honest publisher's messages")
            malformed = rejected(subscriber, "history_malformed")
    assert malformed >= 1
    assert [n for t, n in got if t == "app.honest"] == list(range(20))
    assert ("app.liar", 9) not in got, "the row that lies is not delivered"
    assert not [r for r in caplog.records if "cannot record" in r.getMessage()]
    with sqlite3.connect(tmp_path / "sub" / "zmqmesh.db") as db:
        assert db.execute("SELECT seq FROM cursors WHERE topic = 'app.honest'").fetchall() == [(19,)]


def _forging(monkeypatch: pytest.MonkeyPatch, liar: zmqmesh.Node, numbers: dict[int, int]) -> None:
    """Make ``liar`` send its frames numbered ``seq`` as ``numbers[seq]`` instead (a peer
    whose word is false); other publishers number theirs as they are."""
    import zmqmesh._patterns.pubsub as pubsub

    real, uuid_bytes = pubsub.pub_sender, bytes.fromhex(liar.id)
    monkeypatch.setattr(pubsub, "pub_sender",
                        lambda u, seq: real(u, numbers.get(seq, seq) if u == uuid_bytes else seq))


def test_a_live_frame_numbered_past_what_a_store_holds_is_malformed(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A publisher that numbers a live frame of a kept topic past 2**63 - 1 (a lie), to a
    durable subscription following it from now on (``replay="new"``). Before, the frame was
    delivered, and every record of the subscription's places failed from then on ('Python
    int too large to convert to SQLite INTEGER'), an honest publisher's with it. Now it is
    malformed (counted in ``rejected["pubsub_malformed"]``), and every place is recorded.
    (The message itself, kept under its true number, 0, published after the subscription
    reached the liar, may come from its history: its first read, or a look once quiet.)"""
    got: list[tuple[str, int]] = []
    caplog.set_level(logging.ERROR, logger="zmqmesh.replay")
    with zmqmesh.Node("liar", store=str(tmp_path / "liar"), history={"app.": 100}, **mesh) as liar, \
            zmqmesh.Node("honest", store=str(tmp_path / "honest"), history={"app.": 100}, **mesh) as honest:
        _forging(monkeypatch, liar, {0: (1 << 63) - 1})
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "sub"), **mesh)
        subscriber.subscribe("app.", lambda m: got.append((m.topic, m.data["n"])), durable_name="c")
        with subscriber:
            liar.wait_for_subscribers("app.liar", 1, timeout=10)
            honest.wait_for_subscribers("app.honest", 1, timeout=10)
            liar.publish("app.liar", {"n": 0})
            wait_until(lambda: got or rejected(subscriber, "pubsub_malformed"), 20, "the lie taken")
            for i in range(10):
                honest.publish("app.honest", {"n": i})
            wait_until(lambda: ("app.honest", 9) in got, 20, "the honest publisher's messages")
            malformed = rejected(subscriber, "pubsub_malformed")
    assert malformed == 1
    assert [g for g in got if g[0] == "app.honest"] == [("app.honest", n) for n in range(10)]
    liar_got = [g for g in got if g[0] == "app.liar"]
    assert liar_got in ([], [("app.liar", 0)]), "never under the forged number"
    assert not [r for r in caplog.records if "cannot record" in r.getMessage()]
    with sqlite3.connect(tmp_path / "sub" / "zmqmesh.db") as db:
        places = dict(db.execute("SELECT topic, seq FROM cursors").fetchall())
    assert places == {"app.honest": 9, **({"app.liar": 0} if liar_got else {})}


def test_a_live_frame_its_publishers_history_never_reaches_is_dropped_and_counted(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A publisher that sends a live frame of a kept topic under a number its history never
    reached (a lie: a publisher keeps each frame before it sends it). Before, the replaying
    subscription read the history again and again, the frame still past it each time: about
    3,800 pages a second, for good. Now, once the history was read after the frame came and
    still lacks it, the frame is dropped, counted (``rejected["replay_unkept"]``); the
    message the publisher kept under its true number still comes, from the history."""
    served: list[int] = []
    real = zmqmesh._patterns.history.History.page

    def page(self: Any, *args: Any, **kwargs: Any) -> Any:
        served.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zmqmesh._patterns.history.History, "page", page)
    got: list[int] = []
    with _replaying_from_a_liar(tmp_path, mesh, lambda m: got.append(m.data["n"])) as (liar, subscriber):
        wait_until(lambda: len(got) == 10, 20, "the history")
        liar.wait_for_subscribers("app.a", 1, timeout=10)
        _forging(monkeypatch, liar, {10: 10 + (1 << 40)})
        liar.publish("app.a", {"n": 10})
        wait_until(lambda: rejected(subscriber, "replay_unkept") == 1, 20, "the frame dropped")
        liar.publish("app.a", {"n": 11})
        wait_until(lambda: len(got) == 12, 20, "the message under its true number, and the next")
        before = len(served)
        liar.publish("app.a", {"n": 12})
        wait_until(lambda: len(got) == 13, 20, "one more")
        read = len(served) - before
        stats = subscriber.stats()
    assert got == list(range(13))
    assert read < 10, f"{read} pages read for one message"
    assert stats["pubsub"].get("gap", 0) == 0


def test_a_page_with_more_to_follow_that_goes_no_further_is_malformed(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A publisher whose pages of history always say more follow (a lie: the last one has
    no row left). Before, the subscription asked again from the same position for good:
    7,238 pages in 3 s, and still going. Such a page, with no row past the position asked
    from, is now malformed (``rejected["history_malformed"]``): its read fails as any, tried
    again a few times, then given up (``replay_failed``); what came before it is delivered,
    and the live messages go on."""
    served: list[int] = []

    def lie(page: dict[str, Any]) -> None:
        served.append(1)
        page["more"] = True
        page.pop("next", None)

    _lying_pages(monkeypatch, "liar", lie)
    got: list[tuple[int, int]] = []
    with _replaying_from_a_liar(tmp_path, mesh, lambda m: got.append((m.data["n"], m.gap))) as (liar, subscriber):
        wait_until(lambda: subscriber.stats()["pubsub"].get("replay_failed"), 20, "the read given up")
        read = len(served)
        liar.wait_for_subscribers("app.a", 1, timeout=10)
        liar.publish("app.a", {"n": 10})
        wait_until(lambda: len(got) == 11, 20, "the live message")
        malformed = rejected(subscriber, "history_malformed")
    assert got == [(n, 0) for n in range(11)]
    assert malformed >= 1
    assert read < 10, f"{read} pages read"


def test_pieces_of_numbers_that_never_end_are_refused_in_bounds_and_live_messages_go_on(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A publisher whose pieces of ``next`` always say more follow, each naming topics
    further on (a lie: an honest one's end). Before, the subscriber collected them for
    as long as they came: a crafted publisher grew it by 1,009 MB in 10 s (6.96 million
    topics), without end. Past `MAP_MAX_TOPICS` topics (lowered here) the read is refused:
    counted (``rejected["history_numbers_refused"]``), logged, not tried again; what came
    before it is delivered, and the live messages go on, that history no longer read."""
    from zmqmesh._patterns.replay import cursor

    monkeypatch.setattr(cursor, "MAP_MAX_TOPICS", 20_000)
    pieces: list[int] = []

    def lie(page: dict[str, Any]) -> None:  # (each piece of numbers names 1,000 topics more, and more to come)
        if "next" in page:
            first = len(pieces) * 1000
            pieces.append(1)
            page["next"] = {f"app.z{first + i:09d}": 1 for i in range(1000)}
            page["next_from"] = f"app.z{first + 1000:09d}"

    _lying_pages(monkeypatch, "liar", lie)
    got: list[tuple[int, int]] = []
    caplog.set_level(logging.WARNING, logger="zmqmesh.replay")
    with _replaying_from_a_liar(tmp_path, mesh, lambda m: got.append((m.data["n"], m.gap))) as (liar, subscriber):
        wait_until(lambda: rejected(subscriber, "history_numbers_refused"), 20, "the pieces refused")
        liar.wait_for_subscribers("app.a", 1, timeout=10)
        for i in range(10, 20):
            liar.publish("app.a", {"n": i})
        wait_until(lambda: len(got) == 20, 20, "the live messages")
        stats = subscriber.stats()
    assert got == [(n, 0) for n in range(20)]
    assert stats["rejected"]["history_numbers_refused"] == 1
    assert stats["rejected"].get("history_malformed", 0) == 0
    assert stats["pubsub"]["replay_failed"] == 1
    assert len(pieces) <= 21, f"{len(pieces)} pieces read"
    assert [r for r in caplog.records if "20,000 topics" in r.getMessage()]


def test_a_store_too_full_to_record_durable_places_is_counted_and_logged_in_bounds(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A durable subscriber whose store fills (``store_max_bytes``, a place per topic of
    20,000): each record of its places the store refuses is counted
    (``pubsub["durable_record_failed"]``) and logged at most every 10 s. Before, it was not
    counted, and logged once per burst of handlers: 92 errors in about 2 s."""
    got: list[int] = []
    caplog.set_level(logging.ERROR, logger="zmqmesh.replay")
    with zmqmesh.Node("publisher", store=str(tmp_path / "pub"), history={"app.": 10}, **mesh) as publisher:
        subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "sub"), store_max_bytes=1 << 20, **mesh)
        subscriber.subscribe("app.", lambda m: got.append(m.data), durable_name="c")
        with subscriber:
            publisher.wait_for_subscribers("app.0", 1, timeout=10)
            for i in range(20_000):
                publisher.publish(f"app.{i}", i)
            wait_until(lambda: len(got) == 20_000, 60, "every message")
            failed = subscriber.stats()["pubsub"].get("durable_record_failed", 0)
    said = [r for r in caplog.records if "cannot record" in r.getMessage()]
    assert failed > 0
    assert 1 <= len(said) <= 3, f"{len(said)} lines"


def test_live_messages_that_came_while_a_small_history_was_read_are_delivered_not_taken_for_missed(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A publisher keeping 100 messages a topic publishes 2,000 more while a new `replay="all"`
    subscriber's first read of its history is on its way: the subscriber holds them as they
    come, and the page, read after, begins past them (the history dropped them since). The
    page's jump was counted missed, the held messages then dropped as delivered: 100 of the
    2,100 delivered, 2,000 counted missed though every one had come (a helper's churn round:
    with a live burst after the replay, 1,124 of 20,000 a topic, in 7 runs of 8). Now the
    messages held go first, and only the 100 published before the subscriber came, which
    the history no longer has, are missed."""
    go = threading.Event()
    real = zmqmesh._patterns.history.History.page
    first = [True]

    def page(self: Any, *args: Any, **kwargs: Any) -> Any:
        if first[0]:  # (the subscriber's first read waits while the burst is published and comes)
            first[0] = False
            go.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zmqmesh._patterns.history.History, "page", page)
    got: list[tuple[int, int]] = []
    with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"app.": 100}, **mesh) as publisher:
        for i in range(100):
            publisher.publish("app.a", {"n": i})
        subscriber = zmqmesh.Node("subscriber", **mesh)
        subscriber.subscribe("app.", lambda m: got.append((m.data["n"], m.gap)), replay="all")
        with subscriber:
            publisher.wait_for_subscribers("app.a", 1, timeout=10)
            wait_until(lambda: not first[0], 20, "the subscriber's first read of the history")
            for i in range(100, 2100):
                publisher.publish("app.a", {"n": i})
            wait_until(lambda: subscriber.stats()["pubsub"].get("received", 0) == 2000, 20, "the burst, held")
            go.set()
            wait_until(lambda: got and got[-1][0] == 2099, 20, "the last message")
            stats = subscriber.stats()
    assert [n for n, _gap in got] == list(range(100, 2100)), (len(got), got[:3])
    assert got[0][1] == 100 and not any(gap for _n, gap in got[1:])
    assert stats["pubsub"].get("gap") == 100


@pytest.mark.timeout(60)
def test_a_kept_frame_with_headers_says_where_its_history_keeps_it_and_one_without_stays_three_frames(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A publisher's frame of a kept topic that has a meta frame (headers) says there where
    its history keeps it (``"p"``, the position a page of history gives its row), across a
    restart too (positions go on, as the history's do): a replaying subscriber holding it
    knows that every frame kept after it comes live (`Cursor.live_pos`). A frame without
    headers stays the three frames of protocol 1. (A bare SUB socket reads the frames.)"""
    import msgpack
    import zmq

    store = tmp_path / "publisher"
    said: dict[tuple[str, int], int] = {}
    plain: list[int] = []
    context = zmq.Context()
    try:
        for run in range(2):
            with zmqmesh.Node("publisher", store=str(store), history={"app.": 1000}, **mesh) as node:
                sub = context.socket(zmq.SUB)
                sub.connect(node.endpoints["pub"])
                sub.setsockopt(zmq.SUBSCRIBE, b"app.")
                try:
                    node.wait_for_subscribers("app.x", 1, timeout=10)
                    for i in range(20):
                        node.publish("app.x", i, headers={"run": str(run)})
                        node.publish("app.y", i)
                    node.publish_many("app.x", range(20, 30), headers={"run": str(run)})
                    node.publish("app.y", "last")
                    deadline = time.monotonic() + 20
                    received = 0
                    while received < 51 and time.monotonic() < deadline:  # (30 of app.x, 21 of app.y)
                        if not sub.poll(100):
                            continue
                        frames = sub.recv_multipart()
                        topic, seq = frames[0].decode(), int.from_bytes(frames[1][16:], "big")
                        if topic == "app.y":
                            assert len(frames) == 3, "no meta frame without headers"
                            plain.append(seq)
                            received += 1
                        else:
                            said[(topic, seq)] = msgpack.unpackb(frames[3])["p"]
                            received += sum(1 for _ in _objects(frames[2]))
                finally:
                    sub.close(0)
    finally:
        context.term()
    kept = {(topic, seq): pos for pos, topic, seq in read_only(store, "SELECT pos, topic, seq FROM history")}
    assert said and all(kept[place] == pos for place, pos in said.items()), (said, kept)
    assert sorted(plain) == list(range(42)), "every app.y frame, three frames each"
    assert max(p for (_t, s), p in said.items() if s < 30) < min(p for (_t, s), p in said.items() if s >= 30)


def _objects(batch: bytes) -> Iterator[Any]:
    """The msgpack objects of a batch frame."""
    import msgpack

    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(batch)
    yield from unpacker


@pytest.mark.timeout(60)
def test_a_replaying_subscriber_gets_its_publishers_answer_to_its_replay_marker_which_no_handler_sees_nor_counts(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A publisher that keeps topics answers a replay marker subscribed after a prefix with
    one frame on exactly the marker's topic, numbered with the position its history gives
    the next frame it keeps (the ``"p"`` the next frame with headers says), its body empty
    (a bare SUB reads it). A replaying subscriber's own marker is answered so: its
    first read goes at the answer (no line says it went without one), and the answer never
    reaches a handler, not even one of every topic, nor counts as a message received, by
    name, or malformed. An answer that comes again, or one to another node's marker, is
    let go; a malformed one (a body) is counted (``rejected["pubsub_malformed"]``)."""
    import msgpack
    import zmq

    from zmqmesh._wire import frames as wire

    caplog.set_level(logging.INFO, logger="zmqmesh.replay")
    context = zmq.Context()
    replayed: list[Any] = []
    everything: list[str] = []
    try:
        with zmqmesh.Node("publisher", store=str(tmp_path / "publisher"), history={"app.": 1000}, **mesh) as pub:
            for i in range(10):
                pub.publish("app.x", i)
            sub = context.socket(zmq.SUB)
            try:
                sub.connect(pub.endpoints["pub"])
                marker = wire.replay_marker("ab" * 16, 1)
                sub.setsockopt(zmq.SUBSCRIBE, b"app.")
                sub.setsockopt(zmq.SUBSCRIBE, marker)
                # (frames of the ten publications sent after the prefix reached the publisher,
                # if the loop had not sent them all before, come first: in order, before the answer)
                answer = [b"app.x"]
                while answer[0] == b"app.x":
                    assert sub.poll(10_000), "the marker is answered"
                    answer = sub.recv_multipart()
                assert answer[0] == marker and answer[1][:16] == bytes.fromhex(pub.id) and answer[2:] == [b""]
                position = int.from_bytes(answer[1][16:], "big")
                pub.publish("app.x", 10, headers={"after": "marker"})
                assert sub.poll(10_000)
                after = sub.recv_multipart()
                assert after[0] == b"app.x" and msgpack.unpackb(after[3])["p"] == position
            finally:
                sub.close(0)
            with zmqmesh.Node("subscriber", **mesh) as node:
                node.subscribe("app.", lambda msg: replayed.append(msg.data), replay="all")
                node.subscribe("", lambda msg: everything.append(msg.topic))
                wait_until(lambda: len(replayed) == 11, 20, "the history replayed")
                pub.wait_for_subscribers("app.x", 1, timeout=10)
                for i in range(11, 20):
                    pub.publish("app.x", i)
                wait_until(lambda: len(replayed) == 20 and len(everything) == 9, 20, "the live messages")
                stats = node.stats()
                # a stranger answering: again (let go), another node's marker (let go), malformed (counted)
                own = wire.replay_marker(node.id, 1)  # (its one replaying subscription's)
                stranger = context.socket(zmq.XPUB)
                try:
                    stranger.connect(node.endpoints["sub"])
                    seen: set[bytes] = set()
                    while own not in seen:
                        assert stranger.poll(10_000), "the subscriber's subscriptions reach the stranger"
                        seen.add(stranger.recv()[1:])
                    sender = wire.pub_sender(bytes.fromhex(pub.id), 5)
                    stranger.send_multipart([own, sender, b""])
                    stranger.send_multipart([wire.replay_marker("cd" * 16, 1), sender, b""])
                    stranger.send_multipart([own, sender, b"\x01"])
                    wait_until(lambda: node.stats()["rejected"].get("pubsub_malformed") == 1, 10, "the malformed one")
                    after_stranger = node.stats()
                finally:
                    stranger.close(0)
    finally:
        context.term()
    assert replayed == list(range(20)) and everything == ["app.x"] * 9
    assert stats["pubsub"].get("received") == 9 and not stats["pubsub"].get("gap")
    assert set(stats["names"]["pubsub"]["received"]) == {"app.x"} and not stats["rejected"], stats
    assert not [r.getMessage() for r in caplog.records if "marker" in r.getMessage()]
    assert after_stranger["pubsub"].get("received") == 9 and after_stranger["rejected"] == {"pubsub_malformed": 1}


@pytest.mark.timeout(30)
def test_a_history_read_from_a_publisher_not_present_fails_at_once(mesh: dict[str, Any]) -> None:
    """A read of a publisher's history while it is not present fails at once
    (`NoProviderError`), instead of waiting out its timeout for it to come: a sync node
    reads pages one at a time, so each read of a publisher gone held every other
    subscription's for 10 s (benchmarks/churn.py: with short-lived publishers leaving mid
    catch-up, 325 reads waited in line and replaying subscriptions stalled for minutes).
    The subscription itself looks again while the publisher is away (`Replays._retry`).
    Asked here with a timeout of 120 s: before, the read waited all of it."""
    from zmqmesh._drivers.thread.runner import BlockingRunner
    from zmqmesh._engine.api import fetch_plan
    from zmqmesh._patterns.replay import Fetch

    with zmqmesh.Node("subscriber", **mesh) as node:
        engine = node._engine
        gone = Fetch("ab" * 16, ("app.", print), "cd" * 16, {"p": "app.", "a": 0, "t": ""})
        with pytest.raises(zmqmesh.NoProviderError):
            BlockingRunner(engine).run(fetch_plan(engine, gone, timeout=120))


@contextlib.contextmanager
def _lone_requests_to(provider: zmqmesh.Node, mesh: dict[str, Any], every_s: tuple[float, float]) -> Iterator[list[int]]:
    """A caller node that sends ``provider``'s "echo" one request at a time, each after a
    pause of ``every_s`` (at random, within it), until the block ends; yields the replies
    received so far (each request's number)."""
    import random

    replies: list[int] = []
    done = threading.Event()
    caller = zmqmesh.Node("caller", **mesh)
    failures: list[BaseException] = []

    def call() -> None:
        n = 0
        while not done.is_set():
            try:
                replies.append(caller.request("echo", n, timeout=5, peer=provider.id))
            except BaseException as exc:  # (asserted on below: a reply missing is part of what fails)
                failures.append(exc)
                return
            n += 1
            done.wait(random.uniform(*every_s))

    with caller:
        caller.wait_for_service("echo", timeout=10)
        thread = threading.Thread(target=call, name="lone-requests", daemon=True)
        thread.start()
        try:
            wait_until(lambda: replies or failures, 10, "the first reply")
            yield replies
        finally:
            done.set()
            thread.join(10)
    assert not failures, failures
    assert replies == list(range(len(replies)))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("serving", ["publisher", "subscriber", "subscriber retrying its first read"])
def test_a_replay_goes_through_while_lone_requests_keep_coming_faster_than_the_inbox_looks_round(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, serving: str) -> None:
    """A node's inbox serves a lone request in place, without a drain, and otherwise looks
    round when its poll times out (every 500 ms): a replay must go on while requests come
    every 10-50 ms, from before the two nodes meet, to the publisher (its pages of history),
    or to the replaying subscriber: its reads, and its read tried again after the first
    failed (the publisher's store failed a page once), which only a look round starts
    (`Dispatcher.has_waiting`)."""
    pages_failed: list[bool] = []
    if serving == "subscriber retrying its first read":
        from zmqmesh._patterns.replay import replays

        failing = _failing_pages(monkeypatch)
        monkeypatch.setattr(replays, "FETCH_RETRIES_S", (0.5, 1.0, 2.0))  # (the defaults: 0.5 s to the next read)
        failing_page = zmqmesh._patterns.history.History.page

        def fails_once(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            pages_failed.append(failing.is_set())
            try:
                page: dict[str, Any] = failing_page(self, *args, **kwargs)
                return page
            finally:
                failing.clear()

        monkeypatch.setattr(zmqmesh._patterns.history.History, "page", fails_once)
    topics = ["t.a", "t.b", "t.c"]
    history = {"t.": 100_000}
    store = str(tmp_path / "publisher")
    alone = {**mesh, "mesh": f"{mesh['mesh']}-alone"}
    with zmqmesh.Node("alone", store=store, history=history, **alone) as publisher:
        for i in range(6000):  # (three pages of history and more, out of the subscriber's mesh)
            publisher.publish(topics[i % 3], i)
    got: list[tuple[str, int]] = []
    publisher = zmqmesh.Node("publisher", store=store, history=history, **mesh)
    subscriber = zmqmesh.Node("subscriber", store=str(tmp_path / "subscriber"), **mesh)
    subscriber.subscribe("t.", lambda m: got.append((m.topic, m.data)), replay="all", durable_name="d")
    provider, other = (publisher, subscriber) if serving == "publisher" else (subscriber, publisher)
    provider.service("echo")(lambda msg: msg.data)
    with provider, _lone_requests_to(provider, mesh, (0.01, 0.05)) as replies:
        with other:
            wait_until(lambda: len(got) >= 6000, 30, "the whole history replayed")
            publisher.wait_for_subscribers("t.", 1, timeout=10)
            for i in range(6000, 6010):
                publisher.publish(topics[i % 3], i)
            wait_until(lambda: len(got) >= 6010, 10, "the live messages after the replay")
        assert len(replies) > 1
        failed = subscriber.stats()["pubsub"].get("replay_failed", 0)
    assert failed == 0
    assert pages_failed.count(True) == (serving == "subscriber retrying its first read")
    assert [n for _topic, n in got] == list(range(6010))
    assert all(topic == topics[n % 3] for topic, n in got)


def test_what_went_plainly_is_noted_for_a_bounded_number_of_streams_and_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    """`PlainlyDelivered` keeps the streams noted last (the oldest go first) and a bounded
    number of topics each; what it leaves out is counted, never held."""
    from zmqmesh._patterns.replay import plain
    from zmqmesh._stats import Stats

    monkeypatch.setattr(plain, "MAX_STREAMS", 2)
    monkeypatch.setattr(plain, "MAX_TOPICS", 2)
    stats = Stats()
    noted = plain.PlainlyDelivered(stats)
    key, options = ("t.", print), object()
    for stream in ("s1", "s2", "s3"):
        noted.note(key, options, stream, "t.a", 5)
    for topic in ("t.a", "t.b", "t.c"):
        noted.note(key, options, "s3", topic, 7)
    assert noted.take(key, options, "s1") == {}, "the oldest stream made way"
    assert noted.take(key, object(), "s2") == {}, "a subscription made anew has its own"
    assert noted.take(key, options, "s3") == {"t.a": 7, "t.b": 7}
    assert stats.snapshot()["rejected"]["replay_plain_unnoted"] == 2  # (s1's one topic, as it made way; t.c)
