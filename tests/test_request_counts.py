"""The request counters count what went: a request that did not go is not counted as
sent, under its service's name either."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import zmqmesh
from zmqmesh._drivers import pipelined
from zmqmesh._drivers.thread import requests as thread_requests

pytestmark = pytest.mark.timeout(60)

SYNC_CALLS = ["request", "submit", "request_many"]
ASYNC_CALLS = ["request", "request_many"]


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
