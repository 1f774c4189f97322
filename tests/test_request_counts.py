"""The request counters tell each request's fate once: ``sent`` counts what went, and each
request sent ends as ``received`` (its reply reached its caller), ``errors`` (timed out,
its provider left, the node stopped) or ``abandoned`` (its caller stopped waiting first),
so that ``sent == received + errors + abandoned`` once nothing is in flight. A request
that did not go is not counted as sent, under its service's name either."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from helpers import until, wait_until

import zmqmesh
from zmqmesh._drivers import pipelined
from zmqmesh._drivers.thread import requests as thread_requests

pytestmark = pytest.mark.timeout(60)

SYNC_CALLS = ["request", "submit", "request_many"]
ASYNC_CALLS = ["request", "request_many"]


def _outcomes(node: zmqmesh.Node | zmqmesh.AsyncNode) -> tuple[int, int]:
    """``(sent, received + errors + abandoned)`` of a node's requests."""
    counts = node.stats()["request"]
    return counts["sent"], counts["received"] + counts["errors"] + counts.get("abandoned", 0)


@pytest.fixture
def held(mesh: dict[str, Any]) -> Iterator[tuple[zmqmesh.Node, threading.Event]]:
    """A provider of ``echo``, and of ``held``, whose handlers wait for the event given
    (set at teardown: its stop does not wait for them)."""
    release = threading.Event()
    provider = zmqmesh.Node("provider", handler_concurrency=16, **mesh)
    provider.service("echo", lambda m: m.data)
    provider.service("held", lambda m: release.wait(20) and m.data)
    provider.start()
    yield provider, release
    release.set()
    provider.stop()


def _refused(*args: Any, **kwargs: Any) -> None:
    raise zmq.Again()


@pytest.mark.parametrize("call", SYNC_CALLS)
def test_a_node_counts_no_request_as_sent_whose_send_was_refused(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], monkeypatch: pytest.MonkeyPatch,
        call: str) -> None:
    """The way to the provider refuses the requests (``zmq.Again``, twice: a fresh
    connection refuses too): MeshTimeoutError, and nothing went. They were counted as sent
    under their service's name all the same, when their provider was picked: ``echo`` 2
    (and 4 for three items of ``request_many``) beside ``sent`` 1."""
    with zmqmesh.Node("caller", **mesh) as node:
        node.wait_for_service("echo", timeout=10)
        assert node.request("echo", 0) == 0
        monkeypatch.setattr(thread_requests if call == "request" else pipelined, "send_frames", _refused)
        with pytest.raises(zmqmesh.MeshTimeoutError, match="not accepting"):
            if call == "request":
                node.request("echo", 1, timeout=5)
            elif call == "submit":
                node.submit("echo", 1, timeout=5).result(10)
            else:
                node.request_many("echo", [1, 2, 3], timeout=5)
        stats = node.stats()
        assert (stats["request"]["sent"], stats["names"]["request"]["sent"]) == (1, {"echo": 1})


@pytest.mark.parametrize("call", ASYNC_CALLS)
def test_an_async_node_counts_no_request_as_sent_whose_send_was_refused(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], monkeypatch: pytest.MonkeyPatch,
        call: str) -> None:
    """`test_a_node_counts_no_request_as_sent_whose_send_was_refused` for an AsyncNode: a
    lone request, and a batch of three, each refused."""
    async def main() -> dict[str, Any]:
        async with zmqmesh.AsyncNode("caller", **mesh) as node:
            await node.wait_for_service("echo", timeout=10)
            assert await node.request("echo", 0) == 0
            monkeypatch.setattr(pipelined, "send_frames", _refused)
            with pytest.raises(zmqmesh.MeshTimeoutError, match="not accepting"):
                if call == "request":
                    await node.request("echo", 1, timeout=5)
                else:
                    await node.request_many("echo", [1, 2, 3], timeout=5)
            return node.stats()

    stats = asyncio.run(main())
    assert (stats["request"]["sent"], stats["names"]["request"]["sent"]) == (1, {"echo": 1})


