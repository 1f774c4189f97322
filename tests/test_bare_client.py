"""A plain ZeroMQ program speaks to a node using only docs/protocol.md: bare pyzmq and msgpack."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import zmq
from helpers import wait_until


def endpoints_of(proc: Any) -> dict[str, str]:
    return json.loads(proc.wait_line("ENDPOINTS").split(" ", 1)[1])


def test_bare_client_subscribes_publishes_pushes_and_calls(spawn: Any, ctx: zmq.Context, mesh: dict[str, Any]) -> None:
    node = spawn("target", subscribe=["bare."], pull=["work"], service=["echo", "boom"])
    ep = endpoints_of(node)

    # 1. publish to the node: an XPUB connected to its sub endpoint, sending once subscribed
    pub = ctx.socket(zmq.XPUB)
    pub.connect(ep["sub"])
    assert pub.poll(10_000), "the node's subscription never arrived"
    assert pub.recv() == b"\x01bare."
    pub.send_multipart([b"bare.in", b"", msgpack.packb({"hello": "node"})])
    node.wait_line('SUB bare.in {"hello":"node"}')

    # 2. push to the node, one message and then a batch of two in one frame
    push = ctx.socket(zmq.PUSH)
    push.connect(ep["pull"])
    push.send_multipart([b"work", b"", msgpack.packb(1)])
    push.send_multipart([b"work", b"", msgpack.packb(2) + msgpack.packb([3, "three"])])
    node.wait_line("PULL work", count=3)
    assert node.with_prefix("PULL work") == ["PULL work 1", "PULL work 2", 'PULL work [3,"three"]']

    # 3. call its services: ok, remote failure, no such service; replies matched by id
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(ep["service"])
    dealer.send_multipart([b"echo", b"r1", msgpack.packb({"x": b"\x01"})])
    dealer.send_multipart([b"boom", b"r2", msgpack.packb(7)])
    dealer.send_multipart([b"nope", b"r3", msgpack.packb(None)])
    replies = {}
    for _ in range(3):
        assert dealer.poll(10_000)
        rid, status, body = dealer.recv_multipart()
        replies[rid] = (status, body)
    assert replies[b"r1"][0] == b"\x00"
    assert msgpack.unpackb(replies[b"r1"][1]) == {"echo": {"x": b"\x01"}, "by": "target"}
    assert replies[b"r2"][0] == b"\x01"
    failure = msgpack.unpackb(replies[b"r2"][1])
    assert failure["type"] == "ValueError" and failure["message"] == "boom 7" and "Traceback" in failure["traceback"]
    assert replies[b"r3"] == (b"\x02", b"")

    for sock in (pub, push, dealer):
        sock.close(0)


def test_bare_subscriber_receives_a_nodes_publications(ctx: zmq.Context, mesh: dict[str, Any]) -> None:
    import zmqmesh

    with zmqmesh.Node("publisher", **mesh) as node:
        sub = ctx.socket(zmq.SUB)
        sub.connect(node.endpoints["pub"])
        sub.setsockopt(zmq.SUBSCRIBE, b"news.")
        node.wait_for_subscribers("news.today", 1, timeout=10)  # counts the bare subscriber too
        for i in range(3):
            node.publish("news.today", {"i": i})
        node.publish("other", "filtered out")
        received: list[Any] = []
        sequences: list[int] = []
        deadline = time.monotonic() + 10
        while len(received) < 3 and time.monotonic() < deadline:
            if sub.poll(100):
                topic, sender, body = sub.recv_multipart()
                assert topic == b"news.today"
                assert sender[:16] == bytes.fromhex(node.id) and len(sender) == 24
                unpacker = msgpack.Unpacker()
                unpacker.feed(body)
                batch = list(unpacker)
                sequences.append(int.from_bytes(sender[16:], "big"))
                received.extend(batch)
        assert received == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert sequences[0] == 0
        sub.close(0)


def test_bare_publisher_reaches_a_subscription_handler(ctx: zmq.Context, mesh: dict[str, Any]) -> None:
    import zmqmesh

    got: list[Any] = []
    node = zmqmesh.Node("n", **mesh)
    node.subscribe("t", lambda msg: got.append((msg.topic, msg.data, msg.sender)))
    with node:
        pub = ctx.socket(zmq.XPUB)
        pub.connect(node.endpoints["sub"])
        assert pub.poll(10_000) and pub.recv() == b"\x01t"
        pub.send_multipart([b"topic", b"", msgpack.packb(b"raw")])
        wait_until(lambda: got, 10, "the bare publication")
        assert got == [("topic", b"raw", None)]
        pub.close(0)


def test_one_frame_requests_from_more_callers_than_a_provider_keeps_are_each_answered_in_one_frame(
        ctx: zmq.Context, mesh: dict[str, Any], monkeypatch: Any) -> None:
    """A provider keeps the caller its one-frame requests name by routing id for up to
    MAX_KNOWN_CALLERS of them (made 2 here), then starts afresh: each caller, kept or
    made again, is answered in one frame, under its own request id."""
    import zmqmesh
    from zmqmesh._patterns.inbound import service_intake

    monkeypatch.setattr(service_intake, "MAX_KNOWN_CALLERS", 2)
    with zmqmesh.Node("provider", **mesh) as node:

        @node.service("echo")
        def echo(msg: Any) -> Any:
            return msg.data

        dealers = []
        for k in range(5):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, b"caller-%d" % k)
            dealer.connect(node.endpoints["service"])
            dealers.append(dealer)
        for round_ in range(2):
            for k, dealer in enumerate(dealers):
                request_id = b"r%d.%d" % (k, round_)
                dealer.send(b"\x04echo" + bytes([len(request_id)]) + request_id + msgpack.packb([k, round_]))
                assert dealer.poll(10_000), f"caller {k} got no reply"
                reply = dealer.recv_multipart()
                assert reply == [bytes([len(request_id)]) + request_id + b"\x00" + msgpack.packb([k, round_])]
        for dealer in dealers:
            dealer.close(0)


def test_a_service_replaced_or_withdrawn_is_served_as_its_table_now_says_from_the_next_request(
        ctx: zmq.Context, mesh: dict[str, Any]) -> None:
    """A provider keeps each service name's handler, and whether it is sync (served in place
    as the request is decoded), looked up once per table of its services: a handler
    replaced by an ``async def`` one, withdrawn, or offered again answers the very next
    request as the table now says (the new handler's reply, awaited, not a coroutine
    called in place; ``0x02`` once withdrawn), never from what was looked up before."""
    import zmqmesh

    def sync_handler(msg: Any) -> Any:
        return ["sync", msg.data]

    async def async_handler(msg: Any) -> Any:
        return ["async", msg.data]

    with zmqmesh.Node("provider", **mesh) as node:
        node.service("svc", sync_handler)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(node.endpoints["service"])
        asked = [0]

        def ask() -> tuple[bytes, Any]:
            asked[0] += 1
            request_id = b"r%d" % asked[0]
            dealer.send(b"\x03svc" + bytes([len(request_id)]) + request_id + msgpack.packb(asked[0]))
            assert dealer.poll(10_000), f"request {asked[0]} got no reply"
            reply = dealer.recv()
            assert reply[1:1 + reply[0]] == request_id
            status, body = reply[1 + reply[0]:2 + reply[0]], reply[2 + reply[0]:]
            return status, msgpack.unpackb(body) if status == b"\x00" else body

        try:
            assert ask() == (b"\x00", ["sync", 1])
            assert node.unservice("svc")
            node.service("svc", async_handler)
            assert ask() == (b"\x00", ["async", 2])
            assert node.unservice("svc")
            assert ask() == (b"\x02", b"")
            node.service("svc", sync_handler)
            assert ask() == (b"\x00", ["sync", 4])
        finally:
            dealer.close(0)
