"""A service's one provider, kept across requests (`Calling.sole`), is given up as soon as
the offers change: a second provider that joins takes its turn from the next request on,
and a provider that withdraws the service or leaves, while requests run, is never sent
the next one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh

pytestmark = pytest.mark.timeout(60)


def _provider(name: str, mesh: dict[str, Any]) -> zmqmesh.Node:
    """A started node whose ``who`` service answers its name."""
    node = zmqmesh.Node(name, **mesh)
    node.service("who", lambda _msg: name)
    return node.start()


def _offering(client: zmqmesh.Node | zmqmesh.AsyncNode, count: int) -> bool:
    """Whether ``count`` peers offer ``who``, as the client sees them."""
    return sum("who" in p.services for p in client.peers()) == count


@pytest.fixture
def first(mesh: dict[str, Any]) -> Iterator[zmqmesh.Node]:
    node = _provider("p1", mesh)
    yield node
    node.stop()


def test_an_async_caller_takes_a_provider_that_joins_from_the_next_request(
        mesh: dict[str, Any], first: zmqmesh.Node) -> None:
    """p1 alone serves 40 requests (64 in flight at most: its provider kept); p2 offers
    the service too: of the next eight requests in turn, p2 serves some (the round robin alternates; eight leave room for a lookup between two of them)."""

    async def scenario() -> None:
        async with zmqmesh.AsyncNode("client", **mesh) as client:
            await client.wait_for_service("who", timeout=10)
            assert set(await asyncio.gather(*(client.request("who", timeout=10) for _ in range(40)))) == {"p1"}
            second = _provider("p2", mesh)
            try:
                await asyncio.to_thread(wait_until, lambda: _offering(client, 2), 10, "p2 to be seen")
                served = [await client.request("who", timeout=10) for _ in range(8)]
                assert set(served) == {"p1", "p2"}, served
            finally:
                second.stop()

    asyncio.run(scenario())


def test_a_sync_caller_takes_a_provider_that_joins_from_the_next_request(
        mesh: dict[str, Any], first: zmqmesh.Node) -> None:
    """`async`'s twin for `Node.request`, `submit` and `request_many`."""
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("who", timeout=10)
        assert {client.request("who", timeout=10) for _ in range(10)} == {"p1"}
        assert set(client.request_many("who", [None] * 40, timeout=10)) == {"p1"}
        assert client.submit("who", timeout=10).result(10) == "p1"
        second = _provider("p2", mesh)
        try:
            wait_until(lambda: _offering(client, 2), 10, "p2 to be seen")
            assert {client.request("who", timeout=10) for _ in range(8)} == {"p1", "p2"}
            assert set(client.request_many("who", [None] * 8, timeout=10, window=1)) == {"p1", "p2"}
            assert {client.submit("who", timeout=10).result(10) for _ in range(8)} == {"p1", "p2"}
        finally:
            second.stop()


def test_a_service_withdrawn_while_requests_run_is_not_asked_for_again(
        mesh: dict[str, Any], first: zmqmesh.Node) -> None:
    """Requests run on while p1 withdraws ``who``; once the client sees it, the next
    request raises `NoProviderError` at once, and nothing more is sent: the kept provider
    was given up (sent to, p1 would have answered that it no longer offers it)."""
    async def scenario() -> None:
        async with zmqmesh.AsyncNode("client", **mesh) as client:
            await client.wait_for_service("who", timeout=10)
            stop = asyncio.Event()

            async def keep_asking() -> None:
                while not stop.is_set():
                    try:
                        await client.request("who", timeout=1)
                    except zmqmesh.NoProviderError:
                        return

            callers = [asyncio.create_task(keep_asking()) for _ in range(8)]
            await client.request("who", timeout=1)  # (the same timeout: the same calls, `Calling`)
            assert first.unservice("who")
            await asyncio.to_thread(wait_until, lambda: _offering(client, 0), 10, "the withdrawal to be seen")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), 10)
            sent = client.stats()["request"]["sent"]
            with pytest.raises(zmqmesh.NoProviderError):
                await client.request("who", timeout=1)
            assert client.stats()["request"]["sent"] == sent

    asyncio.run(scenario())


def test_a_provider_that_leaves_while_requests_run_is_not_sent_the_next_one(mesh: dict[str, Any]) -> None:
    """p1 and p2 serve; p2 withdraws, so p1 is the one provider (kept); then p2 offers
    again and p1 stops while 8 coroutines keep asking: once the client sees p1 gone,
    every next request is p2's, none fails."""
    p1 = _provider("p1", mesh)
    p2 = _provider("p2", mesh)
    try:
        async def scenario() -> None:
            async with zmqmesh.AsyncNode("client", **mesh) as client:
                await asyncio.to_thread(wait_until, lambda: _offering(client, 2), 10, "both providers")
                p2.unservice("who")
                await asyncio.to_thread(wait_until, lambda: _offering(client, 1), 10, "p2's withdrawal")
                # (the same timeout throughout: the same calls, `Calling`)
                assert {await client.request("who", timeout=5) for _ in range(10)} == {"p1"}
                p2.service("who", lambda _msg: "p2")
                await asyncio.to_thread(wait_until, lambda: _offering(client, 2), 10, "p2's offer")
                gone = threading.Event()

                async def keep_asking() -> None:
                    while not gone.is_set():
                        try:
                            await client.request("who", timeout=5)
                        except zmqmesh.PeerLostError:
                            pass  # (in flight to p1 as it stopped)

                callers = [asyncio.create_task(keep_asking()) for _ in range(8)]
                await asyncio.to_thread(p1.stop)
                await asyncio.to_thread(wait_until, lambda: _offering(client, 1), 10, "p1's departure")
                gone.set()
                await asyncio.wait_for(asyncio.gather(*callers), 10)
                served = await asyncio.gather(*(client.request("who", timeout=5) for _ in range(20)))
                assert set(served) == {"p2"}

        asyncio.run(scenario())
    finally:
        p1.stop()
        p2.stop()


def test_a_sync_request_its_sole_provider_no_longer_serves_fails_with_no_provider_counted_once(
        mesh: dict[str, Any], first: zmqmesh.Node) -> None:
    """A blocking request sent straight to the one provider (`BlockingRunner.request`)
    just after it withdrew ``who`` (before the caller sees the withdrawal, as a rule):
    answered that it is no longer offered, the call goes on as its plan (no other
    provider: `NoProviderError`), and it is counted once: as many requests sent as the
    caller received replies and the provider received requests."""
    with zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("who", timeout=10)
        assert client.request("who", timeout=2) == "p1"
        assert first.unservice("who")
        with pytest.raises(zmqmesh.NoProviderError):
            client.request("who", timeout=2)
        counts = client.stats()["request"]
        received = first.stats()["service"]["received"]
    assert counts["sent"] == counts["received"] == received, (counts, received)
    assert counts["sent"] in (1, 2), counts  # (2: it went before the withdrawal was seen)
