"""Crashes and at-least-once delivery: nothing promised is lost when a process dies."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
from helpers import rss_bytes, wait_until

import zmqmesh


def handled(procs: list[Any]) -> Counter[int]:
    return Counter(int(line.split()[2]) for p in procs for line in p.with_prefix("APULL jobs"))


@pytest.mark.timeout(180)
def test_at_least_once_queue_survives_a_puller_killed_mid_stream(spawn: Any, mesh: dict[str, Any]) -> None:
    jobs = 100_000
    window = 1000
    pullers = [spawn(f"w{i}", ack_pull=["jobs"], options={"ack_window": window}) for i in range(3)]
    with zmqmesh.Node("pusher", **{**mesh, "ack_window": window}) as node:
        node.wait_for_pullers("jobs", 3, timeout=10)
        feeder = threading.Thread(target=lambda: [node.push("jobs", i, timeout=30) for i in range(jobs)])
        feeder.start()
        pullers[0].wait_line("APULL jobs", count=10_000, timeout=60)
        pullers[0].kill()  # mid-stream, with unacknowledged work in hand
        feeder.join(120)
        # (counting 100k lines is costly: every 10 ms, it starved the pusher in this process)
        wait_until(lambda: len(handled(pullers)) == jobs, 120, "every job to be handled", every=0.5)
        stats = node.stats()["pipeline"]
    counts = handled(pullers)
    assert sorted(counts) == list(range(jobs)), "every job handled at least once"
    duplicates = sum(counts.values()) - jobs
    assert duplicates <= window, f"{duplicates} duplicates for a window of {window}"
    redelivered = [line for p in pullers[1:] for line in p.with_prefix("APULL jobs") if line.endswith(" 1")]
    assert redelivered, "redeliveries are marked on the message"
    assert stats["redelivered"] >= len(redelivered) - duplicates
    assert all(len(p.with_prefix("APULL")) > 10_000 for p in pullers[1:])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durable", [False, True], ids=["in_memory", "durable"])
def test_a_slow_pushers_messages_are_spread_over_every_at_least_once_puller(
        spawn: Any, mesh: dict[str, Any], tmp_path: Any, durable: bool) -> None:
    # one message at a time, each handled and acknowledged before the next: every flush after
    # an acknowledgement once moved the round robin too, and one of two pullers got them all
    pullers = [spawn(f"w{i}", ack_pull=["jobs"]) for i in range(2)]
    store = {"store": str(tmp_path / "store")} if durable else {}
    with zmqmesh.Node("pusher", **mesh, **store) as node:
        node.wait_for_pullers("jobs", 2, timeout=10)
        for i in range(40):
            node.push("jobs", i, timeout=10, durable=durable)
            wait_until(lambda i=i: i in handled(pullers) and not node.stats()["gauges"]["queued"], 10,
                       f"job {i} to be handled and acknowledged")
    shares = [len(p.with_prefix("APULL jobs")) for p in pullers]
    assert sorted(handled(pullers)) == list(range(40))
    assert min(shares) >= 10, f"each idle puller gets a share of the 40 jobs: {shares}"


@pytest.mark.timeout(60)
def test_a_burst_to_an_at_least_once_queue_is_split_evenly_over_its_pullers(spawn: Any, mesh: dict[str, Any]) -> None:
    # each puller's share of the burst was counted again after each batch: of 40, 20 went to
    # the first, 10 to the second, then 5, 3, 1, 1
    pullers = [spawn(f"w{i}", ack_pull=["jobs"]) for i in range(2)]
    with zmqmesh.Node("pusher", **mesh) as node:
        node.wait_for_pullers("jobs", 2, timeout=10)
        node.push_many("jobs", range(40), timeout=10)  # (queued at once: one flush finds all of them)
        wait_until(lambda: len(handled(pullers)) == 40, 10, "every job to be handled")
    shares = [len(p.with_prefix("APULL jobs")) for p in pullers]
    assert min(shares) >= 16, f"each puller gets about half of the burst: {shares}"


def test_at_least_once_messages_wait_for_a_puller_and_are_not_lost_on_its_stop(mesh: dict[str, Any]) -> None:
    got: list[Any] = []
    first = zmqmesh.Node("first", **mesh)
    first.pull("q", lambda m: (got.append(m.data), time.sleep(0.002)), at_least_once=True)
    with zmqmesh.Node("pusher", **mesh) as pusher:
        first.start()
        pusher.wait_for_pullers("q", timeout=10)
        for i in range(2000):
            pusher.push("q", i, timeout=10)
        wait_until(lambda: len(got) >= 100, 10, "some deliveries")
        first.stop()  # a polite stop in the middle: what it had not acknowledged comes back
        second = zmqmesh.Node("second", **mesh)
        second.pull("q", lambda m: got.append(m.data), at_least_once=True)
        with second:
            wait_until(lambda: set(got) == set(range(2000)), 20, "every message")
        assert pusher.stats()["pipeline"]["sent"] >= 2000


def test_idempotent_service_is_retried_on_another_provider(spawn: Any, mesh: dict[str, Any]) -> None:
    doomed = spawn("doomed", idempotent=["lookup"], idempotent_delay_s=30)
    spawn("steady", idempotent=["lookup"], idempotent_delay_s=0.1)
    quick = {**mesh, "peer_timeout_s": 30.0, "heartbeat_interval_s": 10.0}
    with zmqmesh.Node("client", **quick) as node:
        node.wait_for_service("lookup", 2, timeout=10)
        answers = []
        started = time.monotonic()
        threading.Timer(0.5, doomed.kill).start()
        for i in range(4):  # round-robin: at least one goes to the doomed provider
            answers.append(node.request("lookup", i, timeout=20))
        assert set(answers) == {"steady"}
        assert doomed.with_prefix("SERVING"), "the doomed provider had taken a request"
        assert time.monotonic() - started < 10


def test_non_idempotent_service_raises_peer_lost(spawn: Any, mesh: dict[str, Any]) -> None:
    doomed = spawn("doomed", service=["block"], block_s=30)
    spawn("steady", service=["block"], block_s=0)
    with zmqmesh.Node("client", **{**mesh, "peer_timeout_s": 30.0, "heartbeat_interval_s": 10.0}) as node:
        node.wait_for_service("block", 2, timeout=10)
        threading.Timer(0.5, doomed.kill).start()
        with pytest.raises(zmqmesh.PeerLostError):
            for _ in range(4):
                node.request("block", None, timeout=20)


def test_what_a_departed_acking_puller_left_goes_to_the_plain_pullers_that_follow(mesh: dict[str, Any]) -> None:
    """The at-least-once puller of a queue leaves with messages unacknowledged; the next
    pullers pull it plainly: those messages go to them, never stranded until the pusher stops."""
    release = threading.Event()
    got_plain: list[Any] = []
    acker = zmqmesh.Node("acker", **mesh)
    acker.pull("jobs", lambda m: release.wait(10), at_least_once=True)  # holds its first message
    with zmqmesh.Node("pusher", **mesh) as pusher:
        acker.start()
        stopping = threading.Thread(target=acker.stop)
        try:
            pusher.wait_for_pullers("jobs", timeout=10)
            for i in range(3):
                pusher.push("jobs", i)
            wait_until(lambda: pusher.stats()["pipeline"]["sent"] >= 3, 10, "the messages dealt to the acker")
            stopping.start()  # it says goodbye while its handler still holds a message
            wait_until(lambda: all(p.name != "acker" for p in pusher.peers()), 10, "the acker gone")
        finally:
            release.set()
            if stopping.ident is not None:  # (started)
                stopping.join(15)
            acker.stop()
        with zmqmesh.Node("plain", **mesh) as plain:
            plain.pull("jobs", lambda m: got_plain.append(m.data))
            wait_until(lambda: sorted(set(got_plain)) == [0, 1, 2], 10, "every message at the plain puller")


@pytest.mark.timeout(90)
def test_what_waits_for_pullers_that_all_left_is_dropped_and_counted_after_push_timeout(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """A puller that crashes is seen gone only after a while: what was queued for it
    meanwhile waits `push_timeout_s` for another puller, as a push would, then is dropped,
    counted and logged, its socket released: not kept for good, retried every few
    milliseconds, and holding a socket that a push to another queue may need."""
    puller = spawn("w", pull=["jobs"])
    options = {**mesh, "send_hwm": 1, "push_timeout_s": 1.0}
    with zmqmesh.Node("pusher", **options) as node:
        node.wait_for_pullers("jobs", 1, timeout=10)
        os.kill(puller.proc.pid, signal.SIGSTOP)  # it takes nothing more: the send queue fills
        pushed = 0
        # (until the send queue is full; or, on a slow machine, until the stopped puller's
        # silence has it taken for gone)
        with pytest.raises((zmqmesh.MeshTimeoutError, zmqmesh.NoProviderError)):
            while True:
                node.push("jobs", pushed, timeout=0.5)
                pushed += 1
        waiting = node.stats()["gauges"]["queue_backlog"].get("jobs", 0)
        puller.kill()
        # (the socket is released just after the drops are counted)
        wait_until(lambda: node.stats()["pipeline"].get("dropped", 0) >= max(waiting, 1)
                   and "jobs" not in node.stats()["gauges"]["queue_backlog"], 30, "the messages dropped, the socket released")
        assert node.stats()["gauges"]["queued"] == 0
        again = spawn("w2", pull=["jobs"])
        node.wait_for_pullers("jobs", 1, timeout=10)
        node.push("jobs", "after", timeout=5)
        again.wait_line('PULL jobs "after"', timeout=10)


@pytest.mark.timeout(90)
def test_what_waits_for_at_least_once_pullers_that_all_left_waits_for_the_next_one(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """An at-least-once queue's messages are never dropped for want of a puller, however
    long it is away: both those sent and not acknowledged and those still queued go to the
    puller that comes next."""
    puller = spawn("w", ack_pull=["jobs"])
    with zmqmesh.Node("pusher", **{**mesh, "ack_window": 4, "push_timeout_s": 1.0}) as node:
        node.wait_for_pullers("jobs", 1, timeout=10)
        os.kill(puller.proc.pid, signal.SIGSTOP)  # 4 in its window, 16 queued
        for i in range(20):
            node.push("jobs", i, timeout=5)
        puller.kill()
        wait_until(lambda: not node.peers(), 10, "the puller gone")
        time.sleep(2.0)  # (past push_timeout_s)
        assert node.stats()["pipeline"].get("dropped", 0) == 0
        again = spawn("w2", ack_pull=["jobs"])
        wait_until(lambda: len(handled([again])) == 20, 20, "every message, at the next puller")
    assert sorted(handled([again])) == list(range(20))


@pytest.mark.timeout(90)
def test_a_push_waiting_for_room_when_its_pullers_all_left_raises_instead_of_losing_its_message(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """A push waits for room in a full send queue; meanwhile the queue's pullers all leave
    and what waited is dropped: the push must then not return as if its message were
    queued (it went into a send queue nobody sends any more)."""
    puller = spawn("w", pull=["jobs"])
    with zmqmesh.Node("pusher", **{**mesh, "send_hwm": 1, "push_timeout_s": 1.0, "send_queue_max": 20}) as node:
        node.wait_for_pullers("jobs", 1, timeout=10)
        os.kill(puller.proc.pid, signal.SIGSTOP)
        pushed = 0
        with pytest.raises((zmqmesh.MeshTimeoutError, zmqmesh.NoProviderError)):
            while True:
                node.push("jobs", pushed, timeout=0.5)
                pushed += 1
        outcome: list[BaseException | None] = []

        def late() -> None:
            try:
                node.push("jobs", "late", timeout=20)
                outcome.append(None)
            except zmqmesh.ZmqMeshError as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=late)
        waiter.start()
        puller.kill()
        waiter.join(30)
        assert outcome and isinstance(outcome[0], zmqmesh.NoProviderError), outcome
        assert node.stats()["gauges"]["queued"] == 0


@pytest.mark.timeout(90)
def test_a_frozen_puller_holds_the_pusher_back_with_the_default_high_water_marks(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """With the defaults, a puller that takes nothing holds its pusher back within some
    tens of thousands of small messages: the high-water marks count frames, and a frame
    carries up to 256 of them, so marks of 100,000 let a pusher queue 25 million toward a
    frozen puller (and hold them in memory) before a push waited, and `queue_hwm` 1,000
    260,000 (35,000 at its default of 100, measured)."""
    puller = spawn("w", pull=["jobs"])
    with zmqmesh.Node("pusher", **mesh) as node:
        node.wait_for_pullers("jobs", 1, timeout=10)
        puller.signal(signal.SIGSTOP)  # (let go by the fixture's stop)
        pushed, batch = 0, [b"x" * 40] * 1000
        with pytest.raises(zmqmesh.MeshTimeoutError):
            while pushed < 3_000_000:
                node.push_many("jobs", batch, timeout=1.0)
                pushed += len(batch)
        assert pushed < 150_000, f"{pushed:,} messages went toward a puller that took none"


@pytest.mark.timeout(90)
def test_a_frozen_subscriber_holds_a_bounded_share_of_its_publishers_memory(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """A subscriber that takes nothing costs its publisher what its pipe holds, up to
    ``send_hwm`` frames, past which what it would get is dropped and counted: with the
    default (10,000), about 120 MiB of small messages here; marks of 100,000 let it hold
    about 280 MiB."""
    subscriber = spawn("s", subscribe=["t."])
    with zmqmesh.Node("publisher", **mesh) as node:
        node.wait_for_subscribers("t.x", 1, timeout=10)
        subscriber.signal(signal.SIGSTOP)  # (let go by the fixture's stop)
        items = [{"i": i, "p": "x" * 40} for i in range(1000)]
        before = rss_bytes()
        deadline = time.monotonic() + 30
        # until it is declared gone (`peer_timeout_s`) and publications find no route:
        # its pipe, full long before, is what the publisher held for it
        while node.stats()["pubsub"].get("unrouted", 0) < 1_000_000:
            assert time.monotonic() < deadline, "the frozen subscriber's pipe never filled"
            for _ in range(100):
                node.publish_many("t.x", items)
        grown = rss_bytes() - before
        assert grown < 200 << 20, f"the publisher grew by {grown >> 20} MiB for a subscriber that took nothing"


@pytest.mark.timeout(60)
def test_a_send_queue_stays_within_send_queue_max_while_its_puller_takes_nothing(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """A stopped puller takes nothing: the loop keeps trying to send a frame of what is
    queued, and callers' threads keep pushing. The queue never holds more than
    ``send_queue_max``: a frame the socket refuses must not shorten the queue meanwhile
    (callers would fill the gap, and the frame come back on top of them)."""
    puller = spawn("w", pull=["jobs"])
    # (peer_timeout_s: the stopped puller stays a member throughout)
    with zmqmesh.Node("pusher", **{**mesh, "send_hwm": 1, "send_queue_max": 20, "peer_timeout_s": 30.0}) as node:
        node.wait_for_pullers("jobs", 1, timeout=10)
        os.kill(puller.proc.pid, signal.SIGSTOP)
        try:
            # (4 KiB each, batched into frames: should the connection be up, the kernel's
            # buffers fill after a few thousand; each thread pushes until refused a few times)
            payload = b"x" * 4096
            deadline = time.monotonic() + 30.0
            refused = [0, 0, 0]
            unexpected: list[BaseException] = []

            def pusher(i: int) -> None:
                while refused[i] < 5 and time.monotonic() < deadline:
                    try:
                        node.push("jobs", payload, timeout=0.05)
                    except zmqmesh.MeshTimeoutError:
                        refused[i] += 1
                    except BaseException as exc:  # (reported below, not lost with the thread)
                        unexpected.append(exc)
                        return

            threads = [threading.Thread(target=pusher, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            most = 0
            while any(t.is_alive() for t in threads):
                most = max(most, node.stats()["gauges"]["queued"])
                time.sleep(0.001)
            assert not unexpected, unexpected
            assert min(refused) == 5, refused  # (the queue was full: pushes waited for room and gave up)
            assert max(most, node.stats()["gauges"]["queued"]) == 20, most  # (full, and never past it)
        finally:
            os.kill(puller.proc.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_a_plain_push_larger_than_a_puller_takes_is_dropped_counted_and_logged_and_the_rest_arrive(
        mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A pusher of 16 MiB pushes 2 MiB to a plain puller of 1 MiB, then 10 small messages,
    twice: the pusher drops the large ones before sending (no puller of the queue takes
    them, and the frame would close the connection of the one it was dealt to), counts each in
    ``pipeline.dropped_too_large`` and logs one line; the small ones all arrive. (Before:
    each was sent and lost with the connection, counted and logged nowhere.)"""
    caplog.set_level(logging.WARNING, logger="zmqmesh.pipeline")
    got: list[Any] = []
    puller = zmqmesh.Node("small", max_message_bytes=1 << 20, **mesh)
    puller.pull("jobs", lambda msg: got.append(msg.data))
    with puller, zmqmesh.Node("pusher", **mesh) as pusher:
        for _ in range(2):
            pusher.push("jobs", b"x" * (2 << 20))
            for i in range(10):
                pusher.push("jobs", i)
        wait_until(lambda: len(got) == 20, 20, "the small messages")
        wait_until(lambda: pusher.stats()["pipeline"].get("dropped_too_large") == 2, 10, "the large ones counted")
        counters = pusher.stats()["pipeline"]
    assert sorted(got) == sorted(list(range(10)) * 2)
    assert counters["dropped"] == 2 and counters["sent"] == 20
    assert sum("larger than a puller" in r.getMessage() for r in caplog.records) == 1, "one line per 10 s"


