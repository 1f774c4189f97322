"""A caller that asks and never reads its replies cannot make its provider hold them
without a bound: large replies not yet written out are bounded in bytes, per caller and
in all, and a reply past the bound is replaced by a small error, counted."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from helpers import rss_bytes

import zmqmesh
from zmqmesh._wire.frames import STATUS_ERROR, STATUS_OK

MIB = 1 << 20


@contextlib.contextmanager
def _caller_that_reads_nothing(node: zmqmesh.Node) -> Iterator[zmq.Socket[Any]]:
    """A raw DEALER connected to ``node``'s service socket that reads nothing ahead of the
    test (its receive mark 1, a small kernel buffer); closed on leaving."""
    ctx = zmq.Context()
    caller = ctx.socket(zmq.DEALER)
    try:
        caller.setsockopt(zmq.LINGER, 0)
        caller.setsockopt(zmq.RCVHWM, 1)
        caller.setsockopt(zmq.RCVBUF, 64 * 1024)
        caller.connect(node.endpoints["service"])
        time.sleep(0.3)
        yield caller
    finally:
        caller.close(0)
        ctx.term()


@pytest.mark.timeout(60)
def test_a_caller_that_never_reads_its_large_replies_costs_its_provider_a_bounded_amount(mesh: dict[str, Any]) -> None:
    """300 requests of a few bytes each, for replies of 1 MiB, from a socket that reads
    nothing: the provider held all 300 (grew by 300 MiB; 1,000 such requests, 1 GiB).
    Now it holds about four times ``send_queue_max_bytes`` for that caller (here 64 MiB),
    and answers the rest with an error the caller gets as soon as it reads: every request
    is answered."""
    reply = os.urandom(MIB)
    count = 300
    with zmqmesh.Node("provider", send_queue_max_bytes=16 * MIB, **mesh) as node:
        node.service("large", lambda message: reply)
        with _caller_that_reads_nothing(node) as caller:
            base = peak = rss_bytes()
            for i in range(count):
                caller.send_multipart([b"large", i.to_bytes(8, "big"), msgpack.packb(None)])
            deadline = time.monotonic() + 20
            while node.stats()["service"].get("sent", 0) < count and time.monotonic() < deadline:
                peak = max(peak, rss_bytes())
                time.sleep(0.02)
            for _ in range(10):  # (what is written out meanwhile is not held)
                peak = max(peak, rss_bytes())
                time.sleep(0.05)
            assert peak - base < 200 * MIB, f"the provider grew by {(peak - base) // MIB} MiB"
            stats = node.stats()["service"]
            assert stats["sent"] == count, stats
            assert stats.get("reply_refused", 0) > count // 2, stats
            answered = {STATUS_OK: 0, STATUS_ERROR: 0}
            caller.setsockopt(zmq.RCVTIMEO, 10_000)
            for _ in range(count):
                request_id, status, body = caller.recv_multipart()
                answered[status] += 1
                if status == STATUS_OK:
                    assert msgpack.unpackb(body) == reply
                else:
                    assert "not sent" in msgpack.unpackb(body)["message"]
            assert answered[STATUS_ERROR] == stats["reply_refused"]
            assert answered[STATUS_OK] == count - stats["reply_refused"]


@pytest.mark.timeout(60)
def test_callers_that_read_their_large_replies_get_them_all(mesh: dict[str, Any]) -> None:
    """The bound is on replies not yet written out: a node's callers, which read theirs,
    get every one, one at a time and 64 in flight (``request_many``'s default window)."""
    reply = os.urandom(MIB)
    with zmqmesh.Node("provider", **mesh) as provider:
        provider.service("large", lambda message: reply)
        with zmqmesh.Node("caller", **mesh) as caller:
            caller.wait_for_service("large", timeout=15)
            for _ in range(20):
                assert caller.request("large", timeout=10) == reply
            got = caller.request_many("large", range(200), timeout=20)
            assert len(got) == 200 and all(r == reply for r in got)
        assert provider.stats()["service"].get("reply_refused", 0) == 0


@pytest.mark.timeout(60)
def test_a_refused_reply_names_the_option_that_bounds_it(mesh: dict[str, Any]) -> None:
    """The bound cannot tell a caller that reads from one that does not: a caller with
    more large replies in flight than the bound can be refused while it reads, when the
    provider answers faster than ZeroMQ writes out (with the bound at a quarter of today's,
    on a loaded 2-core machine, ``request_many``'s default window of 64 with replies of
    2 MiB: 13 of 256 refused; 128 ``submit``s: 49 and 75). Its error names the option to
    raise on the provider: it named none. (A caller that never reads, with a small bound,
    shows it whatever the load.)"""
    reply = os.urandom(MIB)
    with zmqmesh.Node("provider", send_queue_max_bytes=4 * MIB, **mesh) as node:
        node.service("large", lambda message: reply)
        with _caller_that_reads_nothing(node) as caller:
            for i in range(40):
                caller.send_multipart([b"large", i.to_bytes(8, "big"), msgpack.packb(None)])
            deadline = time.monotonic() + 20
            while node.stats()["service"].get("sent", 0) < 40 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert node.stats()["service"].get("reply_refused", 0) > 0
            caller.setsockopt(zmq.RCVTIMEO, 10_000)
            errors = []
            for _ in range(40):
                request_id, status, body = caller.recv_multipart()
                if status == STATUS_ERROR:
                    errors.append(msgpack.unpackb(body)["message"])
            assert errors and all("send_queue_max_bytes" in error for error in errors), errors[:1]
