"""Durable queues: a store per node, messages that outlive processes, dead letters, ack
timeouts and effectively-once pullers. Real processes, real SQLite, SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from helpers import ScriptProcess, rss_bytes, wait_until

import zmqmesh
from zmqmesh import inspect_store

HERE = Path(__file__).resolve().parent
WORKER = HERE / "durable_process.py"


def worker(*args: Any) -> ScriptProcess:
    """A durable_process.py child (see its docstring for the roles)."""
    return ScriptProcess(WORKER, *args)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def handled(path: Path) -> list[tuple[str, int]]:
    """``(id, number)`` for every message a puller handled, in order."""
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(r[0], int(r[1])) for r in rows if len(r) == 2]


def stored(store: Path) -> int:
    """How many durable messages ``store`` holds (read beside the node, as an operator would)."""
    return sum(q["messages"] for q in inspect_store(store)["queues"].values())


# -- the store ----------------------------------------------------------------------------------

def test_a_store_serves_one_node_at_a_time(tmp_path: Path, mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("first", store=str(tmp_path), **mesh):
        second = zmqmesh.Node("second", store=str(tmp_path), **mesh)
        with pytest.raises(zmqmesh.StoreLockedError, match="in use"):
            second.start()
        assert isinstance(zmqmesh.StoreLockedError("x"), zmqmesh.ConfigError)
    with zmqmesh.Node("third", store=str(tmp_path), **mesh):  # free again once the first stopped
        pass


def _try_the_store_then_wait(store: str, mesh: dict[str, Any], out: Any, release: Any) -> None:
    try:
        zmqmesh.Node("child", store=store, **mesh).start()
        out.put("opened")
    except zmqmesh.ZmqMeshError as exc:
        out.put(f"{type(exc).__name__}: {exc}")
    release.wait(30)


@pytest.mark.timeout(60)
def test_a_child_forked_while_a_store_is_open_does_not_hold_it_after_the_stop(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    # (the child inherits the descriptor holding the database's lock; the stop closed it
    # without unlocking, so the lock stayed while any such child lived: the parent could
    # not open its own store again, "in use by another node, through another name")
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out, release = ctx.Queue(), ctx.Event()
    node = zmqmesh.Node("first", store=str(tmp_path), **mesh).start()
    child = ctx.Process(target=_try_the_store_then_wait, args=(str(tmp_path), mesh, out, release))
    child.start()
    try:
        said = out.get(timeout=30)
        assert said.startswith("StoreLockedError"), said  # (refused in the child, as in another process)
        node.push("q", 1, durable=True)
        node.stop()
        assert child.is_alive()
        with zmqmesh.Node("second", store=str(tmp_path), **mesh) as again:  # free again, the child still there
            again.push("q", 2, durable=True)
    finally:
        node.stop()
        release.set()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(5)
    assert inspect_store(tmp_path)["queues"]["q"]["messages"] == 2


ORPHANING_PARENT = """
import multiprocessing, sys, time, zmqmesh
def nap(running):
    running.set()
    time.sleep(30)