def test_a_batch_for_a_puller_with_a_smaller_limit_stops_before_what_it_would_refuse() -> None:
    """`fill_batch` with a puller's limit: a message larger than it is left at the front,
    neither alone nor beside others (sans-I/O)."""
    from collections import deque

    from zmqmesh._patterns.reliable import fill_batch, wire_form

    def wrap(item: Any, again: bool) -> bytes:
        return wire_form(item, again, msgpack.packb)

    small, large = b"\xa1s", b"\xc6" + (70_000).to_bytes(4, "big") + b"x" * 70_000
    for limit in (1 << 10, 1 << 16):
        source = deque([small, small, large, small])
        items: list[Any] = []
        fill_batch(source, items, [], 10, 0, False, wrap, limit)
        assert items == [small, small] and list(source) == [large, small]
        items = []
        fill_batch(source, items, [], 10, 0, False, wrap, limit)
        assert items == [] and list(source) == [large, small]
        fill_batch(source, items, [], 10, 0, False, wrap, 1 << 20)  # (a puller that takes it)
        assert items == [large]


def test_a_peers_announced_limit_counts_only_when_below_this_nodes() -> None:
    """``X-ZMQMESH-MAX-MESSAGE-BYTES``: a limit below this node's is kept; one at or above
    it, malformed or absent (a node before the header) leaves the peer dealt to as before."""
    from zmqmesh._mesh.directory import Directory
    from zmqmesh._stats import Stats

    directory = Directory("aa" * 16, Stats(), lambda: None, True, max_message_bytes=16 << 20)  # type: ignore[arg-type,return-value]
    assert directory._narrower_limit("1048576") == 1 << 20
    for value in (str(16 << 20), str(32 << 20), "1e6", "-1", "²", "9" * 13, ""):
        assert directory._narrower_limit(value) is None, value
    directory.narrower = {"b": 1 << 20, "c": 2 << 20}
    assert directory.widest_limit(["b", "c"]) == 2 << 20
    assert directory.widest_limit(["b", "old"]) is None  # (one takes anything: nothing is held)
    assert directory.widest_limit(["b"]) == 1 << 20


