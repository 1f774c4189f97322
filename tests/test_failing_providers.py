"""Providers whose handlers fail awkwardly, replies too large for their caller, and
providers lost mid-request: the caller always hears of it, at once, and the failure is
counted; the provider and the caller's way to it keep working."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import rejected

import zmqmesh


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() failed")


def _failing_handlers() -> dict[str, Any]:
    def str_raises(msg: Any) -> None:
        raise _StrRaises()

    def huge_message(msg: Any) -> None:
        raise ValueError("x" * (2 << 20))  # past max_message_bytes=1 MiB below

    def surrogate(msg: Any) -> None:
        raise FileNotFoundError(b"/tmp/\xff".decode("utf-8", "surrogateescape"))  # os.fsdecode of a bad name

    return {"str_raises": str_raises, "huge_message": huge_message, "surrogate": surrogate}


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_handler_failure_that_cannot_be_described_as_is_still_answered(mesh: dict[str, Any],
                                                                          concurrency: int) -> None:
    provider = zmqmesh.Node("provider", **mesh, handler_concurrency=concurrency, max_message_bytes=1 << 20)
    for name, handler in _failing_handlers().items():
        provider.service(name, handler)
    provider.service("echo", lambda m: m.data)
    with provider, zmqmesh.Node("caller", **mesh, max_message_bytes=1 << 20) as caller:
        caller.wait_for_service("echo", timeout=10)
        for name in _failing_handlers():
            started = time.monotonic()
            with pytest.raises(zmqmesh.RemoteError):
                caller.request(name, 1, timeout=3)
            assert time.monotonic() - started < 2, f"{name}: the caller waited out its timeout"
        with pytest.raises(zmqmesh.RemoteError):  # in a batch too
            caller.request_many("str_raises", [1, 2, 3], timeout=3)
        assert caller.request("echo", 5, timeout=3) == 5, "the provider still serves"
        assert caller.request_many("echo", list(range(100)), timeout=5) == list(range(100))
        assert provider.stats()["rejected"].get("service_malformed", 0) == 0, "a handler failure is no malformed input"


def test_an_async_handler_failure_that_cannot_be_described_as_is_still_answered(mesh: dict[str, Any]) -> None:
    async def main() -> None:
        provider = zmqmesh.AsyncNode("provider", **mesh, max_message_bytes=1 << 20)

        @provider.service("bad")
        async def bad(msg: Any) -> None:
            raise _StrRaises()

        provider.service("echo", lambda m: m.data)
        async with provider, zmqmesh.AsyncNode("caller", **mesh, max_message_bytes=1 << 20) as caller:
            await caller.wait_for_service("echo", timeout=10)
            started = time.monotonic()
            with pytest.raises(zmqmesh.RemoteError):
                await caller.request("bad", 1, timeout=3)
            assert time.monotonic() - started < 2
            assert await caller.request("echo", 5, timeout=3) == 5

    asyncio.run(main())


@pytest.fixture
def limits_unannounced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes take no peer's ``X-ZMQMESH-MAX-MESSAGE-BYTES`` in: as with a caller of a version
    before it, a provider sends a reply past the caller's limit, which ends the connection."""
    from zmqmesh._mesh.directory import Directory

    monkeypatch.setattr(Directory, "_narrower_limit", lambda self, announced: None)