def _pending_at_stop(node: zmqmesh.Node, call: str) -> Callable[[], list[BaseException]]:
    """Make three ``held`` requests with ``call`` from another thread; what they raised,
    once the node stopped."""
    raised: list[BaseException] = []

    def calling() -> None:
        try:
            if call == "request":
                node.request("held", 1, timeout=30)
            else:
                node.request_many("held", [1, 2, 3], timeout=30)
        except BaseException as exc:
            raised.append(exc)

    if call == "submit":
        futures = [node.submit("held", n, timeout=30) for n in range(3)]
        return lambda: [f.exception(10) for f in futures]  # type: ignore[misc]
    thread = threading.Thread(target=calling)
    thread.start()
    return lambda: (thread.join(10), raised)[1]


@pytest.mark.parametrize("call", SYNC_CALLS)
def test_requests_pending_when_a_node_stops_are_counted_as_errors(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], call: str) -> None:
    """Requests in flight when their node stops fail with NodeClosedError; they were
    counted as sent and then nowhere (request 1, submit 3, request_many 3 of sent 1 + n:
    received 1, errors 0)."""
    provider, _release = held
    node = zmqmesh.Node("caller", **mesh).start()
    try:
        node.wait_for_service("held", timeout=10)
        assert node.request("echo", 0) == 0
        outcome = _pending_at_stop(node, call)
        n = 1 if call == "request" else 3
        wait_until(lambda: provider.stats()["service"]["received"] == 1 + n, 10, "the requests to arrive")
    finally:
        node.stop()
    assert all(isinstance(e, zmqmesh.NodeClosedError) for e in outcome()), outcome()
    counts = node.stats()["request"]
    assert (counts["sent"], counts["received"], counts["errors"]) == (1 + n, 1, n), counts


@pytest.mark.parametrize("call", ASYNC_CALLS)
def test_an_async_nodes_requests_pending_when_it_stops_are_counted_as_errors(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], call: str) -> None:
    """`test_requests_pending_when_a_node_stops_are_counted_as_errors` for an AsyncNode:
    three requests (or a request_many of three) in flight at its stop."""
    provider, _release = held

    async def main() -> tuple[list[BaseException], dict[str, int]]:
        node = zmqmesh.AsyncNode("caller", **mesh)
        await node.start()
        try:
            await node.wait_for_service("held", timeout=10)
            assert await node.request("echo", 0) == 0
            if call == "request":
                calls = [asyncio.ensure_future(node.request("held", n, timeout=30)) for n in range(3)]
            else:
                calls = [asyncio.ensure_future(node.request_many("held", [1, 2, 3], timeout=30))]
            await asyncio.wait_for(until(lambda: provider.stats()["service"]["received"] == 4), 10)
        finally:
            await node.stop()
        raised = [e for e in await asyncio.gather(*calls, return_exceptions=True)]
        return raised, node.stats()["request"]

    raised, counts = asyncio.run(main())
    assert all(isinstance(e, zmqmesh.NodeClosedError) for e in raised), raised
    assert (counts["sent"], counts["received"], counts["errors"]) == (4, 1, 3), counts


def test_requests_gathered_into_one_batch_each_end_their_own_way(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event]) -> None:
    """Five coroutines of an AsyncNode call in one pass of its loop: the first goes alone
    (nothing else in flight), the four others together, in one batch. Each ends its own
    way: the one with a short timeout times out alone (its batch's others answered or
    still waiting), the one cancelled is forgotten alone, the quick ones are answered,
    and the held one is answered once released; each counted once."""
    provider, release = held

    async def main() -> tuple[list[Any], zmqmesh.AsyncNode]:
        node = zmqmesh.AsyncNode("caller", **mesh)
        await node.start()
        try:
            await node.wait_for_service("held", timeout=10)
            assert await node.request("echo", 0) == 0
            calls = [asyncio.ensure_future(node.request("held", 0, timeout=20)),  # (alone: the provider was idle)
                     asyncio.ensure_future(node.request("held", 1, timeout=0.5)),
                     asyncio.ensure_future(node.request("echo", 2, timeout=20)),
                     asyncio.ensure_future(node.request("held", 3, timeout=20)),
                     asyncio.ensure_future(node.request("echo", 4, timeout=20))]
            assert await asyncio.wait_for(asyncio.gather(calls[2], calls[4]), 10) == [2, 4]
            await asyncio.wait_for(until(lambda: provider.stats()["service"]["received"] == 6), 10)
            calls[3].cancel()
            with pytest.raises(zmqmesh.MeshTimeoutError):
                await asyncio.wait_for(calls[1], 10)
            assert not calls[0].done()  # (held: neither the timeout nor the cancellation ended it)
            release.set()
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
            await asyncio.wait_for(until(lambda: node.stats()["request"]["dropped"] == 2), 10)  # (the late replies)
        finally:
            await node.stop()
        return outcomes, node

    outcomes, node = asyncio.run(main())
    assert outcomes[0] == 0 and outcomes[2] == 2 and outcomes[4] == 4, outcomes
    assert isinstance(outcomes[1], zmqmesh.MeshTimeoutError), outcomes
    assert isinstance(outcomes[3], asyncio.CancelledError), outcomes
    counts = node.stats()["request"]
    assert (counts["sent"], counts["received"], counts["errors"], counts["abandoned"]) == (6, 4, 1, 1), counts


