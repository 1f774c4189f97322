"""Many requests in flight from a sync Node without a thread each: request_many (from the
calling thread) and submit (futures, any thread). Replies in order, errors where they
belong, back-pressure, and nothing left waiting when a provider dies or the node stops."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh
from zmqmesh._drivers import pipelined

pytestmark = pytest.mark.timeout(60)


def _echo_nodes(mesh: dict[str, Any], n: int = 2) -> list[zmqmesh.Node]:
    nodes = []
    for i in range(n):
        node = zmqmesh.Node(f"echo-{i}", **mesh)

        @node.service("echo")
        def echo(msg: zmqmesh.Message, name: str = node.name) -> Any:
            if msg.data == "boom":
                raise ValueError("boom asked for")
            return {"echo": msg.data, "by": name}

        nodes.append(node.start())
    return nodes


@pytest.fixture
def echo_providers(mesh: dict[str, Any]) -> Iterator[Callable[..., list[zmqmesh.Node]]]:
    """Start ``n`` echo providers in this test's mesh; every one is stopped at teardown."""
    started: list[zmqmesh.Node] = []

    def start(n: int = 2) -> list[zmqmesh.Node]:
        nodes = _echo_nodes(mesh, n)
        started.extend(nodes)
        return nodes

    yield start
    for node in started:
        node.stop()