if __name__ == "__main__":
    node = zmqmesh.Node("parent", store=sys.argv[1], mesh=sys.argv[2], beacon_port=int(sys.argv[3])).start()
    ctx = multiprocessing.get_context("fork")
    running = ctx.Event()  # (set by the child's own code: past the handlers run at its fork)
    child = ctx.Process(target=nap, args=(running,))
    child.start()
    running.wait(30)
    print(child.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(90)
def test_a_forked_child_does_not_keep_the_store_of_its_killed_parent(tmp_path: Path, mesh: dict[str, Any]) -> None:
    # (the child's copies of the lock descriptors held the store's locks for as long as it
    # lived: the node restarted after its process was killed found its store locked)
    parent = subprocess.Popen([sys.executable, "-c", ORPHANING_PARENT, str(tmp_path), mesh["mesh"],
                               str(mesh["beacon_port"])], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        assert os.path.exists(f"/proc/{child}")  # (the orphan lives on)
        with zmqmesh.Node("restarted", store=str(tmp_path), **mesh) as node:
            node.push("q", 1, durable=True)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _open_the_store_when_told(store: str, mesh: dict[str, Any], go: Any, out: Any) -> None:
    go.wait(30)
    try:
        with zmqmesh.Node("child", store=store, **mesh) as node:
            node.push("q", 2, durable=True)
        out.put("opened")
    except zmqmesh.ZmqMeshError as exc:
        out.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.timeout(60)
def test_a_forked_child_opens_the_store_its_parent_let_go(tmp_path: Path, mesh: dict[str, Any]) -> None:
    # (the child's inherited table of held databases still named it: "in use by another
    # node, through another name")
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    with zmqmesh.Node("parent", store=str(tmp_path), **mesh) as node:
        node.push("q", 1, durable=True)
        child = ctx.Process(target=_open_the_store_when_told, args=(str(tmp_path), mesh, go, out))
        child.start()
    try:
        go.set()
        assert out.get(timeout=30) == "opened"
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(5)
    assert inspect_store(tmp_path)["queues"]["q"]["messages"] == 2


def test_a_foreign_or_damaged_file_is_refused_not_reset(tmp_path: Path, mesh: dict[str, Any]) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "zmqmesh.db").write_bytes(b"these are somebody's notes")
    with pytest.raises(zmqmesh.StoreError, match="not a zmqmesh store"):
        zmqmesh.Node("n", store=str(foreign), **mesh).start()
    assert (foreign / "zmqmesh.db").read_bytes() == b"these are somebody's notes"

    other_app = tmp_path / "other"
    other_app.mkdir()
    with sqlite3.connect(other_app / "zmqmesh.db") as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    before = (other_app / "zmqmesh.db").read_bytes()
    with pytest.raises(zmqmesh.StoreError, match="not a zmqmesh store"):
        zmqmesh.Node("n", store=str(other_app), **mesh).start()
    assert (other_app / "zmqmesh.db").read_bytes() == before, "a foreign database is left as it was"

    directory_in_the_way = tmp_path / "odd"
    (directory_in_the_way / "zmqmesh.db").mkdir(parents=True)
    with pytest.raises(zmqmesh.StoreError):
        zmqmesh.Node("n", store=str(directory_in_the_way), **mesh).start()

    damaged = tmp_path / "damaged"
    with zmqmesh.Node("n", store=str(damaged), **mesh) as node:
        for i in range(2000):
            node.push("q", {"i": i, "pad": "x" * 200}, durable=True)
    data = bytearray((damaged / "zmqmesh.db").read_bytes())
    assert len(data) > 5 * 4096
    data[4 * 4096:5 * 4096] = os.urandom(4096)  # a page of the outbox overwritten
    (damaged / "zmqmesh.db").write_bytes(bytes(data))
    with pytest.raises(zmqmesh.StoreError):
        zmqmesh.Node("n", store=str(damaged), **mesh).start()


KILLED_AFTER_PUSHES = """
import os, sys, zmqmesh
node = zmqmesh.Node("pusher", store=sys.argv[1], mesh=sys.argv[2], beacon_port=int(sys.argv[3])).start()
node.push_many("q", [{"i": i, "pad": "x" * 200} for i in range(int(sys.argv[4]))], durable=True)
os.kill(os.getpid(), 9)  # (at once: what the last commits wrote is in the write-ahead log only)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["log overwritten", "database emptied"])
def test_a_killed_store_whose_log_or_database_was_damaged_is_refused_not_reset(
        tmp_path: Path, mesh: dict[str, Any], damage: str) -> None:
    """After a SIGKILL a store's recent commits are in its write-ahead log (``-wal``). SQLite
    takes a log whose header is not one for nothing, and deletes the log of a database of
    no bytes: a node started on either began afresh, every message of the log lost and
    counted nowhere (400 of 400 here). Such a store is refused, its files left as they were."""
    store = tmp_path / "store"
    subprocess.run([sys.executable, "-c", KILLED_AFTER_PUSHES, str(store), mesh["mesh"], str(mesh["beacon_port"]),
                    "400"], timeout=30)
    log_file, db_file = store / "zmqmesh.db-wal", store / "zmqmesh.db"
    assert log_file.stat().st_size > 0 and stored(store) == 400
    if damage == "log overwritten":
        log_file.write_bytes(os.urandom(log_file.stat().st_size))
    else:
        os.truncate(db_file, 0)
    before = (db_file.read_bytes(), log_file.read_bytes())
    node = zmqmesh.Node("n", store=str(store), **mesh)
    try:
        with pytest.raises(zmqmesh.StoreError, match="damaged"):
            node.start()
    finally:
        node.stop()
    assert (db_file.read_bytes(), log_file.read_bytes()) == before, "nothing reset or overwritten"


def test_a_stopped_store_whose_database_was_emptied_is_refused_not_made_afresh(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A database truncated to no bytes looks like one a first start made and never got to
    fill: a node started on it made a fresh store, its 300 messages gone and counted
    nowhere. The lock file now says a store was made there; a database deleted on purpose,
    or an empty one beside a lock file that says nothing (a first start killed early, a
    store of an older zmqmesh), still makes a fresh store."""
    store = tmp_path / "store"
    with zmqmesh.Node("n", store=str(store), **mesh) as node:
        node.push_many("q", list(range(300)), durable=True)
    os.truncate(store / "zmqmesh.db", 0)
    for _ in range(2):  # (and the refusal leaves it so)
        with pytest.raises(zmqmesh.StoreError, match="damaged.*no bytes"):
            zmqmesh.Node("n", store=str(store), **mesh).start()
    assert (store / "zmqmesh.db").stat().st_size == 0, "nothing reset"

    (store / "zmqmesh.db").unlink()  # deleted: an operator's fresh start
    with zmqmesh.Node("n", store=str(store), **mesh) as node:
        node.push("q", 1, durable=True)
    assert stored(store) == 1

    killed_early = tmp_path / "killed-early"
    killed_early.mkdir()
    (killed_early / "zmqmesh.lock").touch()
    (killed_early / "zmqmesh.db").touch()
    with zmqmesh.Node("n", store=str(killed_early), **mesh) as node:
        node.push("q", 1, durable=True)
    assert stored(killed_early) == 1


def test_one_database_is_used_by_one_node_whatever_names_it_and_odd_files_are_refused(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A store directory whose database is a link to another's (a hard link, as `cp -al`
    makes, or a symbolic one) shares that database: it is refused while the other node
    runs (every message was delivered twice), and usable once it stopped. A FIFO or a
    device in the database's place is refused at once (a FIFO blocked the start for good);
    so is a database that names no stream of its own, without leaking a descriptor."""
    first = tmp_path / "first"
    with zmqmesh.Node("first", store=str(first), **mesh) as node:
        node.push("q", 1, durable=True)
        for kind in ("hard", "symbolic"):
            other = tmp_path / kind
            other.mkdir()
            if kind == "hard":
                os.link(first / "zmqmesh.db", other / "zmqmesh.db")
            else:
                (other / "zmqmesh.db").symlink_to(first / "zmqmesh.db")
            with pytest.raises(zmqmesh.StoreLockedError, match="another name"):
                zmqmesh.Node("second", store=str(other), **mesh).start()
        # the refusals kept the running node's own locks: another process's SQLite, closing,
        # must not take its write-ahead log away (a refusal that opened the file dropped them)
        subprocess.run([sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
                        "db.execute('SELECT count(*) FROM meta').fetchall(); db.close()", str(first / "zmqmesh.db")],
                       check=True, timeout=30)
        assert (first / "zmqmesh.db-wal").exists(), "the running node's write-ahead log was taken away"
        node.push("q", 2, durable=True)
    assert inspect_store(first)["queues"]["q"]["messages"] == 2
    assert inspect_store(tmp_path / "hard")["queues"]["q"]["messages"] == 2  # the same database
    with zmqmesh.Node("second", store=str(tmp_path / "hard"), **mesh):  # one at a time: fine
        pass

    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "zmqmesh.db")
    started = time.monotonic()
    with pytest.raises(zmqmesh.StoreError, match="not a plain file"):
        zmqmesh.Node("n", store=str(fifo), **mesh).start()
    with pytest.raises(zmqmesh.StoreError, match="not a plain file"):
        inspect_store(fifo)
    assert time.monotonic() - started < 5

    nameless = tmp_path / "nameless"
    with zmqmesh.Node("n", store=str(nameless), **mesh):
        pass
    with sqlite3.connect(nameless / "zmqmesh.db") as db:
        db.execute("DELETE FROM meta WHERE key = 'stream'")
    descriptors = []
    for _ in range(4):
        with pytest.raises(zmqmesh.StoreError, match="names no stream"):
            zmqmesh.Node("n", store=str(nameless), **mesh).start()
        descriptors.append(len(os.listdir("/proc/self/fd")))
    assert descriptors[-1] <= descriptors[0], descriptors  # (each failed start leaked two)


def test_a_full_store_refuses_the_next_message_and_keeps_the_others(tmp_path: Path, mesh: dict[str, Any]) -> None:
    got: list[int] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), store_max_bytes=1 << 20, **mesh) as node:
        accepted = 0
        with pytest.raises(zmqmesh.StoreFullError, match="full"):
            for i in range(100):
                node.push("q", {"i": i, "blob": b"\0" * 50_000}, durable=True)
                accepted += 1
        assert 5 < accepted < 100
        assert stored(tmp_path) == accepted
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("q", lambda msg: got.append(msg.data["i"]), at_least_once=True)
        with puller:
            wait_until(lambda: len(got) == accepted, 20, "every stored message")
            # (forgotten once their acknowledgements reach the pusher: a stop before that
            # leaves them to be delivered again, as at-least-once allows)
            wait_until(lambda: stored(tmp_path) == 0, 20, "the handled messages forgotten")
    assert got == list(range(accepted))


def test_concurrent_durable_pushes_share_commits_and_a_failing_call_fails_alone(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """Group commit: tasks pushing in the same pass of the loop share one transaction; a
    call too big for the store fails alone, its group's other calls are stored."""
    async def main() -> dict[str, Any]:
        async with zmqmesh.AsyncNode("pusher", store=str(tmp_path), store_max_bytes=1 << 20, **mesh) as node:
            async def producer(k: int) -> None:
                for i in range(10):
                    await node.push("q", {"k": k, "i": i}, durable=True)

            await asyncio.gather(*(producer(k) for k in range(64)))
            results = await asyncio.gather(
                node.push_many("q", [b"\0" * 60_000] * 40, durable=True),  # 2.4 MB: never fits
                *(node.push("q", {"k": k, "i": 10}, durable=True) for k in range(8)),
                return_exceptions=True)
            assert isinstance(results[0], zmqmesh.StoreFullError)
            assert results[1:] == [None] * 8
            return node.stats()["pipeline"]

    counters = asyncio.run(main())
    assert stored(tmp_path) == counters["durable_stored"] == 64 * 10 + 8
    assert counters["durable_commits"] < 64 * 10 / 4  # gathered, not one each


def test_durable_pushes_from_many_threads_are_all_stored_once(tmp_path: Path, mesh: dict[str, Any]) -> None:
    got: list[tuple[int, int]] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as node:
        def producer(k: int) -> None:
            for i in range(200):
                node.push("q", {"k": k, "i": i}, durable=True)

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert stored(tmp_path) == node.stats()["pipeline"]["durable_stored"] == 1600
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("q", lambda msg: got.append((msg.data["k"], msg.data["i"])), at_least_once=True)
        with puller:
            wait_until(lambda: len(got) >= 1600, 20, "every stored message")
    assert sorted(got) == [(k, i) for k in range(8) for i in range(200)]
    for k in range(8):  # each thread's messages in the order it pushed them
        assert [i for kk, i in got if kk == k] == list(range(200))


def test_durable_options_are_checked(tmp_path: Path, mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("plain", **mesh) as node:
        with pytest.raises(zmqmesh.ConfigError, match="store"):
            node.push("q", 1, durable=True)
        with pytest.raises(zmqmesh.ConfigError, match="store"):
            node.pull("q", print, at_least_once=True, dedupe=True)
        with pytest.raises(zmqmesh.ConfigError, match="at_least_once"):
            node.pull("q", print, max_deliveries=3)
        with pytest.raises(zmqmesh.ConfigError, match="ack_timeout_s"):
            node.pull("q", print, at_least_once=True, ack_timeout_s=0)
    for options in ({"store_max_bytes": 1.5e6}, {"store_max_bytes": True}, {"store": ""},
                    {"history": {"t.": {"max_age_s": float("nan")}}}, {"history": {"t.": {"max_age_s": True}}}):
        with pytest.raises(zmqmesh.ConfigError):  # (each silently lifted a bound, or put the store elsewhere)
            zmqmesh.Node("n", **{"store": str(tmp_path), **options}, **mesh)
    with zmqmesh.Node("stored", store=str(tmp_path), **mesh) as node:
        for window in (True, 2**63, 0):
            with pytest.raises(zmqmesh.ConfigError, match="dedupe_window"):
                node.pull("q", print, at_least_once=True, dedupe=True, dedupe_window=window)
        with pytest.raises(zmqmesh.ConfigError, match="durable_name"):  # (bytes decoded with surrogateescape)
            node.subscribe("t.", print, durable_name="\udc80")
        with pytest.raises(ValueError, match="UTF-8"):
            node.push("\udc80", 1)
        with pytest.raises(TypeError):
            node.push("q", 1, durable=True, headers={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError):
            node.push("q", 1, durable=True, headers={f"h{i}": "v" for i in range(100)})
        with pytest.raises(TypeError):
            node.push("q", object(), durable=True)
    assert stored(tmp_path) == 0


# -- messages that outlive processes ----------------------------------------------------------------

def test_a_store_bound_under_1_mib_is_refused_as_the_config_is_made() -> None:
    """``store_max_bytes=200_000`` made a config, then failed the node's start (the store
    takes 1 MiB at least), where a value out of range is refused as a config is made."""
    with pytest.raises(zmqmesh.ConfigError, match="store_max_bytes must be .* at least 1 MiB"):
        zmqmesh.NodeConfig(store_max_bytes=200_000)
    with pytest.raises(zmqmesh.ConfigError, match="store_max_bytes"):
        zmqmesh.NodeConfig(store_max_bytes=(1 << 20) - 1)
    assert zmqmesh.NodeConfig(store_max_bytes=1 << 20).store_max_bytes == 1 << 20


def test_durable_messages_wait_for_a_puller_and_survive_the_pushers_death(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    store, progress, out = tmp_path / "store", tmp_path / "progress", tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    pusher = worker("pusher", store, name, port, "jobs", 0, 2000, progress)
    procs.append(pusher)
    pusher.wait_for("pushed")  # no puller anywhere: no NoProviderError, all stored
    pusher.kill()
    assert stored(store) == 2000
    restarted = worker("pusher", store, name, port, "jobs", 2000, 2000, progress)
    procs.append(restarted)
    restarted.wait_for("pushed")
    puller = worker("puller", name, port, "jobs", out)
    procs.append(puller)
    wait_until(lambda: len(lines(out)) >= 4000, 30, "2000 messages at the puller")
    numbers = [n for _id, n in handled(out)]
    assert numbers == list(range(2000)), "FIFO, each once"
    wait_until(lambda: stored(store) == 0, 10, "acknowledged messages forgotten")


def test_100k_durable_pushes_survive_killed_pushers_and_a_killed_puller(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    total = 100_000
    store, progress, out = tmp_path / "store", tmp_path / "progress", tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    puller = worker("puller", name, port, "jobs", out)
    procs.append(puller)
    puller.wait_for("ready")
    first = 0
    # one push per call first, then push_many of 100 (segments acknowledged in part when killed)
    for kill_at, batch in ((total // 3, 0), (2 * total // 3, 100)):
        pusher = worker("pusher", store, name, port, "jobs", first, total, progress, batch)
        procs.append(pusher)
        wait_until(lambda kill_at=kill_at: len(lines(progress)) >= kill_at, 60, f"{kill_at} pushes")
        pusher.kill()
        first = int(lines(progress)[-1]) + 1
        if kill_at == total // 3:  # and the puller once, mid-stream
            puller.kill()
            puller = worker("puller", name, port, "jobs", out)
            procs.append(puller)
    pusher = worker("pusher", store, name, port, "jobs", first, total, progress, 100)
    procs.append(pusher)
    pusher.wait_for("pushed", 60)
    wait_until(lambda: {n for _id, n in handled(out)} >= set(range(total)), 60, "every message handled")
    wait_until(lambda: stored(store) == 0, 20, "every message acknowledged")
    numbers = Counter(n for _id, n in handled(out))
    assert set(numbers) == set(range(total)), "0 lost"
    pusher.close()
    puller.close()


def test_a_dedupe_puller_handles_nothing_twice_across_pusher_kills(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    total = 20_000
    store, puller_store = tmp_path / "store", tmp_path / "puller-store"
    progress, out = tmp_path / "progress", tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    puller = worker("puller", name, port, "jobs", out, puller_store)
    procs.append(puller)
    puller.wait_for("ready")
    first = 0
    for kill_at in (total // 3, 2 * total // 3):
        pusher = worker("pusher", store, name, port, "jobs", first, total, progress)
        procs.append(pusher)
        wait_until(lambda kill_at=kill_at: len(handled(out)) >= kill_at, 60, f"{kill_at} handled")
        pusher.kill()  # acknowledgements in flight are lost: those messages are dealt again
        first = int(lines(progress)[-1]) + 1
    pusher = worker("pusher", store, name, port, "jobs", first, total, progress)
    procs.append(pusher)
    pusher.wait_for("pushed", 60)
    wait_until(lambda: stored(store) == 0, 60, "every message acknowledged")
    ids = Counter(msg_id for msg_id, _n in handled(out))
    assert {n for _id, n in handled(out)} == set(range(total)), "0 lost"
    twice = [msg_id for msg_id, count in ids.items() if count > 1]
    assert twice == [], f"{len(twice)} message(s) handled twice"
    pusher.close()
    puller.close()


def test_a_dedupe_puller_running_handlers_at_once_handles_at_most_those_running_again_when_killed(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """With handler_concurrency=4 a handler returns on a worker thread, and its id was
    committed later, by the inbox's thread, after the completions queued before it: a kill
    caught hundreds of handled ids uncommitted (271 and 506 messages handled twice in two
    runs of 8 kills of 20,000 messages). The id is now committed on the handler's thread
    as it returns: a kill leaves at most the handlers running then to be handled again."""
    total, kills, concurrency = 20_000, 6, 4
    store, puller_store = tmp_path / "store", tmp_path / "puller-store"
    progress, out = tmp_path / "progress", tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    pusher = worker("pusher", store, name, port, "jobs", 0, total, progress, 50)
    procs.append(pusher)
    pusher.wait_for("ready")
    for kill in range(kills):
        puller = worker("puller", name, port, "jobs", out, puller_store, concurrency)
        procs.append(puller)
        at = (kill + 1) * total // (kills + 2)
        wait_until(lambda at=at: len(handled(out)) >= at, 60, f"{at} handled")
        puller.kill()
    puller = worker("puller", name, port, "jobs", out, puller_store, concurrency)
    procs.append(puller)
    pusher.wait_for("pushed", 60)
    wait_until(lambda: stored(store) == 0, 60, "every message acknowledged")
    ids = Counter(msg_id for msg_id, _n in handled(out))
    assert {n for _id, n in handled(out)} == set(range(total)), "0 lost"
    again = sum(count - 1 for count in ids.values())
    assert again <= kills * concurrency, f"{again} message(s) handled twice across {kills} kills"
    pusher.close()
    puller.close()


def test_a_puller_frozen_past_peer_timeout_gets_the_rest_once_it_is_back(
        tmp_path: Path, mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A dedupe puller stopped (SIGSTOP: a VM or GC pause) for longer than the peer timeout,
    with batches still unread in its socket, is taken for gone; once back, the pusher
    connected to it again under the same routing id, which the puller's socket refused
    while the old connection held unread batches: every batch sent on was dropped without
    a word, and the queue waited for good (7,656 of 20,000 handled, 13,344 stuck in the
    store after 150 s, redeliveries on ack timeouts likewise lost). Each connection to a
    puller now has a routing id of its own."""
    total = 20_000
    store, puller_store, out = tmp_path / "store", tmp_path / "puller-store", tmp_path / "out"
    port, name = mesh["beacon_port"], mesh["mesh"]
    puller = worker("puller", name, port, "jobs", out, puller_store)
    procs.append(puller)
    puller.wait_for("ready")
    with zmqmesh.Node("pusher", store=str(store), mesh=name, beacon_port=port) as pusher:
        pusher.wait_for_pullers("jobs", 1)
        pusher.push_many("jobs", [{"n": i} for i in range(total)], durable=True)
        wait_until(lambda: len(handled(out)) >= total // 4, 60, "a quarter handled")
        puller.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not pusher.peers(), 30, "the puller taken for gone")
        finally:
            puller.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: stored(store) == 0, 60, "every message acknowledged")
    assert {n for _id, n in handled(out)} == set(range(total)), "0 lost"
    puller.close()


# -- failures -----------------------------------------------------------------------------------

def test_a_poison_message_lands_in_the_dead_letter_queue(tmp_path: Path, mesh: dict[str, Any]) -> None:
    attempts: list[int] = []
    dead: list[zmqmesh.Message] = []
    good: list[str] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        puller = zmqmesh.Node("puller", **mesh)

        @puller.pull("orders", at_least_once=True, max_deliveries=3)
        def handle(msg: zmqmesh.Message) -> None:
            if msg.data == "poison":
                attempts.append(msg.attempts)
                raise ValueError("cannot parse this order")
            good.append(msg.data)

        puller.pull("orders.dead", dead.append, at_least_once=True)
        with puller:
            for data in ("a", "poison", "b"):
                pusher.push("orders", data, durable=True, headers={"origin": "test"})
            wait_until(lambda: dead, 20, "a dead letter")
    assert attempts == [0, 1, 2]
    assert good == ["a", "b"]
    (letter,) = dead
    assert letter.data == "poison"
    assert letter.headers["origin"] == "test"
    assert letter.headers["x-original-queue"] == "orders"
    assert letter.headers["x-attempts"] == "3"
    assert "ValueError: cannot parse this order" in letter.headers["x-last-error"]
    assert pusher.stats()["pipeline"]["dead_lettered"] == 1
    assert stored(tmp_path) == 0


@pytest.mark.timeout(60)
def test_a_dead_letter_moved_while_a_thread_pushes_to_its_queue_is_still_delivered(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A message given up on is moved to "jobs.dead" (in the store) on the pusher's I/O
    thread while another thread pushes durably to "jobs.dead" itself, the push committing
    just after the move: both reach the puller of "jobs.dead". The real `Store.move` is
    wrapped to hold the I/O thread right after it, until the push either committed or
    waits for its turn. (Before: the move was noted only after it, in a second hold of the
    queues' lock; the push committed in between went to the buffer with a later number,
    the queue was taken for read up to it, and the moved message was never read back:
    "direct" delivered, "poison" left in the store until a restart.)"""
    dead: list[Any] = []
    puller = zmqmesh.Node("puller", **mesh)

    @puller.pull("jobs", at_least_once=True, max_deliveries=1)
    def handle(msg: zmqmesh.Message) -> None:
        raise ValueError("no")

    puller.pull("jobs.dead", lambda msg: dead.append(msg.data), at_least_once=True)
    moved, pushed = threading.Event(), threading.Event()
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        durable = pusher._engine.durable  # (the node's own queues and store: nothing public reaches the move)
        real_move = durable.store.move

        def move(*args: Any) -> int:
            new = real_move(*args)
            if not moved.is_set():
                moved.set()
                # until the push committed, or waits for the queues' lock (held here, mended)
                deadline = time.monotonic() + 10
                while not pushed.is_set() and not (durable._gathered and durable._lock.locked()) \
                        and time.monotonic() < deadline:
                    time.sleep(0.001)
            return int(new)

        durable.store.move = move
        pusher.wait_for_pullers("jobs", 1, timeout=10)
        pusher.wait_for_pullers("jobs.dead", 1, timeout=10)
        pusher.push("jobs", "poison", durable=True)
        wait_until(moved.is_set, 20, "the move to the dead-letter queue")
        pusher.push("jobs.dead", "direct", durable=True)
        pushed.set()
        wait_until(lambda: "direct" in dead, 20, "the message pushed to the dead-letter queue")
        wait_until(lambda: "poison" in dead, 10, "the dead letter moved before it")
        wait_until(lambda: stored(tmp_path) == 0, 20, "nothing left stored")
    assert sorted(dead) == ["direct", "poison"]


def test_a_dead_letter_of_a_message_with_all_the_headers_it_may_carry_is_delivered(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A message with 64 headers, or 16 KiB of them, dead-lettered: its x- headers fit in
    place of some of its own, and the dead letters reach their puller (before, the three x-
    headers made the dead letter one its puller refused, and every batch it was dealt in
    with it: none of the dead letters was ever delivered)."""
    dead: list[zmqmesh.Message] = []
    puller = zmqmesh.Node("puller", **mesh)

    @puller.pull("orders", at_least_once=True, max_deliveries=1)
    def handle(msg: zmqmesh.Message) -> None:
        raise ValueError("no")

    puller.pull("orders.dead", dead.append, at_least_once=True)
    many = {f"h{i}": "v" for i in range(64)}
    large = {"a": "v", "big": "v" * (16 * 1024 - 5)}
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.push("orders", "many", durable=True, headers=many)
        pusher.push("orders", "large", durable=True, headers=large)
        pusher.push("orders", "plain", durable=True)
        wait_until(lambda: len(dead) == 3, 20, "three dead letters")
        wait_until(lambda: stored(tmp_path) == 0, 20, "nothing left stored")
    letters = {msg.data: msg.headers for msg in dead}
    assert set(letters) == {"many", "large", "plain"}
    for headers in letters.values():
        assert headers["x-original-queue"] == "orders" and headers["x-attempts"] == "1"
    assert len(letters["many"]) == 64 and letters["many"]["h60"] == "v"
    assert letters["large"]["a"] == "v" and "big" not in letters["large"]
    assert puller.stats()["rejected"].get("service_malformed", 0) == 0


def test_a_dead_letter_queue_that_is_the_queue_itself_is_refused(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """pull(..., dead_letter=<the queue itself>) was accepted: a message given up on moved
    to the end of the queue it failed in, with its attempts reset, and was dealt again
    without end (measured: a poison message with max_deliveries=1 ran 4,004 times in 2 s,
    dead_lettered 4,003, a store write and a warning each). `zmqmesh store dead-letters`
    refuses such a move already. A dead-letter queue named as a built-in (beginning
    ``\\x00``) was taken too, where every pusher sends such dead letters to "jobs.dead"."""
    runs: list[int] = []

    def poison(msg: zmqmesh.Message) -> None:
        runs.append(msg.attempts)
        raise ValueError("poison")

    puller = zmqmesh.Node("puller", **mesh)
    with pytest.raises(zmqmesh.ConfigError, match="dead_letter"):
        puller.pull("jobs", poison, at_least_once=True, max_deliveries=1, dead_letter="jobs")
    # nor a built-in's name, which pull took though its pushers send such dead letters to "jobs.dead"
    with pytest.raises(ValueError, match="reserved"):
        puller.pull("jobs", poison, at_least_once=True, max_deliveries=1, dead_letter="\x00stats")
    puller.pull("jobs", poison, at_least_once=True, max_deliveries=1, dead_letter="jobs.poison")
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.wait_for_pullers("jobs")
        pusher.push("jobs", {"n": 1}, durable=True)
        wait_until(lambda: inspect_store(tmp_path)["queues"].get("jobs.poison", {}).get("messages") == 1, 20,
                   "the dead letter")
    assert runs == [0] and stored(tmp_path) == 1


def test_a_queue_whose_dead_letter_queue_could_not_be_named_asks_for_one(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """The dead letters of a queue go to "<queue>.dead" by default: for a queue name of 196
    to 200 bytes, a name past the 200 bytes pull() takes. pull(at_least_once=True) took such
    a queue, and its dead letters went where no puller could take them (measured: the
    poison message of a 200-byte queue in "q...q.dead", and pull("q...q.dead") raised
    ValueError); it now asks for dead_letter=."""
    queue = "q" * 200
    dead: list[Any] = []

    def poison(msg: zmqmesh.Message) -> None:
        raise ValueError("poison")

    puller = zmqmesh.Node("puller", **mesh)
    with pytest.raises(zmqmesh.ConfigError, match="dead_letter="):
        puller.pull(queue, poison, at_least_once=True)
    puller.pull("q" * 195, print, at_least_once=True)  # ("q" * 195 + ".dead" is 200 bytes: a name)
    puller.pull(queue, poison, at_least_once=True, max_deliveries=1, dead_letter="long.dead")
    puller.pull("long.dead", lambda msg: dead.append(msg.headers["x-original-queue"]), at_least_once=True)
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.wait_for_pullers(queue)
        pusher.push(queue, {"n": 1}, durable=True)
        wait_until(lambda: dead, 20, "the dead letter")
    assert dead == [queue]


def test_a_poison_message_in_a_batch_is_dead_lettered_alone(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """One message of a `push_many` batch (stored together) moves to the dead letters; the
    others are handled once, and a restart of the pusher delivers nothing again."""
    good: list[str] = []
    dead: list[str] = []
    puller = zmqmesh.Node("puller", **mesh)

    @puller.pull("orders", at_least_once=True, max_deliveries=2)
    def handle(msg: zmqmesh.Message) -> None:
        if msg.data == "poison":
            raise ValueError("no")
        good.append(msg.data)

    with puller:
        with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
            pusher.push_many("orders", ["a", "poison", "b", "c"], durable=True)
            wait_until(lambda: stored(tmp_path) == 1 and len(good) == 3, 20, "the poison message dead-lettered")
        assert inspect_store(tmp_path)["queues"] == {"orders.dead": inspect_store(tmp_path)["queues"]["orders.dead"]}
        puller.pull("orders.dead", lambda msg: dead.append(msg.data), at_least_once=True)
        with zmqmesh.Node("pusher", store=str(tmp_path), **mesh):
            wait_until(lambda: dead, 20, "the dead letter")
            wait_until(lambda: stored(tmp_path) == 0, 20, "nothing left stored")
    assert sorted(good) == ["a", "b", "c"]
    assert dead == ["poison"]


def test_durable_batches_of_any_size_reach_an_in_place_handler_as_the_same_messages(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """Below 16 items a durable batch is made into messages item by item, from 16 as columns
    (`_COLUMNS_FROM`): on both sides of that line a handler run in place gets the same
    messages, with their ids, timestamps, attempts and marks, one batch at a time."""
    got: list[zmqmesh.Message] = []
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("orders", got.append, at_least_once=True)
    sizes = (1, 2, 15, 16, 17, 40)
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.wait_for_pullers("orders", 1, timeout=10)
        for size in sizes:
            before, pushed_at = len(got), time.time()
            pusher.push_many("orders", [{"size": size, "n": n} for n in range(size)], durable=True)
            wait_until(lambda size=size, before=before: len(got) == before + size, 20, f"a batch of {size}")
            batch = got[before:]
            assert [m.data for m in batch] == [{"size": size, "n": n} for n in range(size)]
            for msg in batch:
                assert (msg.pattern, msg.queue, msg.redelivered, msg.attempts, msg.headers) == \
                    ("pipeline", "orders", False, 0, {}), size
                assert msg.sender is not None and msg.sender.name == "pusher"
                assert type(msg.timestamp) is float and pushed_at - 1 <= msg.timestamp <= time.time() + 1, size
            assert len({m.id for m in batch}) == size and all(m.id for m in batch), size
        wait_until(lambda: stored(tmp_path) == 0, 20, "every batch acknowledged")
    assert len({m.id for m in got}) == sum(sizes)


def test_a_poison_message_the_full_store_cannot_dead_letter_waits_and_moves_once_there_is_room(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The store is full, so the move of a message given up on to its dead-letter queue
    fails: it is neither lost nor dealt again at once (its puller would give up at once,
    in a loop that filled the log), but kept and moved when room is made, the failures
    logged a few times and counted."""
    import logging

    caplog.set_level(logging.ERROR, logger="zmqmesh")
    attempts: list[int] = []
    dead: list[str] = []
    fillers: list[int] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), store_max_bytes=1 << 20, **mesh) as pusher:
        pusher.push_many("orders", ["poison", "ok"], durable=True)  # (one segment: no move in place)
        for size in (20_000, 100):  # (full to the last page)
            with pytest.raises(zmqmesh.StoreFullError):
                for _ in range(1000):
                    pusher.push("filler", b"\0" * size, durable=True)
        puller = zmqmesh.Node("puller", **mesh)

        @puller.pull("orders", at_least_once=True, max_deliveries=3)
        def handle(msg: zmqmesh.Message) -> None:
            attempts.append(msg.attempts)
            if msg.data == "poison":
                raise ValueError("cannot parse this order")

        puller.pull("orders.dead", lambda msg: dead.append(msg.data), at_least_once=True)
        with puller:
            wait_until(lambda: pusher.stats()["pipeline"].get("dead_letter_failed", 0) >= 1, 20, "a failed move")
            time.sleep(3.0)
            failed = pusher.stats()["pipeline"]["dead_letter_failed"]
            assert 1 <= failed <= 5, failed  # tried again 0.5, 1 and 2 s later: not in a loop
            assert attempts.count(2) == 1 and len(attempts) == 4  # (ok once; poison 3 times, never again)
            assert sum("cannot dead-letter" in r.getMessage() for r in caplog.records) == failed
            assert not dead and pusher.stats()["pipeline"].get("dead_lettered", 0) == 0
            puller.pull("filler", lambda msg: fillers.append(1), at_least_once=True)  # room is made
            wait_until(lambda: dead == ["poison"], 40, "the dead letter, once the store had room")
        assert pusher.stats()["pipeline"]["dead_lettered"] == 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test: a disk that fills up (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("this machine does not let the test mount a tmpfs")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with a file, but for about ``leave`` bytes; the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # (unbuffered: a file object's close
    try:  # flushed what a full disk refused once more, and raised, depending on where the disk filled)
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_start_that_fails_on_a_full_disk_lets_the_store_go(small_disk: Path, mesh: dict[str, Any]) -> None:
    """Starting trims what a dedupe puller remembers; on a full disk that fails, and the
    start fails (StoreFullError): the store must not stay locked (the next start, once
    there is room, found it "in use by another node")."""
    store = small_disk / "store"
    handled: list[int] = []
    node = zmqmesh.Node("puller", store=str(store), **mesh)
    node.pull("q", lambda msg: handled.append(msg.data), at_least_once=True, dedupe=True, dedupe_window=10)
    with node, zmqmesh.Node("pusher", store=str(small_disk.parent / "pusher"), **mesh) as pusher:
        pusher.push_many("q", list(range(300)), durable=True)  # (durable: ids the puller remembers)
        wait_until(lambda: len(handled) == 300, 20, "300 messages handled")
    assert inspect_store(store)["handled"]["q"] > 10
    filler = fill(small_disk)

    def puller() -> zmqmesh.Node:
        again = zmqmesh.Node("puller", store=str(store), **mesh)
        again.pull("q", print, at_least_once=True, dedupe=True, dedupe_window=10)
        return again

    with pytest.raises(zmqmesh.StoreFullError):
        puller().start()
    filler.unlink()
    with puller():  # room again: it starts, the store was let go
        pass
    assert inspect_store(store)["handled"]["q"] <= 11  # (trimmed at the start: "about" the window)


def test_a_store_on_a_read_only_filesystem_is_a_store_error_naming_it(small_disk: Path, mesh: dict[str, Any]) -> None:
    """A store on a filesystem mounted read-only cannot be opened: `StoreError` naming the
    store and the cause, as for any store that cannot be opened (before, `ConfigError`, from
    its lock file, or from the directory it could not make), and the node does not start."""
    made = small_disk / "made"
    with zmqmesh.Node("pusher", store=str(made), **mesh) as pusher:
        pusher.push("q", 1, durable=True)
    if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode != 0:
        pytest.skip("this machine does not let the test remount its tmpfs read-only")
    for store in (made, small_disk / "missing"):
        node = zmqmesh.Node("pusher", store=str(store), **mesh)
        with pytest.raises(zmqmesh.StoreError) as raised:
            node.start()
        assert not isinstance(raised.value, zmqmesh.ConfigError), repr(raised.value)
        assert str(store) in str(raised.value) and "Read-only file system" in str(raised.value), raised.value
        assert not node.running
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert inspect_store(made)["queues"]["q"]["messages"] == 1  # (nothing of it was touched)


@pytest.mark.timeout(60)
def test_ids_a_full_disk_keeps_a_dedupe_puller_from_recording_are_counted_and_logged_once(
        small_disk: Path, tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A dedupe puller whose store is full handles and acknowledges what comes, and cannot
    record the ids: each is counted (`pipeline.dedupe_unrecorded`), and the log says so
    once, not once a message (before: 3,000 messages, 3,000 error lines and no counter).
    (A few commits may still fit in pages the store had already: under load, 30 to 70 of
    the 2,000 ids were recorded. Each id is either recorded or counted.)"""
    import logging

    caplog.set_level(logging.ERROR, logger="zmqmesh")
    got: list[int] = []
    node = zmqmesh.Node("puller", store=str(small_disk / "store"), **mesh)
    node.pull("q", lambda msg: got.append(msg.data), at_least_once=True, dedupe=True)
    with node, zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), **mesh) as pusher:
        filler = fill(small_disk)
        pusher.push_many("q", list(range(2000)), durable=True)
        wait_until(lambda: len(got) == 2000, 30, "2000 messages handled")
        wait_until(lambda: stored(tmp_path / "pusher") == 0, 20, "every message acknowledged")
        unrecorded = node.stats()["pipeline"]["dedupe_unrecorded"]
        filler.unlink()
    recorded = inspect_store(small_disk / "store")["handled"].get("q", 0)
    assert unrecorded + recorded == 2000 and unrecorded >= 1000, (unrecorded, recorded)
    lines = [r for r in caplog.records if "as handled" in r.getMessage()]
    assert len(lines) == 1, f"{len(lines)} log lines for the ids unrecorded"



def test_a_dedupe_window_trim_that_fails_counts_no_id_unrecorded_and_is_tried_again(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A dedupe puller trims its window of handled ids now and then; a trim the store
    refused (full) was counted as the id it came after being unrecorded, though that id was
    recorded (`dedupe_unrecorded` 1 for each failed trim, none unrecorded), and the next trim
    waited a whole round more. Now a failed trim is logged (at most every 10 s) and tried
    again with the next id remembered."""
    import logging

    import zmqmesh._patterns.intake
    from zmqmesh._store.handled import Handled

    caplog.set_level(logging.ERROR, logger="zmqmesh")
    monkeypatch.setattr(zmqmesh._patterns.intake, "_TRIM_EVERY", 10)
    real_trim, refusing = Handled.trim, [False]  # (not at the start, which trims too: the start would fail)

    def trim(self: Handled, queue: str, keep: int) -> None:
        if refusing[0]:
            raise zmqmesh.StoreFullError("the store is full (a test)")
        real_trim(self, queue, keep)

    monkeypatch.setattr(Handled, "trim", trim)
    got: list[int] = []
    node = zmqmesh.Node("puller", store=str(tmp_path / "puller"), **mesh)
    node.pull("q", lambda msg: got.append(msg.data), at_least_once=True, dedupe=True, dedupe_window=5)
    with node, zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), **mesh) as pusher:
        refusing[0] = True
        pusher.push_many("q", list(range(30)), durable=True)
        wait_until(lambda: len(got) == 30, 30, "30 messages handled")
        assert node.stats()["pipeline"].get("dedupe_unrecorded", 0) == 0, "every id was recorded"
        assert inspect_store(tmp_path / "puller")["handled"]["q"] == 30, "not trimmed: the store refused"
        refusing[0] = False
        pusher.push("q", 30, durable=True)
        wait_until(lambda: len(got) == 31, 30, "the next message handled")
        wait_until(lambda: inspect_store(tmp_path / "puller")["handled"]["q"] <= 6, 10, "the window trimmed")
    assert len([r for r in caplog.records if "cannot trim" in r.getMessage()]) == 1

def test_messages_handled_while_the_disk_is_full_are_forgotten_once_it_has_room(
        small_disk: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The write that forgets handled messages fails on a full disk: it is tried again, so
    once there is room they leave the store (and a restart delivers none of them again)."""
    import logging

    caplog.set_level(logging.ERROR, logger="zmqmesh")
    store = small_disk / "store"
    filler = small_disk / "filler"
    got: list[int] = []
    with zmqmesh.Node("pusher", store=str(store), **mesh) as pusher:
        pusher.push("q", -1, durable=True)  # (the store's files exist)
        fill(small_disk, leave=200_000)  # the disk fills up, but for some 200 KB
        accepted = 0
        with pytest.raises(zmqmesh.StoreFullError):
            for i in range(1000):
                pusher.push("q", {"i": i, "pad": "x" * 1000}, durable=True)
                accepted += 1
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
        with puller:
            wait_until(lambda: len(got) == accepted + 1, 20, "every stored message handled")
            wait_until(lambda: "cannot forget" in caplog.text, 20, "the write that forgets them, failing")
            assert stored(store) == accepted + 1
            filler.unlink()  # room again
            wait_until(lambda: stored(store) == 0, 30, "the handled messages forgotten")
    again: list[Any] = []
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("q", again.append, at_least_once=True)
    with puller, zmqmesh.Node("pusher", store=str(store), **mesh):
        time.sleep(1.0)
    assert again == []


def test_a_stuck_handlers_message_goes_to_another_puller_after_the_ack_timeout(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    release = threading.Event()
    seen: list[tuple[str, int, bool]] = []
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        stuck = zmqmesh.Node("stuck", **mesh)

        @stuck.pull("slow", at_least_once=True, ack_timeout_s=0.5)
        def hang(msg: zmqmesh.Message) -> None:
            seen.append(("stuck", msg.attempts, msg.redelivered))
            release.wait(10)

        with stuck:
            pusher.wait_for_pullers("slow", 1)
            pusher.push("slow", "job", durable=True)
            wait_until(lambda: seen, 10, "the stuck handler to start")
            healthy = zmqmesh.Node("healthy", **mesh)

            @healthy.pull("slow", at_least_once=True, ack_timeout_s=0.5)
            def work(msg: zmqmesh.Message) -> None:
                seen.append(("healthy", msg.attempts, msg.redelivered))

            with healthy:
                wait_until(lambda: len(seen) == 2, 10, "the redelivery")
                release.set()
                wait_until(lambda: stored(tmp_path) == 0, 10, "the acknowledgement")
    assert seen[0] == ("stuck", 0, False)
    # (on a slow host the timeout may first send it back to the only puller there, stuck:
    # healthy then gets a later attempt, and stuck, released, the copy it was sent)
    assert seen[1][0] == "healthy" and seen[1][1] >= 1 and seen[1][2]
    assert all(redelivered for _name, _attempts, redelivered in seen[1:])


# -- keepers and the command line -----------------------------------------------------------------

def test_a_stopping_pusher_hands_its_messages_to_a_keeper(tmp_path: Path, mesh: dict[str, Any]) -> None:
    got: list[tuple[Any, str, dict[str, str]]] = []
    keeper = zmqmesh.Node("keeper", store=str(tmp_path / "keeper"), **mesh)
    keeper.keep("orders")
    with keeper:
        with zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), **mesh) as pusher:
            pusher.wait_for_keepers("orders")
            pusher.push("orders", {"n": 0}, durable=True, headers={"batch": "7"})
            pusher.push_many("orders", [{"n": i} for i in range(1, 300)], durable=True, headers={"batch": "7"})
        assert stored(tmp_path / "pusher") == 0, "handed over"
        assert stored(tmp_path / "keeper") == 300
        puller = zmqmesh.Node("late-puller", **mesh)
        puller.pull("orders", lambda m: got.append((m.data["n"], m.id, m.headers)), at_least_once=True)
        with puller:
            wait_until(lambda: len(got) == 300, 20, "the kept messages")
            wait_until(lambda: stored(tmp_path / "keeper") == 0, 10, "the keeper's acknowledgements")
    assert [n for n, _id, _h in got] == list(range(300))
    ids = {msg_id for _n, msg_id, _h in got}  # (a call of more than 256 takes two runs of ids)
    assert len(ids) == 300 and all(msg_id.startswith(got[0][1].split("-")[0]) for msg_id in ids)
    assert all(h == {"batch": "7"} for _n, _id, h in got)


def test_a_keeper_keeps_the_attempts_and_the_redelivered_mark_of_what_it_is_handed(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """The hand-over as docs/protocol.md states it, from a bare DEALER: durable items with
    attempts counted, or marked redelivered, reach the keeper's pullers so, whether the
    keeper stored them with nobody pulling (read back later) or with a puller there."""
    keeper = zmqmesh.Node("keeper", store=str(tmp_path), **mesh)
    keeper.keep("orders")
    got: list[tuple[Any, str, int, bool, dict[str, str]]] = []
    ctx = zmq.Context()

    def items(first: int) -> bytes:  # (n, redelivered, attempts): none, a mark, attempts
        return b"".join(msgpack.packb([flag, {"n": n}, f"order-{n}", 1700000000.0 + n, {"k": "v"}, tries])
                        for n, flag, tries in [(first, False, 0), (first + 1, True, 0), (first + 2, False, 2)])

    def hand_over(dealer: zmq.Socket[bytes], queue: bytes, first: int) -> list[bytes]:
        dealer.send_multipart([b"\x00keep/" + queue, b"h", items(first)])
        assert dealer.poll(5000)
        return dealer.recv_multipart()

    try:
        with keeper:
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(keeper.endpoints["service"])
            assert hand_over(dealer, b"orders", 0) == [b"h", b"\x00", b""]
            assert hand_over(dealer, b"other", 0)[:2] == [b"h", b"\x02"]
            assert stored(tmp_path) == 3
            puller = zmqmesh.Node("puller", **mesh)
            puller.pull("orders", lambda m: got.append((m.data["n"], m.id, m.attempts, m.redelivered, m.headers)),
                        at_least_once=True, max_deliveries=5)
            with puller:
                wait_until(lambda: len(got) == 3, 20, "the kept messages")
                keeper.wait_for_pullers("orders")
                assert hand_over(dealer, b"orders", 3) == [b"h", b"\x00", b""]
                wait_until(lambda: len(got) == 6, 20, "the messages kept with a puller there")
    finally:
        ctx.destroy(linger=0)
    assert got == [(n, f"order-{n}", 2 if n % 3 == 2 else 0, n % 3 != 0, {"k": "v"}) for n in range(6)]


@pytest.mark.parametrize("stamp", [float("inf"), -float("inf"), float("nan"), 1700000000.0],
                         ids=["inf", "-inf", "nan", "finite"])
def test_a_kept_message_whose_clock_is_no_finite_number_is_dealt_again_when_its_handler_fails(
        tmp_path: Path, mesh: dict[str, Any], ctx: Any, stamp: float) -> None:
    """A stranger's hand-over (docs/protocol.md) of a durable item whose timestamp is an
    infinity or NaN: the keeper stores it, and its puller's handler sees no timestamp. The
    puller took a message without one for no durable item: a failure of its handler went
    back to nobody (the batch was acknowledged as handled, and the keeper forgot the
    message: its store empty, no dead letter), and a dedupe puller recorded no id of it.
    (A NaN, which SQLite stores as NULL, failed the keeper's store write: answered 0x01, as
    a full store is, and logged as an error, each time.)"""
    keeper = zmqmesh.Node("keeper", store=str(tmp_path / "keeper"), **mesh)
    keeper.keep("orders")
    tries: list[tuple[float | None, int]] = []

    def fail_once(msg: zmqmesh.Message) -> None:
        tries.append((msg.timestamp, msg.attempts))
        if msg.attempts == 0:
            raise ValueError("refused")

    with keeper:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(keeper.endpoints["service"])
        dealer.send_multipart([b"\x00keep/orders", b"h", msgpack.packb([False, {"n": 1}, "order-1", stamp, None, 0])])
        assert dealer.poll(5000)
        assert dealer.recv_multipart() == [b"h", b"\x00", b""]
        dealer.close(0)
        puller = zmqmesh.Node("puller", store=str(tmp_path / "puller"), **mesh)
        puller.pull("orders", fail_once, at_least_once=True, dedupe=True)
        with puller:
            wait_until(lambda: stored(tmp_path / "keeper") == 0 and keeper.stats()["pipeline"]["sent"] > 0, 20,
                       "the keeper's message settled")
            wait_until(lambda: len(tries) == 2, 20, "the message dealt again")
    shown = None if stamp != 1700000000.0 else stamp
    assert tries == [(shown, 0), (shown, 1)]
    assert inspect_store(tmp_path / "puller")["handled"] == {"orders": 1}


@pytest.mark.parametrize("attempts", [2**63, 2**64 - 1])
def test_a_hand_over_whose_attempts_no_store_holds_is_malformed_not_a_store_failure(
        tmp_path: Path, mesh: dict[str, Any], ctx: Any, caplog: pytest.LogCaptureFixture, attempts: int) -> None:
    """A stranger hands a keeper a durable item counting more attempts than SQLite's
    INTEGER holds (msgpack carries up to 2**64 - 1): the batch is no batch of durable items,
    answered 0x03 and counted (``rejected["service_malformed"]``), and nothing is stored.
    (Before: the keeper's store write failed on it, answered 0x01, as a full store is, so
    a pusher would rest the keeper and try again, and each such hand-over logged an error.)"""
    keeper = zmqmesh.Node("keeper", store=str(tmp_path), **mesh)
    keeper.keep("orders")
    with keeper:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(keeper.endpoints["service"])
        dealer.send_multipart([b"\x00keep/orders", b"h",
                               msgpack.packb([False, {"n": 1}, "order-1", 1700000000.0, None, attempts])])
        assert dealer.poll(5000)
        answer = dealer.recv_multipart()
        dealer.close(0)
        malformed = keeper.stats()["rejected"].get("service_malformed", 0)
    assert answer == [b"h", b"\x03", b""]
    assert malformed == 1
    assert stored(tmp_path) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_kept_queues_count_among_a_nodes_offers(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """Each kept queue is a ZRE group in the node's HELLO, as each topic, queue and service
    is, and a peer takes at most 10,000 groups in a HELLO; the bound of names a node offers
    (MAX_OFFERS) left keep() out. Measured: a keeper of 10,500 queues: keep() took them
    all, and every peer refused its HELLO (rejected zre_malformed), so no peer ever saw it
    (wait_for_peers timed out): it kept nothing. keep() now counts in the bound."""
    most = zmqmesh._mesh.registry.MAX_OFFERS
    keeper = zmqmesh.Node("keeper", store=str(tmp_path / "keeper"), **mesh)
    for i in range(most - 1):
        keeper.keep(f"q{i}")
    keeper.pull("last", print, at_least_once=True)
    with pytest.raises(zmqmesh.ConfigError, match="kept queues"):
        keeper.keep("one-more")
    with pytest.raises(zmqmesh.ConfigError, match="kept queues"):
        keeper.pull("another", print)
    keeper.keep("q0")  # (one kept already: no more names)
    with keeper, zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), **mesh) as pusher:
        pusher.wait_for_keepers(f"q{most - 2}", timeout=20)
        pusher.wait_for_pullers("last")


def test_a_keeper_whose_stop_has_begun_takes_no_hand_over(tmp_path: Path, mesh: dict[str, Any], ctx: Any) -> None:
    """A keeper that stops hands what it keeps to the other keepers; one whose stop has
    begun took hand-overs all the same, so two keepers stopping at once passed their
    messages back and forth until their stops' deadline (measured, 2 keeper processes of
    20,000 messages stopped together, linger_s=1: "kept" counted 52,000 to 62,000 at each,
    and in 3 runs of 7 a batch in flight at the deadline ended stored by both: 232, 256 and
    744 messages delivered twice). It now answers "no such service": the pusher keeps them
    or gives them to another keeper. Here the keeper's stop waits for a handler, and a
    hand-over reaches it then."""
    keeper = zmqmesh.Node("keeper", store=str(tmp_path), handler_concurrency=2, **mesh)
    keeper.keep("orders")
    started, release = threading.Event(), threading.Event()
    keeper.pull("slow", lambda msg: (started.set(), release.wait(30)))
    stopping = threading.Thread(target=keeper.stop, kwargs={"timeout": 30})
    with keeper, zmqmesh.Node("pusher", **mesh) as pusher:
        pusher.wait_for_pullers("slow")
        pusher.push("slow", 1)
        assert started.wait(10)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(keeper.endpoints["service"])
        try:
            stopping.start()
            wait_until(lambda: not keeper.running, 10, "the keeper's stop begun")
            dealer.send_multipart([b"\x00keep/orders", b"h",
                                   msgpack.packb([False, {"n": 1}, "order-1", 1700000000.0, None, 0])])
            assert dealer.poll(10_000), "no answer"
            assert dealer.recv_multipart()[:2] == [b"h", b"\x02"], "a stopping keeper took a hand-over"
        finally:
            dealer.close(0)
            release.set()
            if stopping.is_alive():
                stopping.join(30)
    assert stored(tmp_path) == 0


def test_what_a_stopping_keeper_refuses_goes_to_the_other_keeper_within_the_pushers_stop(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A keeper whose stop has begun stays in its group (zmqmesh/keep/<queue>) until its
    goodbye, refusing hand-overs (0x02), and the pusher rests it 2 s. The other keeper must
    get what it refused within the pusher's stop, not after it (measured: 2 keepers, one held
    in its stop by a handler, a pusher stopping with 2,000 durable messages: the stopping
    keeper was dealt 430-600 of them and refused them, the other kept all 2,000, none left
    with the pusher, in 3 runs of 3: the refusal costs one round trip, not the 2 s rest)."""
    stopping = zmqmesh.Node("keeper-stopping", store=str(tmp_path / "stopping"), handler_concurrency=2, **mesh)
    stopping.keep("orders")
    started, release = threading.Event(), threading.Event()
    stopping.pull("slow", lambda msg: (started.set(), release.wait(30)))  # (holds its stop)
    other = zmqmesh.Node("keeper-other", store=str(tmp_path / "other"), **mesh)
    other.keep("orders")
    stopper = threading.Thread(target=stopping.stop, kwargs={"timeout": 30})
    try:
        with stopping, other:
            pusher = zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), **mesh)
            with pusher:
                pusher.wait_for_keepers("orders", 2)
                pusher.wait_for_pullers("slow")
                pusher.push_many("orders", [{"n": n} for n in range(2000)], durable=True)
                pusher.push("slow", 1)
                assert started.wait(10)
                stopper.start()
                wait_until(lambda: not stopping.running, 10, "the keeper's stop begun")
            assert stored(tmp_path / "pusher") == 0, "left with the pusher"
            assert stored(tmp_path / "other") == 2000
            release.set()  # (the stopping keeper's stop ends now)
    finally:
        release.set()
        if stopper.is_alive():
            stopper.join(30)
    assert stored(tmp_path / "stopping") == 0


def test_a_keeper_whose_store_refuses_a_hand_over_leaves_it_to_another_or_to_the_pusher(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A keeper that cannot store what it is handed (its store fills) says so; what it
    refused stays in the pusher's store, and goes to another keeper at the pusher's next
    stop: nothing is lost, nothing is stored twice."""
    blob = b"\0" * 50_000
    full = zmqmesh.Node("full-keeper", store=str(tmp_path / "full"), store_max_bytes=1 << 20, **mesh)
    full.keep("orders")
    with full:
        with zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), linger_s=3, **mesh) as pusher:
            pusher.wait_for_keepers("orders")
            pusher.push_many("orders", [{"n": n, "blob": blob} for n in range(40)], durable=True)
        taken = stored(tmp_path / "full")
        assert taken < 40 and stored(tmp_path / "pusher") == 40 - taken, "what it refused, kept by the pusher"
        assert full.stats()["pipeline"].get("kept", 0) == taken

        healthy = zmqmesh.Node("keeper", store=str(tmp_path / "healthy"), **mesh)
        healthy.keep("orders")
        with healthy:
            with zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), linger_s=10, **mesh) as pusher:
                pusher.wait_for_keepers("orders", 2)
            assert stored(tmp_path / "pusher") == 0, "handed over"
            assert stored(tmp_path / "healthy") == 40 - taken and stored(tmp_path / "full") == taken
            got: list[int] = []
            puller = zmqmesh.Node("puller", **mesh)
            puller.pull("orders", lambda m: got.append(m.data["n"]), at_least_once=True)
            with puller:
                wait_until(lambda: len(got) == 40, 20, "the kept messages")
    assert sorted(got) == list(range(40))


def test_a_stopping_pusher_hands_a_killed_pullers_messages_to_a_keeper_marked_redelivered(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A puller killed holding a batch: its queue has nobody to deal the batch to again, so
    the pusher's stop does not wait for it but hands it to the keeper; the keeper keeps
    the mark, and its next puller gets those messages as redelivered (the killed puller
    may have handled them)."""
    out = tmp_path / "stuck.out"
    keeper = zmqmesh.Node("keeper", store=str(tmp_path / "keeper"), **mesh)
    keeper.keep("orders")
    got: dict[int, bool] = {}
    with keeper:
        pusher = zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), linger_s=30, **mesh)
        with pusher:
            stuck = worker("stuck", mesh["mesh"], mesh["beacon_port"], "orders", out)
            try:
                stuck.wait_for("ready")
                pusher.wait_for_pullers("orders")
                pusher.wait_for_keepers("orders")
                pusher.push_many("orders", [{"n": n} for n in range(200)], durable=True)
                wait_until(lambda: handled(out), 20, "the stuck puller's first message")
                stuck.kill()
                wait_until(lambda: pusher.stats()["pipeline"].get("redelivered", 0) > 0, 20,
                           "the pusher taking the killed puller's batch back")
                dealt_again = pusher.stats()["pipeline"]["redelivered"]
            finally:
                stuck.kill()
            started = time.monotonic()
        # (not a timing assertion: waiting out linger_s, the stop handed over nothing)
        assert stored(tmp_path / "pusher") == 0, f"handed over ({time.monotonic() - started:.1f} s)"
        assert stored(tmp_path / "keeper") == 200
        puller = zmqmesh.Node("late-puller", **mesh)
        puller.pull("orders", lambda m: got.__setitem__(m.data["n"], m.redelivered), at_least_once=True)
        with puller:
            wait_until(lambda: len(got) == 200, 20, "the kept messages")
    marked = {n for n, redelivered in got.items() if redelivered}
    assert {n for _id, n in handled(out)} <= marked
    assert len(marked) == dealt_again


def test_a_stopping_pusher_hands_what_a_live_puller_did_not_acknowledge_to_a_keeper(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """docs/durability.md: a pusher that stops with durable messages not yet delivered (no
    puller was there, or it did not acknowledge in time) hands them to a keeper within its
    stop deadline. Here the puller is there and never acknowledges (its handler hangs):
    the drain gives way to the hand-over half-way through linger_s. Before, it waited for
    the acknowledgement until the deadline, the hand-over found the deadline passed, and
    all 200 stayed in the pusher's store (the keeper got none)."""
    out = tmp_path / "stuck.out"
    keeper = zmqmesh.Node("keeper", store=str(tmp_path / "keeper"), **mesh)
    keeper.keep("orders")
    with keeper:
        pusher = zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), linger_s=3, **mesh)
        stuck = worker("stuck", mesh["mesh"], mesh["beacon_port"], "orders", out)
        try:
            with pusher:
                stuck.wait_for("ready")
                pusher.wait_for_pullers("orders")
                pusher.wait_for_keepers("orders")
                pusher.push_many("orders", [{"n": n} for n in range(200)], durable=True)
                wait_until(lambda: handled(out), 20, "the stuck puller's first message")
        finally:
            stuck.kill()
        assert (stored(tmp_path / "pusher"), stored(tmp_path / "keeper")) == (0, 200)


def test_a_drain_that_gave_way_to_keepers_goes_on_for_the_rest_of_linger_s(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    """The drain gives way to the hand-over half-way through linger_s (a hung puller of a
    kept queue); what is not durable drains on after the hand-over, until linger_s has
    passed: a slow puller's in-memory at-least-once messages (4 s of work, linger_s 6 s)
    are all handled, none dropped. Before, the stop went on once the hand-over ended, and
    dropped what the slow puller had not acknowledged by then."""
    out = tmp_path / "stuck.out"
    got: list[int] = []

    def slowly(msg: zmqmesh.Message) -> None:
        time.sleep(0.04)
        got.append(msg.data)

    keeper = zmqmesh.Node("keeper", store=str(tmp_path / "keeper"), **mesh)
    keeper.keep("orders")
    slow = zmqmesh.Node("slow", **mesh)
    slow.pull("jobs", slowly, at_least_once=True)
    with keeper, slow:
        pusher = zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), linger_s=6, **mesh).start()
        stuck = worker("stuck", mesh["mesh"], mesh["beacon_port"], "orders", out)
        try:
            stuck.wait_for("ready")
            pusher.wait_for_pullers("orders")
            pusher.wait_for_pullers("jobs")
            pusher.wait_for_keepers("orders")
            pusher.push_many("orders", [{"n": n} for n in range(200)], durable=True)
            wait_until(lambda: handled(out), 20, "the stuck puller's first message")
            pusher.push_many("jobs", list(range(100)))
            pusher.stop(timeout=6)
        finally:
            stuck.kill()
        assert stored(tmp_path / "keeper") == 200
        assert pusher.stats()["pipeline"].get("dropped", 0) == 0 and sorted(got) == list(range(100))


def zmqmesh_cli(*args: str, timeout: float = 30, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``zmqmesh ARGS``; ``tmpdir``: where its temporary files go (``TMPDIR``)."""
    env = None if tmpdir is None else {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, "-m", "zmqmesh", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_the_command_line_pushes_durably_through_a_keeper_and_manages_dead_letters(
        tmp_path: Path, mesh: dict[str, Any]) -> None:
    common = ["--mesh", mesh["mesh"], "--beacon-port", str(mesh["beacon_port"])]
    keeper_store = tmp_path / "keeper"
    keeper = subprocess.Popen([sys.executable, "-m", "zmqmesh", "keep", "orders", "--store", str(keeper_store), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert keeper.stdout is not None
        assert "keeping 'orders'" in keeper.stdout.readline()
        pushed = zmqmesh_cli("push", "orders", '{"id": 1}', "--durable", *common)
        assert pushed.returncode == 0, pushed.stderr
        assert "durable" in pushed.stdout
        shown = zmqmesh_cli("store", "inspect", str(keeper_store), "--json")
        assert shown.returncode == 0, shown.stderr
        assert '"orders"' in shown.stdout
    finally:
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(15)
    assert stored(keeper_store) == 1
    alone = zmqmesh_cli("push", "orders", '{"id": 2}', "--durable", "--timeout", "0.5", "--mesh", "nobody-here",
                        "--beacon-port", str(mesh["beacon_port"]), tmpdir=tmp_path)
    assert alone.returncode == 1
    assert "no puller or keeper" in alone.stderr
    kept = re.search(r"kept in the store (\S+)", alone.stderr)
    assert kept is not None, alone.stderr
    assert Path(kept[1]).parent == tmp_path and stored(Path(kept[1])) == 1  # the temporary store, named and kept

    with sqlite3.connect(keeper_store / "zmqmesh.db") as db:  # make its message a dead letter
        db.execute("UPDATE outbox SET queue = 'orders.dead'")  # (the store's layout: a test may know it)
    assert "1 dead letter(s)" in zmqmesh_cli("store", "dead-letters", str(keeper_store), "orders").stdout
    assert "moved 1" in zmqmesh_cli("store", "dead-letters", str(keeper_store), "orders", "--retry").stdout
    assert "orders " in zmqmesh_cli("store", "inspect", str(keeper_store)).stdout
    with zmqmesh.Node("holder", store=str(keeper_store), **mesh):
        locked = zmqmesh_cli("store", "dead-letters", str(keeper_store), "orders", "--drop")
        assert locked.returncode == 1 and "in use" in locked.stderr
    missing = zmqmesh_cli("store", "inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no zmqmesh store" in missing.stderr


def test_recovered_queues_stop_reading_the_store_once_they_have_it_all(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """After a restart each queue reads the store up to its own last message, and no
    further: a queue whose rows are older than another's must not keep re-reading."""
    store = str(tmp_path / "store")
    with zmqmesh.Node("pusher", **mesh, store=store) as node:
        node.push_many("older", range(10), durable=True)
        node.push_many("newer", range(10), durable=True)
    got: list[Any] = []
    with zmqmesh.Node("pusher", **mesh, store=store) as node, zmqmesh.Node("puller", **mesh) as puller:
        puller.pull("older", lambda msg: got.append(("older", msg.data)), at_least_once=True)
        puller.pull("newer", lambda msg: got.append(("newer", msg.data)), at_least_once=True)
        wait_until(lambda: len(got) == 20, 20, "every recovered message")
        queues = node._engine.durable.queues  # (the node's own bookkeeping: nothing public says it)
        wait_until(lambda: not any(q.overflow for q in queues.values()), 10, "both queues caught up")


def test_a_backlog_of_large_durable_messages_stays_in_the_store_not_in_memory(tmp_path: Path,
                                                                             mesh: dict[str, Any]) -> None:
    """160 MiB pushed durably while no puller is there: the node holds a few MiB of it in
    memory (by bytes, not only by count), the rest waits in the store; a slow puller that
    comes later gets every message, whole and in order, while the pusher keeps only a
    window of bytes in flight to it."""
    blob = os.urandom(1 << 20)
    n = 160
    got: list[int] = []

    def slow(msg: zmqmesh.Message) -> None:
        time.sleep(0.01)
        if msg.data[4:] == blob:
            got.append(int.from_bytes(msg.data[:4], "big"))

    with zmqmesh.Node("pusher", store=str(tmp_path / "store"), **mesh) as pusher:
        before = rss_bytes()
        for i in range(n):
            pusher.push("big", i.to_bytes(4, "big") + blob, durable=True)
        grown = rss_bytes() - before
        assert grown < 64 << 20, f"the pusher's memory grew by {grown >> 20} MiB for a {n} MiB backlog"
        puller = zmqmesh.Node("puller", **mesh)
        puller.pull("big", slow, at_least_once=True)
        with puller:
            deadline = time.monotonic() + 60
            while len(got) < n and time.monotonic() < deadline:
                grown = max(grown, rss_bytes() - before)
                time.sleep(0.02)
        # (the puller's share is in this process too: what it received and holds)
        assert grown < 96 << 20, f"memory grew by {grown >> 20} MiB while a slow puller drained {n} MiB"
    assert got == list(range(n))


def test_a_durable_message_larger_than_the_buffer_goes_in_its_turn(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A 12 MiB message among 1 MiB ones (the buffer holds about 8 MiB): it waits in the
    store until the buffer is empty, then goes alone, and nothing overtakes it."""
    sizes = [1 << 20] * 10 + [12 << 20] + [1 << 20] * 5
    got: list[tuple[int, int]] = []
    with zmqmesh.Node("pusher", store=str(tmp_path / "store"), max_message_bytes=16 << 20, **mesh) as pusher:
        for i, size in enumerate(sizes):
            pusher.push("big", i.to_bytes(4, "big") + b"x" * (size - 4), durable=True)
        puller = zmqmesh.Node("puller", max_message_bytes=16 << 20, **mesh)
        puller.pull("big", lambda m: got.append((int.from_bytes(m.data[:4], "big"), len(m.data))), at_least_once=True)
        with puller:
            wait_until(lambda: len(got) == len(sizes), 60, "every message")
    assert got == list(enumerate(sizes))


# -- a message larger than its pullers take --------------------------------------------------

TOO_LARGE_LOG = "larger than any of its pullers takes"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "at_least_once"])
def test_a_message_larger_than_its_puller_takes_is_held_counted_and_goes_to_one_that_takes_it(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture, durable: bool) -> None:
    """A pusher (16 MiB limit) pushes 2 MiB, then 20 small messages, to a puller of 1 MiB
    (max_deliveries=2, ack_timeout_s=1): the large one is never dealt to it, so the
    connection stays up and the 20 arrive; it is held (in the store, when durable),
    counted once and logged once, not dead-lettered; a puller of 4 MiB then gets it.
    (Before: it was dealt to the small puller again and again, each send closing the
    connection, with nothing counted, dead-lettered or, without an ack timeout, logged.)"""
    caplog.set_level(logging.WARNING, logger="zmqmesh.reliable")
    small_got: list[Any] = []
    big_got: list[int] = []
    dead: list[Any] = []
    small = zmqmesh.Node("small", max_message_bytes=1 << 20, **mesh)
    small.pull("jobs", lambda msg: small_got.append(msg.data), at_least_once=True, max_deliveries=2,
               ack_timeout_s=1.0)
    small.pull("jobs.dead", dead.append, at_least_once=True)
    large = b"x" * (2 << 20)
    store = {"store": str(tmp_path)} if durable else {}
    with small, zmqmesh.Node("pusher", **store, **mesh) as pusher:
        pusher.push("jobs", large, durable=durable)
        for i in range(20):
            pusher.push("jobs", i, durable=durable)
        wait_until(lambda: len(small_got) == 20, 20, "the 20 small messages")
        wait_until(lambda: pusher.stats()["pipeline"].get("held_too_large") == 1, 10, "the large one counted")
        time.sleep(2.5)  # (past two ack timeouts: nothing dealt, redelivered or dead-lettered meanwhile)
        counters = pusher.stats()["pipeline"]
        assert counters["sent"] == 20, "the large message was dealt to a puller that refuses it"
        assert counters.get("redelivered", 0) == 0 and counters.get("dead_lettered", 0) == 0
        assert counters["held_too_large"] == 1, "counted once, not per flush"
        assert dead == []
        if durable:
            assert stored(tmp_path) == 1, "held in the store"
        big = zmqmesh.Node("big", max_message_bytes=4 << 20, **mesh)
        big.pull("jobs", lambda msg: big_got.append(len(msg.data)), at_least_once=True)
        with big:
            wait_until(lambda: big_got, 20, "the large message at a puller that takes it")
            if durable:
                wait_until(lambda: stored(tmp_path) == 0, 20, "the large message acknowledged")
        counters = pusher.stats()["pipeline"]
    assert sorted(small_got) == list(range(20))
    assert big_got == [len(large)]
    assert counters["held_too_large"] == 1 and counters["sent"] == 21
    assert dead == []
    assert sum(TOO_LARGE_LOG in r.getMessage() for r in caplog.records) == 1, "logged once"


def test_a_held_message_stays_held_once_when_a_timed_out_one_is_put_back_in_front_of_it(
        tmp_path: Path, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A durable message too large for every puller is held at the front of what is dealt
    again; a delivery that timed out goes back in front of it. The next flush found no
    large message at the front and forgot the one it held (out of step with what it
    dealt again: counted again among what a stop waits for), and once the other was dealt,
    held it as new: counted twice in held_too_large, and logged twice (measured: 2 for one
    message, in this test and with a batch of 6 timing out at a stuck puller beside another)."""
    caplog.set_level(logging.WARNING, logger="zmqmesh.reliable")
    got: list[int] = []
    stuck = threading.Event()
    release = threading.Event()

    def stuck_once(msg: zmqmesh.Message) -> None:
        if msg.data == 0 and not stuck.is_set():
            stuck.set()
            release.wait(20)
        got.append(msg.data)

    puller = zmqmesh.Node("puller", max_message_bytes=1 << 20, handler_concurrency=2, **mesh)
    puller.pull("jobs", stuck_once, at_least_once=True, ack_timeout_s=0.2)
    try:
        with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
            pusher.wait_for_pullers("jobs")
            pusher.push("jobs", b"x" * (2 << 20), durable=True)
            wait_until(lambda: pusher.stats()["pipeline"].get("held_too_large") == 1, 10, "the large one held")
            pusher.push_many("jobs", [0, 2], durable=True)  # (one batch: put back whole when it times out)
            wait_until(stuck.is_set, 10, "the handler stuck on it")
            wait_until(lambda: pusher.stats()["pipeline"].get("redelivered", 0) >= 2, 10,
                       "the batch timed out, put back in front of the held one")
            release.set()
            wait_until(lambda: stored(tmp_path) == 1, 20, "both acknowledged, dealt again or not")
            pusher.push("jobs", 1, durable=True)  # (a flush with the held one at the front again)
            wait_until(lambda: 1 in got and stored(tmp_path) == 1, 10, "a message after it")
            counters = pusher.stats()["pipeline"]
    finally:
        release.set()
    assert counters["held_too_large"] == 1, "the held message counted again"
    assert sum(TOO_LARGE_LOG in r.getMessage() for r in caplog.records) == 1, "logged again"


@pytest.mark.parametrize("taker", ["puller", "keeper"])
def test_a_stop_does_not_wait_out_linger_s_for_a_durable_message_no_taker_there_takes(
        tmp_path: Path, mesh: dict[str, Any], taker: str) -> None:
    """A durable message larger than every puller (or keeper) there takes is held, and
    stays in the store: nothing there will take it. The stop counted it among what was
    still to send (the gauge ``queued`` said 1) or to hand over, and so waited all of
    linger_s for it (or the stop's timeout, if less: measured with linger_s=5, 5.01 s with a
    puller or with a keeper; after, 0.02 s), the store keeping it all the same."""
    got: list[int] = []
    other = zmqmesh.Node(taker, store=str(tmp_path / "keeper"), max_message_bytes=1 << 20, **mesh)
    if taker == "keeper":
        other.keep("jobs")
    else:
        other.pull("jobs", lambda msg: got.append(msg.data["n"]), at_least_once=True)
    with other:
        pusher = zmqmesh.Node("pusher", store=str(tmp_path / "pusher"), max_message_bytes=8 << 20, linger_s=30,
                              **mesh).start()
        try:
            (pusher.wait_for_keepers if taker == "keeper" else pusher.wait_for_pullers)("jobs")
            pusher.push("jobs", {"n": -1, "large": b"x" * (2 << 20)}, durable=True)
            pusher.push_many("jobs", [{"n": n} for n in range(10)], durable=True)
            if taker == "puller":
                wait_until(lambda: len(got) == 10 and pusher.stats()["pipeline"].get("held_too_large") == 1, 20,
                           "the small messages handled, the large one held")
                wait_until(lambda: stored(tmp_path / "pusher") == 1, 10, "the small ones acknowledged")
                assert pusher.stats()["gauges"]["queued"] == 0, "a held message counted as still to send"
            stopping = threading.Thread(target=pusher.stop, kwargs={"timeout": 60})  # (past linger_s)
            stopping.start()
            stopping.join(20)  # (a bound: before, the stop waited the 30 s of linger_s)
            assert not stopping.is_alive(), "the stop waited out linger_s for the held message"
        finally:
            pusher.stop(timeout=1)
        assert stored(tmp_path / "pusher") == 1, "the held message kept in the pusher's store"
        if taker == "keeper":
            assert stored(tmp_path / "keeper") == 10


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "at_least_once"])
def test_messages_too_large_for_every_puller_are_held_in_bounded_memory(
        tmp_path: Path, mesh: dict[str, Any], durable: bool) -> None:
    """2 MiB messages pushed to a puller of 1 MiB: at most `HELD_BYTES` of them are held
    aside; the rest wait behind them (a push then waits for room, and times out, as for a
    full send queue; a durable one stays in the store only), and all come once a puller
    that takes them does. (Before, each flush moved the queue's head aside, out of the send
    queue's bounds and the durable buffer's: 200 pushes of 2 MiB with send_queue_max=10
    were all taken, 428 MB held; 150 durable ones with durable_buffer_max_bytes=16 MiB
    held 77 in memory.)"""
    from zmqmesh._patterns.reliable import HELD_BYTES

    small = zmqmesh.Node("small", max_message_bytes=1 << 20, **mesh)
    small.pull("jobs", lambda msg: None, at_least_once=True)
    store = {"store": str(tmp_path), "durable_buffer_max_bytes": 16 << 20} if durable else {}
    pushed = 0
    with small, zmqmesh.Node("pusher", send_queue_max=10, push_timeout_s=0.5, **store, **mesh) as pusher:
        wait_until(lambda: pusher.peers(), 10, "the puller")
        time.sleep(0.5)  # (its offers)
        try:
            while pushed < 60:
                pusher.push("jobs", pushed.to_bytes(4, "big") + b"x" * (2 << 20), durable=durable)
                pushed += 1
        except zmqmesh.MeshTimeoutError:
            assert not durable, "a durable push waits in the store, never for room"
        time.sleep(1)
        held = pusher.stats()["pipeline"]["held_too_large"]
        assert held * (2 << 20) <= HELD_BYTES + (2 << 20), f"{held} messages of 2 MiB held"
        if not durable:
            assert pushed <= 10 + HELD_BYTES // (2 << 20) + 2, f"{pushed} pushes taken"
        got: list[int] = []
        big = zmqmesh.Node("big", max_message_bytes=4 << 20, **mesh)
        big.pull("jobs", lambda msg: got.append(int.from_bytes(msg.data[:4], "big")), at_least_once=True)
        with big:
            wait_until(lambda: len(got) == pushed, 60, "every message at a puller that takes it")
    assert got == list(range(pushed))


def test_a_durable_message_pushed_without_headers_has_empty_headers_and_one_with_them_its_own(
        mesh: dict[str, Any], tmp_path: Path) -> None:
    """A puller leaves the empty headers of a durable message pushed without any to be made
    as they are read (`durable_delivery`): they read as an empty dict all the same, the same
    one each time, and headed messages beside them keep theirs."""
    got: list[zmqmesh.Message] = []
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("orders", got.append, at_least_once=True)
    with puller, zmqmesh.Node("pusher", store=str(tmp_path / "store"), **mesh) as pusher:
        pusher.wait_for_pullers("orders")
        pusher.push("orders", 1, durable=True)
        pusher.push_many("orders", [2, 3], durable=True, headers={"h": "v"})
        wait_until(lambda: len(got) == 3, 10, "the three deliveries")
    plain, *headed = got
    assert plain.data == 1 and plain.headers == {} and plain.headers is plain.headers
    assert [(m.data, m.headers) for m in headed] == [(2, {"h": "v"}), (3, {"h": "v"})]


def _interrupt_once_stored(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Arm (``armed[0] = 1``, before a call) a Ctrl-C's KeyboardInterrupt on the main
    thread right after the store's next transaction there committed (as a signal's
    handler may raise it once the C call returned); it is raised once (``armed[0]`` back
    to 0). Patches the store's checkpointer: call before the node with the store is made."""
    from zmqmesh._store.checkpointer import Checkpointer

    real_written = Checkpointer.written
    armed = [0]

    def written_then_interrupted(self: Checkpointer, db: Any) -> None:
        real_written(self, db)
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = 0
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "written", written_then_interrupted)
    return armed


def test_a_durable_push_interrupted_once_its_message_was_stored_leaves_later_ones_storable(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt after the store committed a durable push, before the
    store noted the sequence numbers it gave: every later durable push failed, StoreError
    (UNIQUE constraint failed: outbox.seq), on the first interrupt that landed there (the
    first of 2,378 in 20,000 durable pushes interrupted at random)."""
    got: list[int] = []
    armed = _interrupt_once_stored(monkeypatch)
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.wait_for_pullers("q", timeout=10)
        pusher.push("q", 0, durable=True)
        armed[0] = 1
        with pytest.raises(KeyboardInterrupt):
            pusher.push("q", 1, durable=True)
        assert armed == [0]
        pusher.push("q", 2, durable=True)
        pusher.push_many("q", [3, 4], durable=True)
        wait_until(lambda: {0, 2, 3, 4} <= set(got), 20, "the pushes after the interrupt")


def test_a_durable_push_interrupted_once_its_message_was_stored_delivers_it_in_this_run(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt after the store committed a durable push, before the
    message reached its queue's buffer: it stayed in the store, neither delivered nor
    counted as stored, until the node started again (1,644 messages of 20,000 durable
    pushes, 2,079 of them interrupted at random, with an at-least-once puller there).
    Now the loop reads back from the store what such a commit stored."""
    got: list[int] = []
    armed = _interrupt_once_stored(monkeypatch)
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.wait_for_pullers("q", timeout=10)
        pusher.push("q", 0, durable=True)
        wait_until(lambda: got == [0] and stored(tmp_path) == 0, 20, "the first push handled")
        armed[0] = 1
        with pytest.raises(KeyboardInterrupt):
            pusher.push("q", 1, durable=True)
        wait_until(lambda: 1 in got, 20, "the interrupted push, stored, delivered")
        wait_until(lambda: stored(tmp_path) == 0, 20, "the store emptied")
        assert pusher.stats()["pipeline"]["durable_stored"] == 2
    assert sorted(got) == [0, 1]


def _three_durable_pushes_the_second_interrupted(store: Path, mesh: dict[str, Any], armed: list[int],
                                                 done: Callable[[list[int]], bool]) -> tuple[list[int], dict[str, Any]]:
    """Durable pushes of 0, 1 and 2 to an at-least-once puller, ``armed`` set for the push
    of 1 (which must raise the KeyboardInterrupt the patch armed raises, once); waits until
    the puller's list makes ``done`` true and the store is empty. What the puller got, and
    the pusher's pipeline stats then."""
    got: list[int] = []
    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("q", lambda msg: got.append(msg.data), at_least_once=True)
    with puller, zmqmesh.Node("pusher", store=str(store), **mesh) as pusher:
        pusher.wait_for_pullers("q", timeout=10)
        pusher.push("q", 0, durable=True)
        wait_until(lambda: got == [0], 20, "the first push handled")
        armed[0] = 1
        with pytest.raises(KeyboardInterrupt):
            pusher.push("q", 1, durable=True)
        assert armed == [0]
        pusher.push("q", 2, durable=True)
        wait_until(lambda: done(got) and stored(store) == 0, 20, "the pushes handled, the store emptied")
        return got, pusher.stats()["pipeline"]

def test_a_durable_push_interrupted_once_its_message_was_buffered_delivers_it_once(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt once a durable push's message reached its queue's
    buffer, before the queue noted how far its buffer goes (`_Queue.loaded`): the loop
    read it back from the store all the same, and the puller got it twice in this run
    (got [0, 1, 1, 2]). Now what the buffer already holds is not read back."""
    from zmqmesh._patterns.durable import Buffer

    real_extend = Buffer.extend
    armed = [0]

    def extend_then_interrupted(self: Buffer, messages: Any, halves: list[int] | None = None) -> None:
        real_extend(self, messages, halves)
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = 0
            raise KeyboardInterrupt

    monkeypatch.setattr(Buffer, "extend", extend_then_interrupted)
    got, pipeline = _three_durable_pushes_the_second_interrupted(tmp_path, mesh, armed, lambda got: 2 in got)
    assert pipeline["durable_stored"] == 3
    assert got == [0, 1, 2]


def test_a_durable_push_interrupted_before_its_transaction_leaves_later_ones_to_the_buffer(
        tmp_path: Path, mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt before a durable push's transaction (nothing stored):
    its queue was marked as holding more in the store than in its buffer all the same,
    and stayed so, held in memory: the next push went to the store only, to be read back
    (durable_spilled 1). Now a commit that stored nothing leaves its queues as they were."""
    from zmqmesh._store.database import Database

    real_commit = Database.commit
    armed = [0]

    def interrupted_commit(self: Database, work: Any, single: bool = False) -> None:
        if armed[0] and threading.current_thread() is threading.main_thread():
            armed[0] = 0
            raise KeyboardInterrupt
        real_commit(self, work, single)

    monkeypatch.setattr(Database, "commit", interrupted_commit)
    _got, pipeline = _three_durable_pushes_the_second_interrupted(tmp_path, mesh, armed, lambda got: got == [0, 2])
    assert (pipeline["durable_stored"], pipeline.get("durable_spilled", 0)) == (2, 0), pipeline