def _slow(msg: zmqmesh.Message) -> None:
    if msg.data < 0:
        raise ValueError("refused")
    time.sleep(msg.data)


def _mixed_providers(mesh: dict[str, Any], release: threading.Event) -> tuple[zmqmesh.Node, zmqmesh.Node]:
    """A provider of ``echo``, ``slow`` (sleeps its data's seconds; a negative number:
    refused, RemoteError) and ``held``; another
    of ``leaving`` alone, to be stopped while it holds its requests."""
    provider = zmqmesh.Node("provider", handler_concurrency=16, **mesh)
    provider.service("echo", lambda m: m.data)
    provider.service("slow", _slow)
    provider.service("held", lambda m: release.wait(20) and m.data)
    leaving = zmqmesh.Node("leaving", handler_concurrency=4, **mesh)
    leaving.service("leaving", lambda m: release.wait(20) and m.data)
    return provider.start(), leaving.start()


def test_a_nodes_request_counters_add_up_whatever_the_outcomes(mesh: dict[str, Any]) -> None:
    """Replies, a timeout, no provider, a provider lost, an error reply, a request_many
    that fails with requests still in flight, and requests pending at the stop, by each
    of request, submit and request_many: every request sent is counted once as received,
    errors or abandoned."""
    release = threading.Event()
    provider, leaving = _mixed_providers(mesh, release)
    node = zmqmesh.Node("caller", **mesh).start()
    pending: list[Any] = []
    try:
        node.wait_for_service("echo", timeout=10)
        node.wait_for_service("leaving", timeout=10)
        assert node.request("echo", 1) == 1
        assert node.request_many("echo", [1, 2, 3]) == [1, 2, 3]
        assert node.submit("echo", 1).result(10) == 1
        with pytest.raises(zmqmesh.MeshTimeoutError):
            node.request("slow", 1.0, timeout=0.2)
        with pytest.raises(zmqmesh.NoProviderError):
            node.request("nobody", timeout=0.2)
        with pytest.raises(zmqmesh.RemoteError):  # (the second still in flight: abandoned)
            node.request_many("slow", [-1, 2.0], timeout=10, window=2)
        lost = [node.submit("leaving", n, timeout=20) for n in range(2)]
        wait_until(lambda: leaving.stats()["service"]["received"] == 2, 10, "the requests to arrive")
        leaving.stop(timeout=0.5)
        for future in lost:
            assert isinstance(future.exception(10), zmqmesh.PeerLostError)
        pending = [node.submit("held", n, timeout=20) for n in range(2)]
        pending.append(_pending_at_stop(node, "request"))
        pending.append(_pending_at_stop(node, "request_many"))
        wait_until(lambda: provider.stats()["service"]["received"] >= 8 + 2 + 1 + 3, 10, "the requests to arrive")
    finally:
        node.stop()
        release.set()
        provider.stop()
        leaving.stop()
    sent, told = _outcomes(node)
    assert sent == told, node.stats()["request"]
    assert sent == 1 + 3 + 1 + 1 + 2 + 2 + 2 + 1 + 3, node.stats()["request"]