def test_request_many_returns_every_reply_in_order_from_both_providers(echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers()
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", 2, timeout=10)
        threads_before = threading.active_count()
        replies = client.request_many("echo", range(2000), timeout=10, window=16)
        assert [r["echo"] for r in replies] == list(range(2000))
        assert {r["by"] for r in replies} == {"echo-0", "echo-1"}  # round robin across providers
        assert threading.active_count() == threads_before  # no thread per request
        stats = client.stats()["request"]
        assert stats["sent"] == 2000 and stats["received"] == 2000
        assert client.request_many("echo", [], timeout=10) == []
        # window 1 is one request at a time, and still right
        assert [r["echo"] for r in client.request_many("echo", ["a", "b"], window=1)] == ["a", "b"]
        with pytest.raises(zmqmesh.ConfigError):
            client.request_many("echo", [1], window=0)
        # what the calls share is checked with the first item, after its data, as `request` does
        assert client.request_many("", []) == []
        with pytest.raises(TypeError):
            client.request_many("", [object()])
        with pytest.raises(ValueError):
            client.request_many("", [1])



def test_request_many_raises_the_first_failure_and_the_node_goes_on(echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers(1)
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", timeout=10)
        items = [*range(50), "boom", *range(50, 100), "boom"]
        with pytest.raises(zmqmesh.RemoteError) as raised:
            client.request_many("echo", items, timeout=10, window=8)
        assert raised.value.remote_type == "ValueError" and "boom asked for" in str(raised.value)
        with pytest.raises(TypeError):  # an item msgpack cannot encode fails the call
            client.request_many("echo", [1, object()], timeout=10)
        with pytest.raises(zmqmesh.NoProviderError):
            client.request_many("nobody", [1], timeout=0.3)
        # the requests left in flight were forgotten: later calls are not confused by them
        assert client.request("echo", "after", timeout=10)["echo"] == "after"
        assert [r["echo"] for r in client.request_many("echo", range(10))] == list(range(10))



def test_submit_from_many_threads_resolves_every_future(echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers()
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", 2, timeout=10)
        futures: dict[int, Future[Any]] = {}
        lock = threading.Lock()

        def caller(base: int) -> None:
            for i in range(base, base + 500):
                future = client.submit("echo", i, timeout=20)
                with lock:
                    futures[i] = future

        callers = [threading.Thread(target=caller, args=(k * 500,)) for k in range(4)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(20)
        assert sorted(futures) == list(range(2000))
        for i, future in futures.items():
            assert future.result(timeout=20)["echo"] == i
        assert not futures[0].cancel()  # sent: it cannot be taken back
        failing = client.submit("echo", "boom", timeout=10)
        with pytest.raises(zmqmesh.RemoteError):
            failing.result(timeout=10)
        # nobody offers it: the future waits for a provider (not the submit thread), then fails
        started = time.monotonic()
        missing = client.submit("nobody", 1, timeout=0.5)
        assert client.submit("echo", "meanwhile", timeout=10).result(timeout=10)["echo"] == "meanwhile"
        with pytest.raises(zmqmesh.NoProviderError):
            missing.result(timeout=10)
        assert time.monotonic() - started < 5
        with pytest.raises(TypeError):
            client.submit("echo", object())



def test_submit_applies_back_pressure(mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipelined, "MAX_SUBMITTED", 4)
    with zmqmesh.Node("slow", **mesh) as slow, zmqmesh.Node("client", **mesh) as client:
        slow.service("nap", lambda msg: time.sleep(0.5) or msg.data)
        client.wait_for_service("nap", timeout=10)
        first = [client.submit("nap", i, timeout=20) for i in range(4)]
        started = time.monotonic()
        with pytest.raises(zmqmesh.MeshTimeoutError, match="in flight"):
            client.submit("nap", 99, timeout=0.2)  # no room frees up within its timeout
        assert time.monotonic() - started < 2
        later = client.submit("nap", 4, timeout=20)  # waits for room, then goes
        assert [f.result(timeout=20) for f in [*first, later]] == [0, 1, 2, 3, 4]


def test_submitted_requests_fail_when_the_provider_dies(spawn: Any, mesh: dict[str, Any]) -> None:
    doomed = spawn("doomed", service=["block"], block_s=30)
    with zmqmesh.Node("client", **{**mesh, "peer_timeout_s": 30.0, "heartbeat_interval_s": 10.0}) as client:
        client.wait_for_service("block", timeout=10)
        futures = [client.submit("block", i, timeout=25) for i in range(3)]
        doomed.wait_line("BLOCKING", timeout=10)
        doomed.kill()
        for future in futures:
            with pytest.raises(zmqmesh.PeerLostError):
                future.result(timeout=15)


def test_submitted_requests_fail_when_the_node_stops(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("slow", **mesh) as slow:
        slow.service("nap", lambda msg: time.sleep(3))
        client = zmqmesh.Node("client", **mesh).start()
        try:
            client.wait_for_service("nap", timeout=10)
            futures = [client.submit("nap", i, timeout=30) for i in range(3)]
            time.sleep(0.2)
        finally:
            client.stop()
        for future in futures:
            with pytest.raises(zmqmesh.NodeClosedError):
                future.result(timeout=5)
        with pytest.raises(zmqmesh.NodeClosedError):
            client.submit("nap", 1)


def _slow_and_fast_booms(node: zmqmesh.Node) -> None:
    @node.service("boom")
    def boom(msg: zmqmesh.Message) -> Any:
        if msg.data == "slow":
            time.sleep(0.3)
            raise KeyError("the slow one")
        raise ValueError("the fast one")


def test_request_many_raises_the_failure_of_the_first_item_not_the_first_seen(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("booms", handler_concurrency=4, **mesh) as booms, zmqmesh.Node("client", **mesh) as client:
        _slow_and_fast_booms(booms)
        client.wait_for_service("boom", timeout=10)
        with pytest.raises(zmqmesh.RemoteError) as raised:
            client.request_many("boom", ["slow", "fast"], timeout=10)  # the fast one fails first
        assert raised.value.remote_type == "KeyError"


def test_submitted_requests_made_before_the_provider_appears_all_go_through(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("client", **mesh) as client:
        futures = [client.submit("late", i, timeout=10) for i in range(400)]  # nobody offers it yet
        time.sleep(0.3)
        with zmqmesh.Node("late", handler_concurrency=64, **mesh) as late:
            late.service("late", lambda msg: time.sleep(0.05) or msg.data)
            assert [f.result(timeout=20) for f in futures] == list(range(400))


def test_done_callbacks_may_submit_but_not_wait(echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers(1)
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", timeout=10)
        seen: list[Any] = []
        chained: list[Future[Any]] = []

        def callback(future: Future[Any]) -> None:
            try:
                client.request("echo", "from a callback", timeout=5)
            except zmqmesh.ZmqMeshError as exc:
                seen.append(exc)
            chained.append(client.submit("echo", "chained", timeout=5))

        client.submit("echo", 1, timeout=10).add_done_callback(callback)
        wait_until(lambda: chained, 10, "the chained submit")
        assert len(seen) == 1 and "submit thread" in str(seen[0])
        assert chained[0].result(timeout=10)["echo"] == "chained"



def test_request_many_ends_with_node_closed_when_the_node_stops(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("slow", handler_concurrency=4, **mesh) as slow:
        slow.service("nap", lambda msg: time.sleep(3))
        client = zmqmesh.Node("client", **mesh).start()
        outcome: list[BaseException] = []

        def calling() -> None:
            try:
                client.request_many("nap", range(8), timeout=30, window=4)
            except BaseException as exc:  # noqa: BLE001  (the test looks at what it was)
                outcome.append(exc)

        try:
            client.wait_for_service("nap", timeout=10)
            caller = threading.Thread(target=calling)
            caller.start()
            time.sleep(0.3)
        finally:
            client.stop()
        caller.join(10)
        assert not caller.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], zmqmesh.NodeClosedError), outcome


def test_a_nested_request_many_on_the_same_thread_leaves_the_outer_one_whole(echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers(1)
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", timeout=10)

        def items() -> Any:
            yield 1
            yield 2
            inner = client.request_many("echo", [10, 11], timeout=5)  # made while the outer one runs
            yield inner[1]["echo"]

        assert [r["echo"] for r in client.request_many("echo", items(), timeout=5)] == [1, 2, 11]



def test_many_requests_that_wait_for_providers_do_not_hold_each_other_up(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("client", **mesh) as client:
        never = [client.submit("never-offered", i, timeout=6) for i in range(12)]
        soon = client.submit("soon", 1, timeout=5)
        time.sleep(0.5)
        with zmqmesh.Node("soon", **mesh) as provider:
            provider.service("soon", lambda msg: msg.data)
            assert soon.result(timeout=5) == 1  # not after the twelve before it waited out their time
            assert not any(f.done() for f in never)
        with pytest.raises(TypeError):
            client.submit("soon", 1, peer=123)  # type: ignore[arg-type]


def test_a_provider_with_concurrent_handlers_replies_as_they_finish(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("provider", handler_concurrency=8, **mesh) as provider, \
            zmqmesh.Node("client", **mesh) as client:
        provider.service("nap", lambda msg: time.sleep(0.2) or msg.data)
        client.wait_for_service("nap", timeout=10)
        futures = [client.submit("nap", i, timeout=3) for i in range(400)]
        answered = [f for f in futures if f.exception(timeout=10) is None]
        # 8 at a time for 3 s: about 110 are answered in time (before, the provider held
        # every reply back until its whole backlog was handed out, and none were)
        assert len(answered) >= 40


def test_async_request_many_keeps_order_and_the_first_failure(mesh: dict[str, Any]) -> None:
    async def main() -> None:
        async with zmqmesh.AsyncNode("provider", handler_concurrency=4, **mesh) as provider, \
                zmqmesh.AsyncNode("client", **mesh) as client:
            provider.service("echo", lambda msg: msg.data)
            _slow_and_fast_booms(provider)  # type: ignore[arg-type]
            await client.wait_for_service("boom", timeout=10)
            assert await client.request_many("echo", range(500), timeout=10, window=16) == list(range(500))
            assert await client.request_many("echo", [], timeout=10) == []
            with pytest.raises(zmqmesh.RemoteError) as raised:
                await client.request_many("boom", ["slow", "fast"], timeout=10)
            assert raised.value.remote_type == "KeyError"
            with pytest.raises(zmqmesh.ConfigError):
                await client.request_many("echo", [1], window=0)

    asyncio.run(main())


def test_an_async_provider_running_handlers_concurrently_reads_what_comes_while_it_replies(
        mesh: dict[str, Any]) -> None:
    """Its replies go out from the handlers' tasks, outside a drain of its sockets; a send
    can take the router's readiness edge with it, and a batch of requests that came
    meanwhile then waited for the next edge, which a client waiting for that very batch
    never sent (before the fix, 4 rounds in 40 timed out here; after it, none in 80)."""
    async def main() -> None:
        async with zmqmesh.AsyncNode("provider", handler_concurrency=4, **mesh) as provider, \
                zmqmesh.AsyncNode("client", **mesh) as client:
            provider.service("echo", lambda msg: msg.data)
            await client.wait_for_service("echo", timeout=10)
            for _ in range(30):
                # (a lost edge stalls a round for good: a generous timeout still shows it, and a
                # host that stalls for seconds does not)
                assert await client.request_many("echo", range(500), timeout=20, window=16) == list(range(500))

    asyncio.run(main())


def test_a_callback_that_raises_system_exit_leaves_submit_working(echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers(1)
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", timeout=10)

        def leave(future: Future[Any]) -> None:
            raise SystemExit("from a callback")

        client.submit("echo", 1, timeout=10).add_done_callback(leave)
        assert client.submit("echo", 2, timeout=10).result(timeout=10)["echo"] == 2
        with pytest.raises(zmqmesh.NoProviderError, match="node deadbeef does not offer"):
            client.submit("echo", 3, peer="deadbeef", timeout=0.3).result(timeout=10)


def _replies(sock: Any, expected: int) -> list[list[tuple[bytes, bytes, bytes]]]:
    """The reply frames a raw DEALER gets until ``expected`` replies came: each frame as
    its replies ``(request_id, status, body)`` (one, or a batch)."""
    from zmqmesh._wire import frames as wire

    got: list[list[tuple[bytes, bytes, bytes]]] = []
    while sum(map(len, got)) < expected:
        assert sock.poll(10_000), f"{sum(map(len, got))} of {expected} replies came"
        (frame,) = sock.recv_multipart()
        batch = wire.parse_reply_batch(frame) if wire.is_batch(frame) else None
        got.append(batch if batch is not None else [wire.parse_reply([frame])])  # type: ignore[list-item]
    return got


def test_a_batch_of_requests_is_answered_request_by_request(mesh: dict[str, Any]) -> None:
    import msgpack
    import zmq

    from zmqmesh._patterns.request_batches import EARLY_ITEMS
    from zmqmesh._wire import frames as wire

    with zmqmesh.Node("provider", **mesh) as node:
        node.service("echo", lambda msg: msg.data)
        node.service("nap", lambda msg: time.sleep(1.0) or "rested")

        @node.service("boom")
        def boom(msg: zmqmesh.Message) -> None:
            raise ValueError("asked for")

        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        try:
            dealer.connect(node.endpoints["service"])
            packed = msgpack.packb
            dealer.send(wire.request_batch([
                (b"echo", b"id-1", packed(1)), (b"boom", b"id-2", packed(2)), (b"nobody", b"id-3", packed(3)),
                (b"echo", b"x" * 65, packed(4)), (b"echo", b"id-5", b"\xc1"), (b"echo", b"id-6", packed({"a": 6}))]))
            replies = {rid: (status, body) for frame in _replies(dealer, 6) for rid, status, body in frame}
            assert replies[b"id-1"] == (wire.STATUS_OK, packed(1))
            assert replies[b"id-2"][0] == wire.STATUS_ERROR and b"asked for" in replies[b"id-2"][1]
            assert replies[b"id-3"] == (wire.STATUS_NO_SERVICE, b"")
            assert replies[b"x" * 65] == (wire.STATUS_BAD_REQUEST, b"")  # an id over 64 bytes
            assert replies[b"id-5"] == (wire.STATUS_BAD_REQUEST, b"")  # an undecodable body
            assert replies[b"id-6"] == (wire.STATUS_OK, packed({"a": 6}))

            # a reply never waits for a handler that may be slow: echo's goes before nap runs
            dealer.send(wire.request_batch([(b"echo", b"fast", packed(0)), (b"nap", b"slow", packed(0))]))
            first, second = _replies(dealer, 2)
            assert [r[0] for r in first] == [b"fast"] and [r[0] for r in second] == [b"slow"]

            # the replies of a handler quick on its last runs go back together, in a batch
            for _ in range(30):
                dealer.send(wire.request_batch([(b"echo", b"%d" % i, packed(i)) for i in range(10)]))
                if any(len(frame) > 1 for frame in _replies(dealer, 10)):
                    break
            else:
                raise AssertionError("no reply batch in 30 batches of quick requests")

            # two full frames of requests that arrive together: the replies to each go back in
            # a frame of their own (the first's once the second's first handler ran). (A handler
            # that once took over 0.5 ms, preempted, lets replies go one by one for a while: tries.)
            full = EARLY_ITEMS
            for _ in range(30):
                dealer.send(wire.request_batch([(b"echo", b"a%d" % i, packed(i)) for i in range(full)]))
                dealer.send(wire.request_batch([(b"echo", b"b%d" % i, packed(i)) for i in range(full)]))
                got = _replies(dealer, 2 * full)
                if [[rid[:1] for rid, _, _ in frame] for frame in got] == [[b"a"] * full, [b"b"] * full]:
                    break
            else:
                raise AssertionError("the replies to 30 pairs of full frames never came back a frame each")
            # small frames that arrive together: their replies merge (a frame per frame would
            # keep a pipeline cut small for good)
            for _ in range(30):
                for k in range(4):
                    dealer.send(wire.request_batch([(b"echo", b"%d-%d" % (k, i), packed(i)) for i in range(5)]))
                if [len(frame) for frame in _replies(dealer, 20)] == [20]:
                    break
            else:
                raise AssertionError("the replies to 30 sets of 4 small frames never came back in one frame")

            # a batch that runs past its end is dropped whole, and counted; the next is served
            malformed = node.stats()["rejected"].get("service_malformed", 0)
            dealer.send(wire.request_batch([(b"echo", b"cut", packed(7))])[:-1])
            wait_until(lambda: node.stats()["rejected"].get("service_malformed", 0) == malformed + 1, 10,
                       "the malformed batch counted")
            dealer.send(wire.request_batch([(b"echo", b"after-a", packed(8)), (b"echo", b"after-b", packed(9))]))
            assert sorted(r for frame in _replies(dealer, 2) for r in frame) == [
                (b"after-a", wire.STATUS_OK, packed(8)), (b"after-b", wire.STATUS_OK, packed(9))]
        finally:
            dealer.close(0)


def test_requests_in_flight_from_many_coroutines_and_threads_are_all_answered(
        echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any]) -> None:
    echo_providers(1)
    with zmqmesh.Node("caller", **mesh) as caller:
        caller.wait_for_service("echo", timeout=10)
        items = [*range(150), "boom", *range(150, 300)]
        futures = [caller.submit("echo", item, timeout=20) for item in items]
        for item, future in zip(items, futures):
            if item == "boom":
                with pytest.raises(zmqmesh.RemoteError, match="boom asked for"):
                    future.result(timeout=20)
            else:
                assert future.result(timeout=20)["echo"] == item

    async def gather() -> list[Any]:
        async with zmqmesh.AsyncNode("acaller", **mesh) as node:
            await node.wait_for_service("echo", timeout=10)
            return await asyncio.gather(*(node.request("echo", item, timeout=20) for item in items),
                                        return_exceptions=True)

    outcomes = asyncio.run(gather())
    assert isinstance(outcomes[150], zmqmesh.RemoteError)
    assert [o["echo"] for o in outcomes[:150] + outcomes[151:]] == list(range(300))


def test_request_many_from_an_iterator_sends_each_request_as_its_item_comes(mesh: dict[str, Any]) -> None:
    seen = [threading.Event() for _ in range(6)]

    def one_by_one() -> Iterator[int]:
        for i in range(6):
            if i:  # the next item comes only once the request of the one before was handled
                assert seen[i - 1].wait(10), f"the request of item {i - 1} was not sent before item {i} came"
            yield i

    with zmqmesh.Node("provider", **mesh) as provider, zmqmesh.Node("caller", **mesh) as caller:
        provider.service("note", lambda msg: seen[msg.data].set() or msg.data)
        caller.wait_for_service("note", timeout=10)
        assert caller.request_many("note", one_by_one(), timeout=20) == list(range(6))


def test_requests_of_a_request_many_that_failed_are_never_sent_later(mesh: dict[str, Any]) -> None:
    seen: list[Any] = []
    with zmqmesh.Node("provider", **mesh) as provider, zmqmesh.Node("caller", **mesh) as caller:
        provider.service("note", lambda msg: seen.append(msg.data))
        caller.wait_for_service("note", timeout=10)
        with pytest.raises(TypeError):
            caller.request_many("note", [1, 2, 3, object()])  # the last cannot be encoded
        caller.request_many("note", ["after"])
        assert seen[-1] == "after" and 2 not in seen and 3 not in seen


def test_an_unhashable_handler_in_a_batch_is_served(mesh: dict[str, Any]) -> None:
    class Doubler:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, msg: zmqmesh.Message) -> Any:
            return msg.data * 2

    with zmqmesh.Node("provider", **mesh) as provider, zmqmesh.Node("caller", **mesh) as caller:
        provider.service("quick", lambda msg: msg.data)
        provider.service("double", Doubler())
        caller.wait_for_service("double", timeout=10)
        caller.wait_for_service("quick", timeout=10)
        for _ in range(3):
            assert caller.request_many("quick", range(10)) == list(range(10))
            assert caller.request_many("double", range(50)) == [2 * i for i in range(50)]


def test_an_async_provider_never_holds_a_reply_for_a_sync_handler(mesh: dict[str, Any]) -> None:
    import msgpack
    import zmq

    from zmqmesh._wire import frames as wire

    async def serve(endpoint: list[str], stop: threading.Event) -> None:
        async with zmqmesh.AsyncNode("provider", **mesh) as node:
            async def aecho(msg: zmqmesh.Message) -> Any:
                return msg.data

            node.service("aecho", aecho)
            node.service("nap", lambda msg: time.sleep(0.3) or "rested")
            endpoint.append(node.endpoints["service"])
            while not stop.is_set():
                await asyncio.sleep(0.02)

    endpoint: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(serve(endpoint, stop),))
    thread.start()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        wait_until(lambda: bool(endpoint), 10, "the provider")
        dealer.connect(endpoint[0])
        packed = msgpack.packb
        for _ in range(12):  # (past the eighth time, aecho was quick on its last runs: its reply is held)
            dealer.send(wire.request_batch([(b"aecho", b"fast", packed(0)), (b"nap", b"slow", packed(0))]))
            first, second = _replies(dealer, 2)
            assert [r[0] for r in first] == [b"fast"] and [r[0] for r in second] == [b"slow"]
    finally:
        dealer.close(0)
        stop.set()
        thread.join(10)


def test_async_request_many_gives_up_what_it_no_longer_waits_for(mesh: dict[str, Any]) -> None:
    """`AsyncNode.request_many` keeps its window in the requester's table without a future
    per request: a request_many that is cancelled forgets its requests (their replies, when
    they come, are counted as dropped), one that times out raises `MeshTimeoutError`, an
    item that cannot be encoded raises `TypeError` at once, and a call with headers, or
    one that first waits for its provider, goes on as its plan; the node serves the next
    call every time, and a node that is not running raises `NodeClosedError`."""
    async def main() -> None:
        async with zmqmesh.AsyncNode("provider", handler_concurrency=4, **mesh) as provider, \
                zmqmesh.AsyncNode("client", **mesh) as client:
            provider.service("echo", lambda msg: msg.data)

            @provider.service("nap")
            def nap(msg: zmqmesh.Message) -> Any:
                time.sleep(1.0)  # (far longer than the 0.1 s before the cancel, on a slow host too)
                return msg.data

            await client.wait_for_service("nap", timeout=10)
            many = asyncio.ensure_future(client.request_many("nap", range(8), timeout=10, window=8))
            await asyncio.sleep(0.1)
            many.cancel()
            with pytest.raises(asyncio.CancelledError):
                await many
            for _ in range(200):  # (the loop must run meanwhile: the replies are read on it)
                if client.stats()["request"]["dropped"] >= 8:
                    break
                await asyncio.sleep(0.05)
            assert client.stats()["request"]["dropped"] == 8  # every reply came late, and was counted
            assert await client.request_many("echo", range(100), timeout=10) == list(range(100))

            with pytest.raises(zmqmesh.MeshTimeoutError):
                await client.request_many("nap", range(8), timeout=0.1)
            with pytest.raises(TypeError):
                await client.request_many("echo", [1, object(), 3], timeout=10)
            assert await client.request_many("echo", ["after"], timeout=10) == ["after"]

            provider.service("header", lambda msg: msg.headers.get("k"))
            await client.wait_for_service("header", timeout=10)
            assert await client.request_many("header", range(5), timeout=10, headers={"k": "v"}) == ["v"] * 5

            late = asyncio.ensure_future(client.request_many("later", range(20), timeout=10))
            await asyncio.sleep(0.2)
            provider.service("later", lambda msg: -msg.data)
            assert await late == [-i for i in range(20)]
        with pytest.raises(zmqmesh.NodeClosedError):
            await client.request_many("echo", [1], timeout=10)
        with pytest.raises(zmqmesh.NodeClosedError):
            await zmqmesh.AsyncNode("never-started", **mesh).request_many("echo", [1], timeout=10)

    asyncio.run(main())


def test_async_request_many_refills_its_window_as_replies_come(mesh: dict[str, Any]) -> None:
    """The window is refilled where its replies are read, also when they are read right
    after a batch went (the requester's look at the sockets it sent on): the requests made
    there go in the next batch, never left waiting until their timeout. Large runs, a
    window that is not a multiple of a batch, each must finish well within its timeout."""
    async def main() -> None:
        async with zmqmesh.AsyncNode("client", **mesh) as client:
            await client.wait_for_service("echo", timeout=10)
            for window in (64, 40, 7):
                items = list(range(6000))
                assert await client.request_many("echo", items, timeout=15, window=window) == items

    with zmqmesh.Node("provider", **mesh) as provider:  # (its own threads: replies come while the client reads)
        provider.service("echo", lambda msg: msg.data)
        asyncio.run(main())


def test_a_request_larger_than_its_provider_takes_fails_at_once_and_loses_nothing_beside_it(
        mesh: dict[str, Any]) -> None:
    """A provider announces its ``max_message_bytes``; a request body past it ends the
    connection that carried it (ZeroMQ's MAXMSGSIZE), for good, with the requests in
    flight on it. It was sent all the same: the call waited out its timeout
    (MeshTimeoutError), and so did every request sent after it on that connection (3
    rounds of 4 submitted, the large one and 4 more: all 8 beside it lost in the second and third;
    both neighbours of a request_many's large item). Now it is not sent:
    `MessageTooLargeError` at once, counted in no request counter, the others answered;
    a provider that takes it is picked over one that does not."""
    big = b"x" * 200_000
    narrow = zmqmesh.Node("narrow", max_message_bytes=100_000, handler_concurrency=4, **mesh)
    narrow.service("size", lambda msg: len(msg.data) if isinstance(msg.data, bytes) else msg.data)

    async def from_async_node() -> None:
        async with zmqmesh.AsyncNode("async-caller", **mesh) as node:
            await node.wait_for_service("size", timeout=10)
            beside = asyncio.ensure_future(node.request_many("size", list(range(4)), timeout=10))
            await asyncio.sleep(0)  # (its requests went)
            with pytest.raises(zmqmesh.MessageTooLargeError):
                await node.request("size", big, timeout=5)
            assert await beside == [0, 1, 2, 3]

    with narrow.start(), zmqmesh.Node("caller", **mesh) as caller:
        caller.wait_for_service("size", timeout=10)
        beside = [caller.submit("size", n, timeout=10) for n in range(4)]
        with pytest.raises(zmqmesh.MessageTooLargeError):
            caller.submit("size", big, timeout=5).result(10)
        assert [f.result(10) for f in beside] == [0, 1, 2, 3]
        with pytest.raises(zmqmesh.MessageTooLargeError):
            caller.request_many("size", [1, big, 2], timeout=5)
        with pytest.raises(zmqmesh.MessageTooLargeError):
            caller.request("size", big, timeout=5)
        assert caller.request_many("size", [1, 2], timeout=10) == [1, 2]
        counts = caller.stats()["request"]
        # (the 2 after the large item may have gone in one frame with the 1 before it: once the
        # call raised, it is forgotten, abandoned, and its reply dropped if it comes later)
        assert counts["sent"] == counts["received"] + counts.get("abandoned", 0) and counts["errors"] == 0, counts
        assert counts.get("abandoned", 0) <= 1, counts
        asyncio.run(from_async_node())
        with zmqmesh.Node("wide", **mesh) as wide:
            wide.service("size", lambda msg: len(msg.data))
            caller.wait_for_service("size", 2, timeout=10)
            assert caller.request_many("size", [big] * 4, timeout=10) == [200_000] * 4
            assert caller.submit("size", big, timeout=10).result(10) == 200_000


def test_requests_past_send_hwm_wait_for_room_instead_of_failing(mesh: dict[str, Any]) -> None:
    """A `request_many` window, or `submit`s, past the frames the caller's socket to a
    provider holds (``send_hwm``) wait for room as the provider reads, within their
    timeout: back-pressure, not a failure. (With ``send_hwm=100`` and ``window=3000`` a
    request_many failed in 0.02-0.17 s with MeshTimeoutError "not accepting requests";
    its socket was taken for a dropped connection, and the requests waiting on it were
    lost with it and timed out; of 1,000 submits of 70 KB, 328 failed at once and 72 timed
    out after 10 s.)"""
    with zmqmesh.Node("echo", **mesh) as provider, zmqmesh.Node("client", **mesh, send_hwm=10) as client:
        provider.service("echo", lambda msg: msg.data)
        client.wait_for_service("echo", timeout=10)
        small, large = list(range(3000)), [bytes([i % 256]) * 70_000 for i in range(300)]  # (large: a frame each)
        for items in (small, large):
            assert client.request_many("echo", items, timeout=20, window=3000) == items
            assert client.request_many("echo", iter(items), timeout=20, window=3000) == items
            futures = [client.submit("echo", item, timeout=20) for item in items]
            assert [future.result(30) for future in futures] == items
        counts = client.stats()["request"]
        assert counts["errors"] == counts["abandoned"] == 0, counts
        assert not [r for r in client.stats()["rejected"] if r.startswith("request_link")]


def test_async_request_many_past_send_hwm_waits_for_room_instead_of_failing(mesh: dict[str, Any]) -> None:
    """`AsyncNode.request_many`'s twin of the above: what the socket refuses waits on the
    loop for room, in order, each request within its timeout. (With ``send_hwm=100`` and
    ``window=3000``, from an iterator or with items of 70 KB, it failed in 0.12-0.18 s with
    MeshTimeoutError "not accepting requests", and a socket with 99 requests waiting on it
    was replaced, as if its connection had been dropped.)"""
    async def main() -> None:
        async with zmqmesh.AsyncNode("echo", **mesh) as provider, \
                zmqmesh.AsyncNode("client", **mesh, send_hwm=10) as client:
            provider.service("echo", lambda msg: msg.data)
            await client.wait_for_service("echo", timeout=10)
            small, large = list(range(3000)), [bytes([i % 256]) * 70_000 for i in range(300)]
            for items in (small, large):
                assert await client.request_many("echo", items, timeout=20, window=3000) == items
                assert await client.request_many("echo", iter(items), timeout=20, window=3000) == items
                assert await asyncio.gather(*(client.request("echo", item, timeout=20) for item in items)) == items
            counts = client.stats()["request"]
            assert counts["errors"] == counts["abandoned"] == 0, counts
            assert not [r for r in client.stats()["rejected"] if r.startswith("request_link")]

    asyncio.run(main())


@contextlib.contextmanager
def _interrupted_in(code: Any, line_text: str) -> Iterator[None]:
    """Raise a KeyboardInterrupt on this thread as it comes to the line of ``code`` (a
    function's code object) holding ``line_text``, as a Ctrl-C's signal handler may; once."""
    import linecache
    import sys

    def in_code(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and line_text in linecache.getline(code.co_filename, frame.f_lineno):
            sys.settrace(None)
            frame.f_trace = None
            raise KeyboardInterrupt
        return in_code

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return in_code if frame.f_code is code else None

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)


def test_submits_interrupted_by_a_ctrl_c_leave_their_room_to_later_ones(
        echo_providers: Callable[..., list[zmqmesh.Node]], mesh: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C's KeyboardInterrupt in `submit` once it took room for its request (in the
    semaphore's acquire, or before the request was queued) kept that room for ever: 10
    of 4,096 taken in 95 interrupts of 30,000 submits, and once all was taken every
    submit timed out. Now a submit takes room only by queueing its request."""
    monkeypatch.setattr(pipelined, "MAX_SUBMITTED", 2)
    echo_providers(1)
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("echo", timeout=10)
        assert client.submit("echo", 0, timeout=10).result(10)["echo"] == 0  # (the submit thread runs)
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt), \
                    _interrupted_in(pipelined.Submitter.submit.__code__, "set_running_or_notify_cancel"):
                client.submit("echo", 1, timeout=10)
        futures = [client.submit("echo", i, timeout=2) for i in range(2, 6)]
        assert [f.result(10)["echo"] for f in futures] == [2, 3, 4, 5]


def test_request_many_names_an_item_far_into_the_items_that_cannot_be_encoded(mesh: dict[str, Any]) -> None:
    """The items of a list or a tuple are encoded as many at a time as the window has room
    for (one map of the packer over them): one that cannot be encoded, windows into the
    items, is still named by its index and raised in its turn, none from it on is sent, and
    the calls after it go as before; so with items from a generator (taken one by one), and
    from an `AsyncNode`."""
    seen: list[int] = []
    items = [*range(300), object(), *range(301, 400)]
    with zmqmesh.Node("provider", **mesh) as provider:
        provider.service("note", lambda msg: seen.append(msg.data) or msg.data)
        with zmqmesh.Node("caller", **mesh) as caller:
            caller.wait_for_service("note", timeout=10)
            for batch in (items, tuple(items), (item for item in items)):
                with pytest.raises(zmqmesh.EncodeError, match=r"^item 300 \(from 0\) of the batch \(object\)"):
                    caller.request_many("note", batch, timeout=10, window=16)
                assert caller.request_many("note", ["after"], timeout=10) == ["after"]
                assert seen[-1] == "after" and max(seen[:-1]) < 300, seen[-20:]
                seen.clear()

        async def from_async() -> None:
            async with zmqmesh.AsyncNode("async-caller", **mesh) as caller:
                await caller.wait_for_service("note", timeout=10)
                for batch in (items, tuple(items), (item for item in items)):
                    with pytest.raises(zmqmesh.EncodeError, match=r"^item 300 \(from 0\) of the batch \(object\)"):
                        await caller.request_many("note", batch, timeout=10, window=16)
                    assert await caller.request_many("note", ["after"], timeout=10) == ["after"]
                    await asyncio.sleep(0.2)  # (requests the window forgot may still be handled: all before item 300)
                    assert "after" in seen and max(item for item in seen if item != "after") < 300, seen[-20:]
                    seen.clear()

        asyncio.run(from_async())


def test_replies_keyed_by_anything_msgpack_carries_decode_as_they_did(mesh: dict[str, Any]) -> None:
    """Replies are decoded with msgpack's defaults first (maps keyed by str or bytes), and
    again as before when those refuse them: maps keyed by ints, floats, None or arrays (as
    tuples) come back whole; a reply that is not msgpack is a `DecodeError`."""
    replies: dict[str, Any] = {
        "str": {"a": 1, "b": [1, {"c": b"x"}]},
        "bytes": {b"k": "v"},
        "int": {1: "one", -2: {3: "three"}},
        "mixed": {1.5: None, None: 2, True: "t", "s": {4: 4}},
        "array": {(1, 2): "pair"},
    }
    with zmqmesh.Node("provider", **mesh) as provider, zmqmesh.Node("caller", **mesh) as caller:
        provider.service("reply", lambda msg: replies[msg.data])
        caller.wait_for_service("reply", timeout=10)
        for name, reply in replies.items():
            assert caller.request("reply", name, timeout=10) == reply, name
        assert caller.request_many("reply", list(replies), timeout=10) == list(replies.values())
    codec = caller._engine.codec
    for frame in (b"\xc1", b"\x01\x02", b"\x81\x91\x01"):
        with pytest.raises(zmqmesh.DecodeError):
            codec.decode(frame)
