"""Every delivered message has an id, and carries the headers and clock its sender gave it."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq
from helpers import fake_zre_peer, wait_until

import zmqmesh
from zmqmesh._wire import zre
from zmqmesh._wire.frames import STATUS_OK
from zmqmesh._wire.zre import Command, ZreMessage


def test_headers_ids_and_timestamps_travel_with_every_pattern(mesh: dict[str, Any]) -> None:
    seen: dict[str, list[zmqmesh.Message]] = {"sub": [], "pull": [], "alo": [], "req": []}
    receiver = zmqmesh.Node("receiver", **mesh)
    receiver.subscribe("news.", seen["sub"].append)
    receiver.pull("jobs", seen["pull"].append)
    receiver.pull("orders", seen["alo"].append, at_least_once=True)

    @receiver.service("echo")
    def echo(msg: zmqmesh.Message) -> Any:
        seen["req"].append(msg)
        return msg.data

    with receiver, zmqmesh.Node("sender", **mesh) as sender:
        sender.wait_for_subscribers("news.today", 1)
        sender.wait_for_pullers("jobs")
        sender.wait_for_pullers("orders")
        before = time.time()
        sender.publish("news.today", 1, headers={"lang": "en"})
        sender.publish("news.today", 2)
        sender.push("jobs", 1, headers={"trace": "t-1"})
        sender.push("orders", 1, headers={"tenant": "acme"})
        assert sender.request("echo", 5, headers={"caller": "test"}) == 5
        assert sender.request("echo", 6) == 6
        wait_until(lambda: len(seen["sub"]) == 2 and seen["pull"] and seen["alo"], 10, "every delivery")
    sub1, sub2 = seen["sub"]
    assert sub1.headers == {"lang": "en"} and sub2.headers == {}
    assert sub1.id == f"{sender.id}/news.today/0" and sub2.id == f"{sender.id}/news.today/1"
    assert sub1.timestamp is not None and before <= sub1.timestamp <= time.time()
    (job,) = seen["pull"]
    assert job.headers == {"trace": "t-1"} and job.id.startswith(sender.id)
    (order,) = seen["alo"]
    assert order.headers == {"tenant": "acme"} and order.timestamp is not None
    with_headers, without = seen["req"]
    assert with_headers.headers == {"caller": "test"} and with_headers.timestamp is not None
    assert without.headers == {} and without.timestamp is None
    assert with_headers.id != without.id
    ids = [m.id for ms in seen.values() for m in ms]
    assert len(set(ids)) == len(ids)


def test_messages_with_and_without_headers_interleaved_arrive_in_order_each_with_its_own(
        mesh: dict[str, Any]) -> None:
    """Headed and plain messages never share a frame (the meta frame is the headed ones'):
    sent alternating, in runs and at random, on a topic and a queue, each arrives once, in
    order, with its own headers."""
    import random

    plan = [i % 2 == 0 for i in range(300)] + [i % 7 < 3 for i in range(300)] + \
        [random.Random(5).random() < 0.5 for _ in range(400)]
    got: dict[str, list[zmqmesh.Message]] = {"sub": [], "pull": []}
    receiver = zmqmesh.Node("receiver", **mesh)
    receiver.subscribe("mixed", got["sub"].append)
    receiver.pull("mixed", got["pull"].append)
    with receiver, zmqmesh.Node("sender", **mesh) as sender:
        sender.wait_for_subscribers("mixed", 1)
        sender.wait_for_pullers("mixed")
        for i, headed in enumerate(plan):
            headers = {"n": str(i)} if headed else None
            sender.publish("mixed", i, headers=headers)
            sender.push("mixed", i, headers=headers)
        wait_until(lambda: len(got["sub"]) == len(plan) and len(got["pull"]) == len(plan), 20, "every message")
    for kind, messages in got.items():
        assert [m.data for m in messages] == list(range(len(plan))), kind
        assert [m.headers for m in messages] == [{"n": str(i)} if h else {} for i, h in enumerate(plan)], kind


def test_bad_headers_are_refused_before_anything_is_sent(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("n", **mesh) as node:
        with pytest.raises(TypeError):
            node.publish("t", 1, headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError):
            node.publish("t", 1, headers={"big": "x" * 20_000})
        with pytest.raises(TypeError):
            node.push("q", 1, headers=["not", "a", "dict"], timeout=0.1)  # type: ignore[arg-type]
        for surrogate in ({"k": "\ud800"}, {"\udfff": "v"}):  # (UTF-8 cannot encode them: as unencodable data)
            with pytest.raises(TypeError, match="UTF-8"):
                node.publish("t", 1, headers=surrogate)
            with pytest.raises(TypeError, match="UTF-8"):
                node.push("q", 1, headers=surrogate, timeout=0.1)
            with pytest.raises(TypeError, match="UTF-8"):
                node.request("s", 1, headers=surrogate, timeout=0.1)
        assert node.stats()["pubsub"]["sent"] == 0


def test_an_in_memory_at_least_once_message_keeps_its_id_when_redelivered(mesh: dict[str, Any]) -> None:
    """No headers, no store: the redelivery after an ack timeout still has the first id."""
    release = threading.Event()
    seen: list[tuple[str, str, bool, bool]] = []
    with zmqmesh.Node("pusher", **mesh) as pusher:
        stuck = zmqmesh.Node("stuck", **mesh)

        @stuck.pull("slow", at_least_once=True, ack_timeout_s=0.5)
        def hang(msg: zmqmesh.Message) -> None:
            seen.append(("stuck", msg.id, msg.redelivered, msg.timestamp is None))
            release.wait(10)

        with stuck:
            pusher.wait_for_pullers("slow", 1)
            pusher.push("slow", "job")
            wait_until(lambda: seen, 10, "the stuck handler to start")
            healthy = zmqmesh.Node("healthy", **mesh)

            @healthy.pull("slow", at_least_once=True, ack_timeout_s=0.5)
            def work(msg: zmqmesh.Message) -> None:
                seen.append(("healthy", msg.id, msg.redelivered, msg.timestamp is None))

            with healthy:
                wait_until(lambda: any(who == "healthy" for who, *_ in seen), 10, "the redelivery")
                release.set()
    first, *again = seen  # (the stuck node may be dealt it again too, once released)
    assert first[0] == "stuck" and first[2] is False and first[3] is True
    assert {msg_id for _, msg_id, _, _ in again} == {first[1]} and first[1].startswith(pusher.id)
    assert all(redelivered and not untimed for _, _, redelivered, untimed in again)  # with the first send's time


def protocol_1_peer(ctx: zmq.Context[Any], node: zmqmesh.Node, mesh: dict[str, Any], name: str,
                    groups: list[str]) -> zmq.Socket[Any]:
    """A foreign peer of protocol 1 (a HELLO of no protocol header) that joins ``groups``
    with a service ROUTER of its own: the ROUTER, where ``node`` sends it what it offers to take."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    _inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
    dealer.send_multipart(zre.encode_command(ZreMessage(
        Command.HELLO, 1, endpoint=endpoint, name=name,
        headers={"X-ZMQMESH-MESH": mesh["mesh"], "X-ZMQMESH-SERVICE": f"tcp://127.0.0.1:{port}"},
        groups=groups)))
    return router


def test_a_protocol_1_provider_gets_requests_without_headers_and_the_loss_is_counted(
        mesh: dict[str, Any]) -> None:
    """A foreign provider written against protocol 1 (three request frames, no meta frame)
    is still served; the headers it cannot take are counted, never silently dropped."""
    ctx = zmq.Context()
    try:
        with zmqmesh.Node("caller", **mesh) as node:
            router = protocol_1_peer(ctx, node, mesh, "old-provider", ["zmqmesh/svc/old"])
            wait_until(lambda: node.providers("old"), 5, "the protocol-1 provider to offer 'old'")
            results: list[Any] = []
            caller = threading.Thread(target=lambda: results.append(
                node.request("old", {"q": 1}, timeout=5, headers={"trace": "t1"})))
            caller.start()
            assert router.poll(5000), "the request never reached the provider"
            frames = router.recv_multipart()
            assert len(frames) == 4  # routing id, service, request id, body: no meta frame
            routing, service, request_id, body = frames
            assert (service, msgpack.unpackb(body)) == (b"old", {"q": 1})
            router.send_multipart([routing, request_id, b"\x00", msgpack.packb("answered")])
            caller.join(10)
            assert results == ["answered"]
            assert node.stats()["rejected"].get("headers_not_carried") == 1
    finally:
        ctx.destroy(linger=0)


def test_a_protocol_1_puller_gets_at_least_once_items_of_two_fields_and_the_loss_is_counted(
        mesh: dict[str, Any], tmp_path: Any) -> None:
    """A foreign at-least-once puller of protocol 1 gets each item as ``[redelivered,
    data]``, in memory and durable alike: no id, clock or headers, which it could not read.
    The headers it cannot take are counted, never silently dropped; its acks settle both."""
    ctx = zmq.Context()
    try:
        with zmqmesh.Node("pusher", store=str(tmp_path / "store"), **mesh) as node:
            router = protocol_1_peer(ctx, node, mesh, "old-puller", ["zmqmesh/queue/jobs", "zmqmesh/ackqueue/jobs"])
            node.wait_for_pullers("jobs", timeout=5)
            node.push("jobs", {"n": 1}, headers={"k": "v"})
            node.push("jobs", {"n": 2}, durable=True, headers={"k": "v"})
            got: list[Any] = []
            while len(got) < 2:
                assert router.poll(5000), "the pushes never reached the puller"
                routing, service, batch_id, payload = router.recv_multipart()
                assert service == b"\x00queue/jobs"
                got.extend(msgpack.Unpacker(io.BytesIO(payload), raw=False))
                router.send_multipart([routing, batch_id, STATUS_OK, b""])
            assert sorted(got, key=lambda item: item[1]["n"]) == [[False, {"n": 1}], [False, {"n": 2}]]
            assert node.stats()["rejected"].get("headers_not_carried") == 2
            store = str(tmp_path / "store")
            wait_until(lambda: not zmqmesh.inspect_store(store)["queues"].get("jobs", {}).get("messages"), 5,
                       "the durable push to be settled by the ack")
    finally:
        ctx.destroy(linger=0)