def test_an_async_nodes_request_counters_add_up_whatever_the_outcomes(mesh: dict[str, Any]) -> None:
    """`test_a_nodes_request_counters_add_up_whatever_the_outcomes` for an AsyncNode, with
    calls cancelled too (a request and a request_many) while they wait."""
    release = threading.Event()
    provider, leaving = _mixed_providers(mesh, release)

    async def main() -> zmqmesh.AsyncNode:
        node = zmqmesh.AsyncNode("caller", **mesh)
        await node.start()
        pending: list[asyncio.Future[Any]] = []
        try:
            await node.wait_for_service("echo", timeout=10)
            await node.wait_for_service("leaving", timeout=10)
            assert await node.request("echo", 1) == 1
            assert await node.request_many("echo", [1, 2, 3]) == [1, 2, 3]
            with pytest.raises(zmqmesh.MeshTimeoutError):
                await node.request("slow", 1.0, timeout=0.2)
            with pytest.raises(zmqmesh.NoProviderError):
                await node.request("nobody", timeout=0.2)
            with pytest.raises(zmqmesh.RemoteError):
                await node.request_many("slow", [-1, 2.0], timeout=10, window=2)
            lost = [asyncio.ensure_future(node.request("leaving", n, timeout=20)) for n in range(2)]
            await asyncio.wait_for(until(lambda: leaving.stats()["service"]["received"] == 2), 10)
            await asyncio.to_thread(leaving.stop, 0.5)
            for outcome in await asyncio.gather(*lost, return_exceptions=True):
                assert isinstance(outcome, zmqmesh.PeerLostError), outcome
            cancelled = [asyncio.ensure_future(node.request("held", n, timeout=20)) for n in range(3)]
            cancelled.append(asyncio.ensure_future(node.request_many("held", [1, 2], timeout=20)))
            await asyncio.wait_for(until(lambda: provider.stats()["service"]["received"] >= 12), 10)
            for call in cancelled:
                call.cancel()
            await asyncio.gather(*cancelled, return_exceptions=True)
            pending = [asyncio.ensure_future(node.request("held", n, timeout=20)) for n in range(2)]
            pending.append(asyncio.ensure_future(node.request_many("held", [1, 2], timeout=20)))
            await asyncio.wait_for(until(lambda: provider.stats()["service"]["received"] >= 16), 10)
        finally:
            await node.stop()
        await asyncio.gather(*pending, return_exceptions=True)
        return node

    try:
        node = asyncio.run(main())
    finally:
        release.set()
        provider.stop()
        leaving.stop()
    sent, told = _outcomes(node)
    assert sent == told, node.stats()["request"]
    assert sent == 1 + 3 + 1 + 2 + 2 + 5 + 4, node.stats()["request"]


@pytest.mark.parametrize("end", ["provider_left", "deadline"])
def test_requests_that_end_before_their_batch_went_are_not_counted_as_errors(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], end: str) -> None:
    """Requests to a busy provider gather into a batch that goes at the end of the loop's
    pass; those that end before it went (their provider left, their deadline passed, in
    that pass) never go, and were counted as errors all the same: errors 4 for 1 sent."""
    provider, _release = held

    async def main() -> dict[str, int]:
        async with zmqmesh.AsyncNode("caller", **mesh) as node:
            await node.wait_for_service("held", timeout=10)
            requester = node._engine.requests
            calls = [asyncio.ensure_future(node.request("held", n, timeout=0.05 if end == "deadline" else 10))
                     for n in range(4)]
            await asyncio.sleep(0)  # (each made its request: one went alone, the others gathered)
            if end == "deadline":
                time.sleep(0.1)  # (the loop held: the pass goes on past their deadline)
                requester._expire()
            else:
                requester.peer_gone(provider.id)
            raised = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(e, (zmqmesh.PeerLostError, zmqmesh.MeshTimeoutError)) for e in raised), raised
            return node.stats()["request"]

    counts = asyncio.run(main())
    assert (counts["sent"], counts["errors"]) == (1, 1), counts


@pytest.mark.parametrize("end", ["provider_left", "deadline"])
def test_pipelined_requests_that_end_before_their_batch_went_are_not_counted_as_errors(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], end: str) -> None:
    """`test_requests_that_end_before_their_batch_went_are_not_counted_as_errors` for the
    requests a thread pipelines (`Node.request_many`, `Node.submit`): gathered until its
    next pump, and ended before it (errors 4 for 1 sent)."""
    provider, _release = held
    outcomes: list[BaseException | None] = []
    with zmqmesh.Node("caller", **mesh) as node:
        node.wait_for_service("held", timeout=10)
        requester = node._engine.requests.current()  # type: ignore[union-attr]
        with requester.in_use:
            pipelined_ = requester.pipelined()
            timeout = 0.05 if end == "deadline" else 10
            for n in range(4):  # (one goes alone, the others gather: its provider is busy)
                call = node._request_call("held", n, timeout, None, None)
                pipelined_.start(pipelined.Job(call, lambda _key, _value, error: outcomes.append(error), n))
            if end == "deadline":
                time.sleep(0.1)
                pipelined_._expire()
            else:
                directory = node._engine.directory
                alive, directory.alive_ids = directory.alive_ids, frozenset({directory.node_id})
                pipelined_._epoch = -1  # (membership changed, as far as it can tell: the provider left)
                try:
                    pipelined_.prune()
                finally:
                    directory.alive_ids = alive
        assert len(outcomes) == 4 and all(isinstance(e, (zmqmesh.PeerLostError, zmqmesh.MeshTimeoutError))
                                          for e in outcomes), outcomes
        counts = node.stats()["request"]
    assert (counts["sent"], counts["errors"]) == (1, 1), counts