@pytest.mark.usefixtures("limits_unannounced")
def test_a_reply_past_the_callers_limit_does_not_cut_it_off_from_the_provider(mesh: dict[str, Any]) -> None:
    """ZeroMQ ends the connection that carried a frame past MAXMSGSIZE and never
    reconnects it: every requester kind must get a working socket back, and count it
    (a caller whose limit its provider does not know: one that announced none)."""
    provider = zmqmesh.Node("provider", **mesh)  # 16 MiB: replies larger than the caller takes
    provider.service("big", lambda m: b"z" * (3 << 20) if m.data == 0 else m.data)
    with provider, zmqmesh.Node("caller", **mesh, max_message_bytes=1 << 20) as caller:
        caller.wait_for_service("big", timeout=10)
        calls = {
            "request": lambda x: caller.request("big", x, timeout=2),
            "request_many": lambda x: caller.request_many("big", [x, 7], timeout=2)[0],
            "submit": lambda x: caller.submit("big", x, timeout=2).result(5),
        }
        for name, call in calls.items():
            with pytest.raises(zmqmesh.MeshTimeoutError):
                call(0)  # the reply never arrives: its connection is closed under it
            time.sleep(0.3)
            assert call(5) == 5, f"{name}: the provider is still reachable"
        assert caller.stats()["rejected"].get("request_link_dropped", 0) >= 3


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("limits_unannounced")
@pytest.mark.parametrize("kind", ["Node", "AsyncNode"])
def test_a_connection_dropped_under_steady_requests_is_replaced(mesh: dict[str, Any], kind: str) -> None:
    """A connection ZeroMQ dropped (a reply past the caller's limit) refuses every frame;
    the requests sent on it wait out their timeouts, and the frames refused meanwhile are
    kept aside for room. Under steady traffic some always waited, so the socket was never
    replaced: of 1,020 submits over 5 s, none was answered, and nothing was counted. Now,
    once no request sent on it waits any more (only those kept aside), it is replaced, as
    a refusing socket on which none waits is (`request_link_dropped`)."""
    provider = zmqmesh.Node("provider", **mesh)  # 16 MiB: replies larger than the caller takes
    provider.service("big", lambda m: b"z" * (3 << 20) if m.data == 0 else m.data)

    def dropped(caller: Any) -> int:
        return int(rejected(caller, "request_link_dropped"))

    with provider:
        if kind == "Node":
            with zmqmesh.Node("caller", **mesh, max_message_bytes=1 << 20) as caller:
                caller.wait_for_service("big", timeout=10)
                kept = [caller.submit("big", x, timeout=0.5) for x in [0] + [7] * 10]  # (0 drops the connection)
                deadline = time.monotonic() + 10
                while not dropped(caller) and time.monotonic() < deadline:  # steady traffic
                    kept.append(caller.submit("big", 7, timeout=0.5))
                    time.sleep(0.02)
                assert dropped(caller) == 1, "the dropped connection was replaced"
                assert caller.submit("big", 5, timeout=5).result(10) == 5
        else:
            async def main() -> None:
                async with zmqmesh.AsyncNode("caller", **mesh, max_message_bytes=1 << 20) as caller:
                    await caller.wait_for_service("big", timeout=10)
                    kept = [asyncio.ensure_future(caller.request("big", x, timeout=0.5)) for x in [0] + [7] * 10]
                    deadline = time.monotonic() + 10
                    while not dropped(caller) and time.monotonic() < deadline:
                        kept.append(asyncio.ensure_future(caller.request("big", 7, timeout=0.5)))
                        await asyncio.sleep(0.02)
                    await asyncio.gather(*kept, return_exceptions=True)
                    assert dropped(caller) == 1, "the dropped connection was replaced"
                    assert await caller.request("big", 5, timeout=5) == 5

            asyncio.run(main())


