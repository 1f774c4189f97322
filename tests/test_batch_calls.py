"""push_many and publish_many: every item delivered in order, encoded before any is sent
(one bad item fails the call and sends nothing), on both node kinds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh

pytestmark = pytest.mark.timeout(60)

N = 25_000  # past send_queue_max (10,000): the calls wait for room as they go


@contextlib.contextmanager
def _sender_and_receiver(mesh: dict[str, Any]) -> Iterator[tuple[zmqmesh.Node, list[Any], list[Any]]]:
    """A sender, and what a receiver pulls from "jobs" and hears on "t.", in order."""
    pulled: list[Any] = []
    heard: list[Any] = []
    with zmqmesh.Node("sender", **mesh) as sender, zmqmesh.Node("receiver", **mesh) as receiver:
        receiver.pull("jobs", lambda msg: pulled.append(msg.data))
        receiver.subscribe("t.", lambda msg: heard.append(msg.data))
        sender.wait_for_pullers("jobs", timeout=10)
        sender.wait_for_subscribers("t.", 1, timeout=10)
        yield sender, pulled, heard


def test_push_many_and_publish_many_deliver_everything_in_order(mesh: dict[str, Any]) -> None:
    with _sender_and_receiver(mesh) as (sender, pulled, heard):
        sender.push_many("jobs", ({"i": i} for i in range(N)), timeout=10)
        sender.publish_many("t.x", range(N))
        wait_until(lambda: len(pulled) == N and len(heard) == N, 30, "every item")
        assert [m["i"] for m in pulled] == list(range(N))
        assert heard == list(range(N))
        # one item msgpack cannot encode: the call fails, and nothing of it is sent
        with pytest.raises(TypeError):
            sender.push_many("jobs", [1, 2, object(), 4], timeout=10)
        with pytest.raises(TypeError):
            sender.publish_many("t.x", [1, object()])
        sender.push_many("jobs", ["after"], timeout=10)
        sender.publish_many("t.x", ["after"], headers={"k": "v"})
        wait_until(lambda: pulled[-1] == "after" and heard[-1] == "after", 10, "the markers")
        assert len(pulled) == N + 1 and len(heard) == N + 1
        sender.push_many("jobs", [], timeout=10)  # nothing to do, at once
        sender.publish_many("t.x", [])
        # ... but what a call with items would raise, it raises (before: nothing, at all)
        for bad in ("x" * 300, "\udc80"):
            with pytest.raises(ValueError):
                sender.push_many(bad, [], timeout=10)
            with pytest.raises(ValueError):
                sender.push_many(bad, ["one"], timeout=10)
            with pytest.raises(ValueError):
                sender.publish_many(bad, [])
            with pytest.raises(ValueError):
                sender.publish_many(bad, ["one"])
    with pytest.raises(zmqmesh.NodeClosedError):
        sender.push_many("jobs", [], timeout=10)
    with pytest.raises(zmqmesh.NodeClosedError):
        sender.publish_many("t.x", [])


def test_a_flush_gives_the_loop_back_after_its_slice_and_sends_the_rest_at_its_next_turn(
        mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that keeps a send queue full must not keep the loop sending for as long as
    it goes on: a flush sends for `FLUSH_SLICE_S` at most. With no time at all, each flush
    sends a frame of each queue and leaves the rest for the loop's next turn: nothing is
    stranded (no later call comes to wake the loop), and the order holds."""
    from zmqmesh._engine import outbound

    monkeypatch.setattr(outbound, "FLUSH_SLICE_S", 0.0)
    with _sender_and_receiver(mesh) as (sender, pulled, heard):
        sender.push_many("jobs", range(N), timeout=10)
        sender.publish_many("t.x", range(N))
        wait_until(lambda: len(pulled) == N and len(heard) == N, 30, "every item")
        assert pulled == list(range(N)) and heard == list(range(N))


def test_the_async_twins_do_the_same(mesh: dict[str, Any]) -> None:
    pulled: list[Any] = []
    heard: list[Any] = []

    async def main() -> None:
        async with zmqmesh.AsyncNode("sender", **mesh) as sender, zmqmesh.AsyncNode("receiver", **mesh) as receiver:
            receiver.pull("jobs", lambda msg: pulled.append(msg.data))
            receiver.subscribe("t.", lambda msg: heard.append(msg.data))
            await sender.wait_for_pullers("jobs", timeout=10)
            await sender.wait_for_subscribers("t.", 1, timeout=10)
            await sender.push_many("jobs", range(N), timeout=10)
            await sender.publish_many("t.x", range(N))
            with pytest.raises(TypeError):
                await sender.push_many("jobs", [object()], timeout=10)
            for _ in range(3000):
                if len(pulled) == N and len(heard) == N:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert pulled == list(range(N)) and heard == list(range(N))


def test_push_many_sends_large_bytes_as_push_does(mesh: dict[str, Any]) -> None:
    """``push_many`` pushes each item as `push` does: ``bytes`` of 64 KiB or more travel as
    they are, so a ``zero_copy`` puller gets them as views, the small ones as ``bytes``.
    (They were encoded as msgpack: copied once more, and handed over as ``bytes``.)"""
    import os

    kept: list[Any] = []
    blobs = [os.urandom(100_000), b"small", os.urandom(64 * 1024), {"a": 1}, os.urandom(300_000)]
    with zmqmesh.Node("receiver", **mesh) as receiver, zmqmesh.Node("sender", **mesh) as sender:
        receiver.pull("views", kept.append, zero_copy=True)
        sender.wait_for_pullers("views", timeout=10)
        sender.push_many("views", blobs, timeout=10)
        sender.push_many("views", iter(blobs[:1]), timeout=10)
        wait_until(lambda: len(kept) == len(blobs) + 1, 30, "every item")
    assert [type(m.data) for m in kept] == [memoryview, bytes, memoryview, dict, memoryview, memoryview]
    assert [bytes(m.data) if isinstance(m.data, memoryview) else m.data for m in kept] == blobs + blobs[:1]