@pytest.mark.parametrize("call", ["request", "request_many"])
def test_a_blocking_call_interrupted_by_a_signal_counts_its_requests_as_abandoned(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], call: str) -> None:
    """A blocking call interrupted while its requests wait (a Ctrl-C's KeyboardInterrupt):
    they were counted as sent and then nowhere (sent 1 + n, received 1, nothing else)."""
    import signal

    provider, _release = held
    main = threading.main_thread().ident
    assert main is not None
    caught = threading.Event()
    n = 1 if call == "request" else 2

    def interrupt() -> None:  # (again each second: one that lands in a weakref callback is dropped)
        wait_until(lambda: provider.stats()["service"]["received"] == 1 + n, 10, "the requests to arrive")
        while not caught.is_set():
            signal.pthread_kill(main, signal.SIGINT)
            caught.wait(1.0)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with zmqmesh.Node("caller", **mesh) as node:
            node.wait_for_service("held", timeout=10)
            assert node.request("echo", 0) == 0
            interrupter = threading.Thread(target=interrupt)
            interrupter.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    if call == "request":
                        node.request("held", 1, timeout=30)
                    else:
                        node.request_many("held", [1, 2], timeout=30)
            finally:
                caught.set()
                interrupter.join()
            counts = node.stats()["request"]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (counts["sent"], counts["received"], counts["errors"], counts["abandoned"]) == (1 + n, 1, 0, n), counts


@pytest.mark.parametrize("call", ASYNC_CALLS)
def test_async_requests_given_up_before_their_batch_went_count_as_nothing(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], call: str) -> None:
    """Requests given up in the pass that gathered them (a call cancelled, its provider
    busy with another; a request_many whose next item cannot be encoded): the batch
    leaves them out, so they never go, but they stayed in the table all the same, and
    the sweep of given-up calls counted them as abandoned (abandoned 1, or 2 for the
    two items of a request_many, beside sent 1 and received 1)."""
    provider, release = held

    async def main() -> dict[str, int]:
        async with zmqmesh.AsyncNode("caller", **mesh) as node:
            await node.wait_for_service("held", timeout=10)
            first = asyncio.ensure_future(node.request("held", 0, timeout=10))
            await asyncio.sleep(0)  # (it went alone: its provider is busy now)
            if call == "request":
                later = asyncio.ensure_future(node.request("held", 1, timeout=10))
                await asyncio.sleep(0)  # (its request gathered, to go at the end of this pass)
                later.cancel()
                assert isinstance((await asyncio.gather(later, return_exceptions=True))[0], asyncio.CancelledError)
            else:  # (two gathered, then the third item cannot be made: the window gives them up)
                with pytest.raises(TypeError):
                    await node.request_many("held", [1, 2, object()], timeout=10)
            await asyncio.sleep(0.1)  # (the sweep of those given up, within `_SWEEP_S`)
            release.set()
            assert await first == 0
            return node.stats()["request"]

    counts = asyncio.run(main())
    assert provider.stats()["service"]["received"] == 1
    assert (counts["sent"], counts["received"], counts["errors"], counts["abandoned"]) == (1, 1, 0, 0), counts


def test_a_submitted_requests_reply_is_counted_before_its_future_completes(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event]) -> None:
    """A `Node.submit` future completes once its request is counted as ended: what a
    done-callback (or the caller the future wakes) reads adds up. The submit thread
    counted a burst's replies as received only after completing their futures: every
    callback read sent 1, received 0 for the one request in flight (and a caller reading
    the stats right after ``result()`` saw 22 of 500 rounds of 20 requests not add up)."""
    seen: list[tuple[int, int]] = []
    with zmqmesh.Node("caller", **mesh) as node:
        node.wait_for_service("echo", timeout=10)
        for n in range(20):
            future = node.submit("echo", n, timeout=10)
            future.add_done_callback(lambda _done: seen.append(_outcomes(node)))
            assert future.result(10) == n
            wait_until(lambda n=n: len(seen) == n + 1, 10, "the done-callback")  # (it may run on this thread)
    assert seen == [(n + 1, n + 1) for n in range(20)], seen