@pytest.mark.timeout(90)
def test_a_connection_clogged_with_requests_a_stopped_provider_never_read_is_said_to_be_so(
        spawn: Any, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Requests given up on (timed out) that a provider stopped by SIGSTOP never read fill
    their connection; the next request, refused by it, goes on a new one, counted and
    logged as a provider that stopped reading, from `submit` and from `request` alike.
    (They were counted as ``request_link_dropped`` and logged as a connection dropped, "a
    reply larger than max_message_bytes", or stuck.)"""
    patient = {"peer_timeout_s": 60.0, "heartbeat_interval_s": 20.0}  # (stopped, it is still there)
    provider = spawn("stopped", service=["echo"], options=patient)
    big = b"z" * (1 << 20)  # (a few of them fill the loopback connection's buffers)
    with zmqmesh.Node("caller", **{**mesh, **patient}, send_hwm=4) as caller:
        caller.wait_for_service("echo", timeout=10)
        assert caller.request("echo", 1, timeout=5) == {"echo": 1, "by": "stopped"}
        provider.signal(signal.SIGSTOP)
        try:
            for future in [caller.submit("echo", big, timeout=1) for _ in range(40)]:
                with pytest.raises(zmqmesh.MeshTimeoutError):
                    future.result(15)
            with pytest.raises(zmqmesh.MeshTimeoutError):
                caller.submit("echo", 2, timeout=0.5).result(15)  # (on a new connection, to the stopped provider)
            assert rejected(caller, "request_link_stalled") == 1
            for _ in range(60):  # blocking requests, one at a time, until the socket refuses one
                with pytest.raises(zmqmesh.MeshTimeoutError):
                    caller.request("echo", big, timeout=0.2)
                if rejected(caller, "request_link_stalled") == 2:
                    break
            assert rejected(caller, "request_link_stalled") == 2
        finally:
            provider.signal(signal.SIGCONT)
        assert rejected(caller, "request_link_dropped") == 0, "no connection was dropped"
        assert caller.submit("echo", 3, timeout=10).result(15) == {"echo": 3, "by": "stopped"}
        assert caller.request("echo", 4, timeout=10) == {"echo": 4, "by": "stopped"}
    said = [r.getMessage() for r in caplog.records if "stopped reading" in r.getMessage()]
    assert len(said) == 2, said
    assert not any("max_message_bytes" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("limits_unannounced")
def test_an_async_node_gets_over_a_reply_past_its_limit(mesh: dict[str, Any]) -> None:
    provider = zmqmesh.Node("provider", **mesh)
    provider.service("big", lambda m: b"z" * (3 << 20) if m.data == 0 else m.data)

    async def main() -> None:
        async with zmqmesh.AsyncNode("caller", **mesh, max_message_bytes=1 << 20) as caller:
            await caller.wait_for_service("big", timeout=10)
            with pytest.raises(zmqmesh.MeshTimeoutError):
                await caller.request("big", 0, timeout=2)
            await asyncio.sleep(0.3)
            assert await caller.request("big", 5, timeout=2) == 5
            assert await caller.request_many("big", [1, 2, 3], timeout=2) == [1, 2, 3]

    with provider:
        asyncio.run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_reply_past_the_limit_its_caller_announced_is_refused_at_once(mesh: dict[str, Any], concurrency: int) -> None:
    """A provider does not send a reply larger than the ``max_message_bytes`` its caller
    announced: the caller gets `MessageTooLargeError` (a `RemoteError`) at once, and the
    requests in flight beside it on the same connection are answered; a handler's failure
    too long to describe in full is cut to that limit. (It sent them: ZeroMQ ended the
    caller's connection, the caller waited out its timeout of 10 s, and a request sent
    beside it on that connection failed too.)"""
    provider = zmqmesh.Node("provider", handler_concurrency=concurrency, **mesh)  # 16 MiB
    provider.service("big", lambda m: b"z" * (3 << 20) if m.data == 0 else m.data)

    async def big_async(m: zmqmesh.Message) -> Any:
        return "z" * (3 << 20)

    def fails_at_length(m: zmqmesh.Message) -> None:
        raise ValueError("x" * (3 << 20))  # (its error reply is cut to what the caller takes)

    provider.service("big_async", big_async)
    provider.service("fails", fails_at_length)
    with provider, zmqmesh.Node("caller", **mesh, max_message_bytes=1 << 20) as caller:
        for service in ("big", "big_async", "fails"):
            caller.wait_for_service(service, timeout=10)
        for service, kind in (("big", "MessageTooLargeError"), ("big_async", "MessageTooLargeError"),
                              ("fails", "ValueError")):
            started = time.monotonic()
            with pytest.raises(zmqmesh.RemoteError) as raised:
                caller.request(service, 0, timeout=10)
            assert raised.value.remote_type == kind, raised.value
            assert time.monotonic() - started < 5, "the caller waited out its timeout"
        beside = [caller.submit("big", 0, timeout=10), caller.submit("big", 5, timeout=10)]
        with pytest.raises(zmqmesh.RemoteError, match="MessageTooLargeError"):
            beside[0].result(15)
        assert beside[1].result(15) == 5, "the request beside the refused one is answered"
        assert caller.stats()["rejected"].get("request_link_dropped", 0) == 0
    assert provider.stats()["service"]["errors"] == 4


@pytest.mark.timeout(60)
def test_an_async_request_retried_elsewhere_raises_what_the_retry_raised_alone(mesh: dict[str, Any]) -> None:
    """A request whose provider is lost is retried elsewhere (an idempotent service), and
    what the retry raises is raised as it is. The quick way's failure went on as its plan
    while it was being handled, so the retry's RemoteError carried the PeerLostError as
    its context: its traceback said the one was raised "during handling of" the other."""
    async def main() -> tuple[BaseException | None, BaseException | None]:
        async with zmqmesh.AsyncNode("refuser", **mesh) as refuser, \
                zmqmesh.AsyncNode("caller", **mesh) as caller:
            lost = zmqmesh.AsyncNode("lost", **mesh)
            await lost.start()
            began = asyncio.Event()

            async def blocked(msg: zmqmesh.Message) -> None:
                began.set()
                await asyncio.Event().wait()

            def refuse(msg: zmqmesh.Message) -> None:
                raise ValueError("refused")

            lost.service("idem", blocked, idempotent=True)
            await caller.wait_for_service("idem", timeout=10)
            calling = asyncio.ensure_future(caller.request("idem", 1, timeout=30))
            await asyncio.wait_for(began.wait(), 10)  # (the request went the quick way, to the one provider)
            refuser.service("idem", refuse, idempotent=True)
            await caller.wait_for_service("idem", 2, timeout=10)
            await lost.stop(timeout=0.5)
            await asyncio.wait([calling], timeout=20)
            error = calling.exception()
            return error, None if error is None else error.__context__

    error, context = asyncio.run(main())
    assert isinstance(error, zmqmesh.RemoteError) and "refused" in str(error), error
    assert context is None, f"the retry's failure was raised while {context!r} was handled"


def test_an_async_node_counts_requests_lost_with_their_provider(mesh: dict[str, Any]) -> None:
    provider = zmqmesh.Node("provider", **mesh)
    release = threading.Event()
    provider.service("slow", lambda m: release.wait(10))

    async def main() -> None:
        async with zmqmesh.AsyncNode("caller", **mesh) as caller:
            await caller.wait_for_service("slow", timeout=10)
            tasks = [asyncio.ensure_future(caller.request("slow", i, timeout=10)) for i in range(3)]
            await asyncio.sleep(0.3)
            await asyncio.get_running_loop().run_in_executor(None, provider.stop, 1.0)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            lost = sum(isinstance(r, zmqmesh.PeerLostError) for r in results)
            assert lost >= 1
            assert caller.stats()["request"]["errors"] >= lost, "a PeerLostError is counted, as a sync Node counts it"

    provider.start()
    try:
        asyncio.run(main())
    finally:
        release.set()
        provider.stop(1.0)


@pytest.mark.timeout(90)
def test_submits_to_a_healthy_provider_go_on_while_those_to_a_stopped_one_wait_for_room(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """Submits to a provider stopped by SIGSTOP fill their connection (``send_hwm=4``, 1 MiB
    each) and wait for room; a submit to another, healthy provider meanwhile is answered at
    once, and a `request_many` over an iterator raises as soon as its first request times
    out. (Before: the submit thread waited for room on the stopped provider's connection,
    up to the timeout of the request it held, and the healthy provider's request, behind
    it, timed out unsent: MeshTimeoutError after 2 s; the iterator's call raised half a
    second past the deadline of its first request.)"""
    patient = {"peer_timeout_s": 60.0, "heartbeat_interval_s": 20.0}  # (stopped, it is still there)
    stopped = spawn("stopped", service=["echo"], options=patient)
    with zmqmesh.Node("healthy", **{**mesh, **patient}) as healthy, \
            zmqmesh.Node("caller", **{**mesh, **patient}, send_hwm=4) as caller:
        healthy.service("double", lambda msg: msg.data * 2)
        caller.wait_for_service("echo", timeout=10)
        caller.wait_for_service("double", timeout=10)
        stopped.signal(signal.SIGSTOP)
        try:
            waiting = [caller.submit("echo", b"z" * (1 << 20), timeout=3) for _ in range(40)]
            assert caller.submit("double", 21, timeout=2).result(15) == 42
            assert not any(future.done() for future in waiting), "the stopped provider answered"
            for future in waiting:
                with pytest.raises(zmqmesh.MeshTimeoutError):
                    future.result(15)

            first_sent: list[float] = []

            def slowly() -> Iterator[bytes]:
                for _ in range(40):
                    first_sent.append(time.monotonic())
                    yield b"z" * (1 << 20)
                    time.sleep(0.05)

            with pytest.raises(zmqmesh.MeshTimeoutError):
                caller.request_many("echo", slowly(), timeout=1, window=100)
            assert len(first_sent) < 40, "the call went on past its first request's deadline"
        finally:
            stopped.signal(signal.SIGCONT)
        counts = caller.stats()["request"]
        assert counts["sent"] == counts["received"] + counts["errors"] + counts["abandoned"], counts