@pytest.mark.timeout(60)
def test_a_large_in_memory_message_held_for_want_of_a_puller_that_takes_it_is_counted_dropped_at_the_stop(
        mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """An at-least-once push of 2 MiB (a large payload: its own frame) to a queue whose only
    puller takes 1 MiB is held at the pusher, never dealt; stopped, the pusher counts it
    dropped and says so (``pipeline.dropped``, "stopped with 1 queued message(s) unsent").
    Before, what a stop counted as in memory only was the items that were bytes: a large
    payload held so was no bytes, and went unreported."""
    caplog.set_level(logging.WARNING, logger="zmqmesh")
    got: list[Any] = []
    small = zmqmesh.Node("small", max_message_bytes=1 << 20, **mesh)
    small.pull("jobs", lambda msg: got.append(msg.data), at_least_once=True)
    with small:
        pusher = zmqmesh.Node("pusher", linger_s=0.5, **mesh)
        with pusher:
            pusher.wait_for_pullers("jobs")
            pusher.push("jobs", b"x" * (2 << 20))
            pusher.push("jobs", 1)
            wait_until(lambda: got == [1], 20, "the small message")
            wait_until(lambda: pusher.stats()["pipeline"].get("held_too_large") == 1, 10, "the large one held")
        dropped = pusher.stats()["pipeline"].get("dropped", 0)
    assert got == [1]
    assert dropped == 1
    assert any("stopped with 1 queued message(s) unsent" in r.getMessage() for r in caplog.records)