def _interrupted_once_after(real: Callable[..., Any]) -> tuple[Callable[..., None], list[int]]:
    """``real``, followed the first time by a Ctrl-C's KeyboardInterrupt (once it returned:
    what it did was done), and the interrupts left to raise (``[1]``, then ``[0]``)."""
    interrupts = [1]

    def then_interrupted(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        if interrupts[0]:
            interrupts[0] -= 1
            raise KeyboardInterrupt

    return then_interrupted, interrupts


def test_a_request_many_interrupted_once_its_batch_went_counts_those_requests_as_sent(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt right after a batch of a request_many went (the socket
    took it; the count was to come after): its requests were then counted as abandoned,
    never as sent (sent 1, received 1, abandoned 3: 3 more ended than went; 8,319 more in
    30,000 request_many calls interrupted at random, 8,807 times)."""
    send_on_then_interrupted, interrupts = _interrupted_once_after(pipelined.send_on)
    with zmqmesh.Node("caller", **mesh) as node:
        node.wait_for_service("held", timeout=10)
        assert node.request("echo", 0) == 0
        monkeypatch.setattr(pipelined, "send_on", send_on_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            node.request_many("held", [1, 2, 3], timeout=30)
        assert interrupts == [0]
        counts = node.stats()["request"]
        assert node.request_many("echo", [4, 5], timeout=10) == [4, 5]  # (the node serves on)
    assert (counts["sent"], counts["received"], counts["abandoned"]) == (4, 1, 3), counts


def test_a_request_interrupted_as_it_went_counts_as_sent_and_abandoned(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt as a blocking request's frames went (raised once the
    send returned): the request was taken back as never sent, while its provider had it
    (30,000 requests interrupted at random 9,310 times: the caller counted 27,250 sent,
    its provider 30,005 received: 2,755 sent but uncounted, their replies dropped)."""
    provider, _release = held
    send_frames_then_interrupted, interrupts = _interrupted_once_after(thread_requests.send_frames)
    with zmqmesh.Node("caller", **mesh) as node:
        node.wait_for_service("held", timeout=10)
        assert node.request("echo", 0) == 0
        monkeypatch.setattr(thread_requests, "send_frames", send_frames_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            node.request("held", 1, timeout=30)
        assert interrupts == [0]
        wait_until(lambda: provider.stats()["service"]["received"] == 2, 10, "the interrupted request to arrive")
        assert node.request("echo", 2, timeout=10) == 2  # (the node serves on)
        counts = node.stats()["request"]
    assert (counts["sent"], counts["received"], counts["abandoned"]) == (3, 2, 1), counts


def test_a_request_interrupted_before_its_frames_went_counts_as_never_sent(
        mesh: dict[str, Any], held: tuple[zmqmesh.Node, threading.Event], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt while a blocking request's frames were made, before
    any went: it was counted as sent and abandoned, and its provider never had it (sent
    3, received 2, abandoned 1; the provider received 2). It did not go: not counted."""
    from zmqmesh._wire import frames as wire

    provider, _release = held
    real_frames = wire.request_frames
    interrupts = [1]

    def frames_interrupted(*args: Any) -> list[bytes]:
        if interrupts[0]:
            interrupts[0] -= 1
            raise KeyboardInterrupt
        return real_frames(*args)

    with zmqmesh.Node("caller", **mesh) as node:
        node.wait_for_service("echo", timeout=10)
        assert node.request("echo", 0) == 0
        monkeypatch.setattr(wire, "request_frames", frames_interrupted)
        with pytest.raises(KeyboardInterrupt):
            node.request("echo", 1, timeout=30)
        assert interrupts == [0]
        assert node.request("echo", 2, timeout=10) == 2  # (the node serves on)
        counts = node.stats()["request"]
        received = provider.stats()["service"]["received"]
    assert (counts["sent"], counts["received"], counts.get("abandoned", 0), received) == (2, 2, 0, 2), (counts, received)
