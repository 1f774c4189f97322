"""Malformed and hostile input: beacons, ZRE messages and pattern frames are counted and dropped.

The node never crashes or hangs and keeps answering a service throughout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from helpers import ScriptProcess, fake_zre_peer, rejected, wait_until

import zmqmesh
from zmqmesh._wire import zre
from zmqmesh._wire.frames import (
    STATUS_BAD_REQUEST,
    STATUS_NO_SERVICE,
    STATUS_OK,
    parse_reply,
    parse_reply_batch,
)
from zmqmesh._wire.zre import Command, ZreMessage


@pytest.fixture
def target(mesh: dict[str, Any]) -> Any:
    node = zmqmesh.Node("target", **{**mesh, "max_message_bytes": 64 * 1024})
    node.service("ping", lambda msg: "pong")
    left: list[str] = []
    node.on_leave(lambda peer: left.append(peer.id))
    node.left = left  # type: ignore[attr-defined]
    with node:
        yield node


def still_serving(node: zmqmesh.Node) -> None:
    assert node.request("ping", None, timeout=5) == "pong"


def test_malformed_beacons_are_counted_and_ignored(target: zmqmesh.Node, mesh: dict[str, Any]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    bad = [
        b"",
        b"ZRE",
        b"ZRE\x01" + os.urandom(17),  # 21 bytes
        b"ZRE\x01" + os.urandom(19),  # 23 bytes
        b"ZRX\x01" + os.urandom(18),
        b"ZRE\x02" + os.urandom(18),
        b"ZRE\x03" + os.urandom(50),  # a zyre version-3 beacon: not ours to speak
        os.urandom(400),
    ]
    for payload in bad:
        sock.sendto(payload, ("127.255.255.255", mesh["beacon_port"]))
    # a beacon from an unknown node pointing at a closed port: greeted, then forgotten
    sock.sendto(zre.encode_beacon(os.urandom(16), 1), ("127.255.255.255", mesh["beacon_port"]))
    sock.close()
    wait_until(lambda: rejected(target, "beacon_malformed") >= len(bad) - 1, 5, "beacons to be counted")
    still_serving(target)
    assert target.peers() == []


def zre_frames(command: int, sequence: int, **fields: Any) -> list[bytes]:
    return zre.encode_command(ZreMessage(command, sequence, **fields))


def test_invalid_zre_messages_are_counted_and_a_gap_drops_the_peer(target: zmqmesh.Node, ctx: zmq.Context) -> None:
    mailbox = target.endpoints["mailbox"]
    # A fake ZRE peer: a ROUTER for the node to connect back to, and a DEALER to talk.
    inbox = ctx.socket(zmq.ROUTER)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    fake_uuid = os.urandom(16)

    anonymous = ctx.socket(zmq.DEALER)  # no ZRE identity at all
    anonymous.connect(mailbox)
    anonymous.send_multipart(zre_frames(Command.PING, 1))

    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + fake_uuid)
    dealer.connect(mailbox)
    dealer.send_multipart([b"\xaa\xa0\x01\x02\x00\x01"])  # bad signature
    dealer.send_multipart([b"\xaa\xa1\x63\x02\x00\x01"])  # unknown command 99
    dealer.send_multipart([b"\xaa\xa1\x01\x09\x00\x01"])  # unknown version
    dealer.send_multipart([b"\xaa\xa1\x01\x02\x00\x01\x30"])  # truncated HELLO
    dealer.send_multipart([b"\xaa\xa1\x01\x02\x00\x01" + b"\x00" + b"\xff\xff\xff\xff"])  # lying count
    dealer.send_multipart(zre_frames(Command.WHISPER, 5, content=[b"before hello"]))
    wait_until(lambda: rejected(target, "zre_malformed") >= 4, 5, "malformed ZRE to be counted")
    assert rejected(target, "zre_bad_identity") >= 1
    assert rejected(target, "zre_before_hello") >= 1

    hello = zre_frames(
        Command.HELLO, 1, endpoint=f"tcp://127.0.0.1:{port}", groups=[], status=0, name="fake", headers={}
    )
    dealer.send_multipart(hello)
    wait_until(lambda: [p for p in target.peers() if p.name == "fake"], 5, "the fake peer to join")
    assert not target.peers()[0].is_zmqmesh
    # a JOIN with a wrong status byte: counted, tolerated (C zyre would abort here)
    dealer.send_multipart(zre_frames(Command.JOIN, 2, group="g", status=77))
    # (the bad byte is counted before the group is joined)
    wait_until(lambda: "g" in target.peers()[0].groups, 5, "the JOIN with a bad status byte")
    assert rejected(target, "zre_status_mismatch") == 1
    # a control whisper from a plain ZRE peer is refused
    dealer.send_multipart(zre_frames(Command.WHISPER, 3, content=[b"\x00zmqmesh-control", msgpack.packb({"t": "bye"})]))
    wait_until(lambda: rejected(target, "control_from_plain_peer") >= 1, 5, "the refused control message")
    # a sequence gap drops the peer, as RFC 36 says
    dealer.send_multipart(zre_frames(Command.PING, 9))
    wait_until(lambda: target.left, 5, "the peer to be dropped")  # type: ignore[attr-defined]
    assert rejected(target, "zre_sequence_gap") == 1
    # an oversized frame closes only that connection
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(16))
    big.connect(mailbox)
    big.send(b"\xaa\xa1" + b"x" * (200 * 1024))
    still_serving(target)
    for sock in (inbox, anonymous, dealer, big):
        sock.close(0)


def test_wire_sequence_numbers_wrap_at_65536() -> None:
    assert zre.next_sequence(65535) == 0
    assert zre.next_sequence(0) == 1


def test_garbage_on_pattern_sockets_is_counted(target: zmqmesh.Node, ctx: zmq.Context) -> None:
    got: list[Any] = []
    target.pull("q", lambda msg: got.append(msg.data))
    ep = target.endpoints
    push = ctx.socket(zmq.PUSH)
    push.connect(ep["pull"])
    deep = b"\x91" * 60_000 + b"\x00"  # nesting far past msgpack's stack limit
    lying = b"\xdb\xff\xff\xff\xff" + b"abc"  # str32 claiming 4 GiB
    for frames in (
        [b"q"],  # wrong frame count
        [b"q", b"", b"\xc1"],  # never-used msgpack byte
        [b"q", b"", deep],
        [b"q", b"", lying],
        [b"q", b"", msgpack.packb(1) + b"\x92"],  # truncated batch
        [b"q", b"", b"\x01" * 257],  # a batch past the 256-message limit: 257 handler calls
        [b"q", b"", b"\x07" * 256],  # a full batch is fine
        [b"q" * 201, b"", msgpack.packb(1)],  # a queue name no sender may use
        [b"q", b"", msgpack.packb("ok")],
    ):
        push.send_multipart(frames)
    wait_until(lambda: got[-1:] == ["ok"], 10, "the good message after the bad ones")
    assert got == [7] * 256 + ["ok"]
    assert target.stats()["rejected"].get("pipeline_malformed", 0) == 7

    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(ep["service"])
    dealer.send_multipart([b"ping", b"id", b"\xc1"])  # undecodable request
    assert dealer.poll(5000)
    assert dealer.recv_multipart() == [b"id", b"\x03", b""]
    dealer.send_multipart([b"ping"])  # wrong frame count: dropped and counted
    dealer.send_multipart([b"ping", b"x" * 100, b"\xc0"])  # request id too long
    wait_until(lambda: target.stats()["rejected"].get("service_malformed", 0) >= 3, 5, "bad requests")
    still_serving(target)

    pub = ctx.socket(zmq.PUB)
    pub.connect(ep["sub"])
    time.sleep(0.2)  # a plain PUB cannot see subscriptions; the node has none to match anyway
    pub.send_multipart([b"x", b"", b"\xc1"])
    still_serving(target)
    for sock in (push, dealer, pub):
        sock.close(0)


def test_pyre_style_sequence_wrap_is_tolerated_from_plain_peers(target: zmqmesh.Node, ctx: zmq.Context) -> None:
    inbox, dealer, endpoint = fake_zre_peer(ctx, target.endpoints["mailbox"])
    # start the link just below the wrap (the HELLO's odd sequence is counted, not fatal)
    dealer.send_multipart(zre_frames(Command.HELLO, 65533, endpoint=endpoint, name="pyre-like"))
    wait_until(lambda: target.peers(), 5, "the peer")
    dealer.send_multipart(zre_frames(Command.PING, 65534))
    dealer.send_multipart(zre_frames(Command.PING, 0))  # pyre wraps at 65535
    dealer.send_multipart(zre_frames(Command.PING, 1))
    dealer.send_multipart(zre_frames(Command.WHISPER, 2, content=[b"still here"]))
    wait_until(lambda: target.stats()["zre"]["received"] == 1, 5, "the whisper after the wrap")
    # Zyre's leader election (commands 8 and 9, beyond RFC 36 v2): counted, in sequence, the link kept
    for seq, command in ((3, 8), (4, 9), (5, 11)):
        dealer.send_multipart([b"\xaa\xa1" + bytes((command, 2)) + seq.to_bytes(2, "big") + b"\x05topic"])
    dealer.send_multipart(zre_frames(Command.WHISPER, 6, content=[b"after the election"]))
    wait_until(lambda: target.stats()["zre"]["received"] == 2, 5, "the whisper after the election")
    assert rejected(target, "zre_unknown_command") == 3
    assert target.left == []  # type: ignore[attr-defined]
    assert rejected(target, "zre_sequence_gap") == 0
    inbox.close(0)
    dealer.close(0)


def test_a_whisper_flood_into_a_slow_handler_is_bounded_and_counted(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """Received work waits in a bounded queue: past recv_hwm events, WHISPERs are dropped
    and counted, and the ones kept are still handled."""
    import threading

    release = threading.Event()
    handled: list[bytes] = []
    node = zmqmesh.Node("flooded", recv_hwm=100, **mesh)

    @node.on_whisper
    def slow(msg: zmqmesh.Message) -> None:
        release.wait(20)
        handled.append(msg.data[0])

    with node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=endpoint, name="flooder"))
        wait_until(lambda: node.peers(), 5, "the flooder")
        for seq in range(2, 1002):
            dealer.send_multipart(zre_frames(Command.WHISPER, seq % 65536, content=[b"x" * 1000]))
        wait_until(lambda: node.stats()["zre"]["received"] == 1000, 10, "the flood")
        release.set()
        # (a whisper is counted received before it is queued or dropped)
        wait_until(lambda: len(handled) + node.stats()["zre"]["dropped"] == 1000, 20, "the kept whispers handled")
        dropped = node.stats()["zre"]["dropped"]
        inbox.close(0)
        dealer.close(0)
    assert 800 <= dropped <= 1000 - 100, "at most about recv_hwm waited; the rest was dropped, counted"


def test_counters_forget_departed_peers(mesh: dict[str, Any]) -> None:
    got: list[Any] = []
    node = zmqmesh.Node("counting", **mesh)
    node.subscribe("t.", got.append)
    with node:
        for i in range(3):
            with zmqmesh.Node(f"visitor-{i}", **mesh) as visitor:
                visitor.wait_for_subscribers("t.x", 1)
                node.wait_for_peers(1)  # (a message counts for its sender once the sender is known)
                visitor.publish("t.x", i)
                wait_until(lambda i=i: len(got) == i + 1, 10, "the visitor's message")
                assert visitor.id in node.stats()["peers"]
            # (a departed peer leaves the view before its counters are forgotten)
            wait_until(lambda: not node.peers() and not node.stats()["peers"], 10, "the visitor gone, its counters forgotten")


def test_at_least_once_batches_from_strangers_are_handled_but_not_counted_per_sender(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A bare DEALER may push at-least-once batches (docs/protocol.md): each is handled and
    acknowledged, but counted per sender only for members, as every other path counts, or
    a stranger's fresh ids would pile up in ``stats()["peers"]`` without end."""
    handled: list[Any] = []
    node = zmqmesh.Node("puller", **mesh)
    node.pull("jobs", handled.append, at_least_once=True)
    with node:
        for i in range(50):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.ROUTING_ID, os.urandom(16) + b"\x00\x00\x00\x01")  # (read as a requester)
            dealer.connect(node.endpoints["service"])
            dealer.send_multipart([b"\x00queue/jobs", i.to_bytes(8, "big"), msgpack.packb([False, {"i": i}])])
            assert dealer.poll(5000), "acknowledged"
            assert dealer.recv_multipart()[1] == b"\x00"
            dealer.close(0)
        wait_until(lambda: len(handled) == 50, 10, "the batches handled")
        assert node.stats()["peers"] == {}


def test_a_hello_with_megabytes_of_headers_is_refused_and_costs_nothing(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    with zmqmesh.Node("target", **mesh) as node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=endpoint, name="fat",
                                         headers={f"X-{i}": "v" * 100_000 for i in range(20)}))
        wait_until(lambda: rejected(node, "zre_hello_too_large") == 1, 5, "the HELLO to be refused")
        assert node.peers() == []
        dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=endpoint, name="lean",
                                         headers={"X-small": "v"}))
        wait_until(lambda: [p.name for p in node.peers()] == ["lean"], 5, "a sensible HELLO still admitted")
        inbox.close(0)
        dealer.close(0)


def test_a_ready_peer_whose_second_hello_is_refused_is_dropped_for_that_at_once(
        mesh: dict[str, Any], ctx: zmq.Context, caplog: pytest.LogCaptureFixture) -> None:
    """A peer that greets again (it lost us) starts its sequence afresh: refusing that HELLO
    (too large) and keeping the peer left it to be dropped at its next word, for a
    "sequence gap" that named no cause, its groups meanwhile as they were before."""
    caplog.set_level("INFO", logger="zmqmesh.membership")
    with zmqmesh.Node("target", **mesh) as node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        _stranger_hello(dealer, endpoint, mesh, name="fat-later")
        wait_until(lambda: [p.name for p in node.peers()] == ["fat-later"], 5, "the peer")
        for sequence in (2, 3):
            dealer.send_multipart(zre_frames(Command.PING, sequence))
        _stranger_hello(dealer, endpoint, mesh, name="fat-later", headers={f"X-{i}": "v" * 100_000 for i in range(2)})
        wait_until(lambda: rejected(node, "zre_hello_too_large") == 1, 5, "the second HELLO refused")
        dealer.send_multipart(zre_frames(Command.PING, 2))  # (its next word, in its new sequence)
        wait_until(lambda: node.peers() == [], 5, "the peer dropped")
        node._engine.call_on_loop(lambda: None)  # (the PING read, if it was still to be)
        assert rejected(node, "zre_sequence_gap") == 0
        assert any("gone: its HELLO was too large" in r.getMessage() for r in caplog.records)
        inbox.close(0)
        dealer.close(0)


def test_routing_ids_are_not_guessable(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """Requesters' routing ids end in 4 bytes the node picks at random (a stranger who
    knows the public UUID cannot connect first under them)."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    suffixes = set()
    for _ in range(3):
        with zmqmesh.Node("caller", **mesh) as node:
            inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
            dealer.send_multipart(zre_frames(
                Command.HELLO, 1, endpoint=endpoint, name="provider",
                headers={"X-ZMQMESH-MESH": mesh["mesh"], "X-ZMQMESH-SERVICE": f"tcp://127.0.0.1:{port}"},
                groups=["zmqmesh/svc/echo"]))
            wait_until(lambda: node.providers("echo"), 5, "the provider")
            try:
                node.request("echo", 1, timeout=0.3)
            except zmqmesh.ZmqMeshError:
                pass
            assert router.poll(2000)
            routing, *_rest = router.recv_multipart()
            suffixes.add(routing[16:])
            dealer.close(0)
            inbox.close(0)
    assert len(suffixes) == 3 and b"\x00\x00\x00\x01" not in suffixes


def test_a_hello_claiming_a_live_nodes_endpoint_does_not_retire_it(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    left: list[str] = []
    node = zmqmesh.Node("target", **mesh)
    node.on_leave(lambda peer: left.append(peer.name))
    with node, zmqmesh.Node("victim", **mesh) as victim:
        node.wait_for_peers(1)
        _inbox, dealer, _endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=victim.endpoints["mailbox"], name="victim",
                                         headers={"X-ZMQMESH-MESH": mesh["mesh"]}))
        wait_until(lambda: len(node.peers()) == 2, 5, "the impostor's HELLO handled")
        assert victim.id in {p.id for p in node.peers()}, "the live node was retired on a stranger's word"
        assert left == []
        dealer.close(0)


def _stranger_hello(dealer: Any, endpoint: str, mesh: dict[str, Any], sequence: int = 1, **fields: Any) -> None:
    headers = {"X-ZMQMESH-MESH": mesh["mesh"], **fields.pop("headers", {})}
    dealer.send_multipart(zre_frames(Command.HELLO, sequence, endpoint=endpoint, name=fields.pop("name", "stranger"),
                                     headers=headers, **fields))


def test_a_strangers_odd_numbers_break_neither_the_directory_nor_its_callers(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """Digits Python's isdigit takes but int refuses ("²"), or too many of them, in an ack
    timeout a stranger offers or the protocol it claims: the tables still build for every
    other peer (one such HELLO hid every node that came later), and a call to the stranger
    fails as a mesh error (a bare ValueError, and a loop of tracebacks, before)."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with zmqmesh.Node("target", **mesh) as node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        _stranger_hello(dealer, endpoint, mesh, groups=["zmqmesh/ackto/²/q", "zmqmesh/ackto/" + "9" * 5000 + "/q",
                                                         "zmqmesh/svc/odd"],
                        headers={"X-ZMQMESH-PROTOCOL": "²", "X-ZMQMESH-SERVICE": f"tcp://127.0.0.1:{port}"})
        wait_until(lambda: node.providers("odd"), 5, "the stranger's offer")
        assert rejected(node, "bad_offer") >= 2
        with pytest.raises(zmqmesh.MeshTimeoutError):  # (taken as protocol 1: the stranger never answers)
            node.request("odd", 1, timeout=0.5)
        with zmqmesh.Node("late", **mesh) as late:
            late.service("echo", lambda msg: msg.data)
            wait_until(lambda: node.providers("echo"), 10, "a real node met after the stranger")
            assert node.request("echo", 7, timeout=5) == 7
        dealer.close(0)
        inbox.close(0)
    router.close(0)


@contextlib.contextmanager
def _stranger_pulling_at_least_once(ctx: zmq.Context, mesh: dict[str, Any], node: zmqmesh.Node,
                                    queue: str = "q") -> Iterator[zmq.Socket]:
    """A stranger that pulls ``queue`` at least once: yields its service socket (a ROUTER,
    from which the test answers the batches dealt to it) once ``node`` sees it pull."""
    service = ctx.socket(zmq.ROUTER)
    port = service.bind_to_random_port("tcp://127.0.0.1")
    inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
    try:
        _stranger_hello(dealer, endpoint, mesh, groups=[f"zmqmesh/ackqueue/{queue}"],
                        headers={"X-ZMQMESH-SERVICE": f"tcp://127.0.0.1:{port}"})
        node.wait_for_pullers(queue, 1, timeout=5)
        yield service
    finally:
        for sock in (dealer, inbox, service):
            sock.close(0)


def test_a_puller_that_refuses_every_batch_is_rested_not_dealt_to_in_a_loop(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A puller that answers at-least-once batches with "no such queue" (one that stopped
    pulling, before its LEAVE arrives; or a stranger) is left out of the dealing for a
    moment, as a provider that refuses a service is: the pusher dealt the batch straight
    back to it, 7,547 times in 2 s, at a whole CPU."""
    with zmqmesh.Node("pusher", **mesh) as node, _stranger_pulling_at_least_once(ctx, mesh, node) as service:
        node.push("q", 1)
        dealt = 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            if service.poll(50):
                routing, _name, batch_id, _body = service.recv_multipart()
                service.send_multipart([routing, batch_id, STATUS_NO_SERVICE, b""])
                dealt += 1
        assert 1 <= dealt <= 3, f"dealt {dealt} times in 2.5 s"
        wait_until(lambda: node.stats()["pipeline"].get("redelivered", 0) >= dealt, 5, "the last refusal taken")
        assert node.stats()["pipeline"]["redelivered"] == dealt


def test_a_flood_of_hellos_from_a_ready_peer_costs_one_check_at_a_time(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """HELLOs that cross the node's own greeting (any peer that became ready can send them
    by the thousand) each added a PING and a timer: 9,000 PINGs and 1,948 live timers in a
    3 s flood, the loop at 100 %. One check at a time now, whatever the number."""
    with zmqmesh.Node("target", **mesh) as node:
        node.service("ping", lambda msg: "pong")
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        _stranger_hello(dealer, endpoint, mesh)
        wait_until(lambda: node.peers(), 5, "the stranger ready")
        pings = node.stats()["membership"].get("pings_sent", 0)
        for _ in range(2_000):
            _stranger_hello(dealer, endpoint, mesh)
        wait_until(lambda: node.stats()["membership"].get("hellos_crossed", 0) + node.stats()["membership"].get(
            "regreeted", 0) >= 2_000, 10, "the flood handled")
        assert node.stats()["membership"].get("pings_sent", 0) - pings <= 10
        still_serving(node)
        dealer.close(0)
        inbox.close(0)


def test_gossip_spreads_no_stranger_that_has_not_proven_its_endpoint(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A stranger that greets one node, claiming an endpoint it does not own, and keeps
    itself alive there, is never proven: the node's gossip rounds must not send the whole
    mesh to greet that endpoint (they did, every round, once they began)."""
    victim = ctx.socket(zmq.ROUTER)
    victim_endpoint = f"tcp://127.0.0.1:{victim.bind_to_random_port('tcp://127.0.0.1')}"
    with zmqmesh.Node("a", **mesh) as a, zmqmesh.Node("b", **mesh) as b, zmqmesh.Node("c", **mesh) as c:
        for node in (a, b, c):
            node.wait_for_peers(2, timeout=10)
        inbox, dealer, _endpoint = fake_zre_peer(ctx, c.endpoints["mailbox"])
        _stranger_hello(dealer, victim_endpoint, mesh, name="S")
        greeted_by: set[str] = set()
        sequence, deadline = 1, time.monotonic() + 4 * 10 * mesh["heartbeat_interval_s"]  # (four rounds)
        while time.monotonic() < deadline:
            sequence += 1
            dealer.send_multipart(zre_frames(Command.PING, sequence))  # alive at c, over its own link
            while victim.poll(400):
                frames = victim.recv_multipart()
                if zre.decode_command(frames[1:]).command == Command.HELLO:
                    greeted_by.add(frames[0][1:].hex())
        assert greeted_by == {c.id}
        assert [p.name for p in c.peers() if p.name == "S"] == ["S"]
        dealer.close(0)
        inbox.close(0)
    victim.close(0)


def test_a_goodbye_beacon_under_a_peers_uuid_does_not_retire_it(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A peer's uuid is public (its beacons carry it), and a beacon's source address can be
    forged: a goodbye beacon never retires a zmqmesh peer (each one did, at once, CURVE or
    not; its goodbye comes over its link), and a plain ZRE peer only from its own address."""
    left: list[str] = []
    node = zmqmesh.Node("target", **{**mesh, "accept_plain_zre": True, "peer_timeout_s": 30.0})
    node.on_leave(lambda peer: left.append(peer.name))

    def goodbye(uuid_hex: str, source: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((source, 0))
        sock.sendto(zre.encode_beacon(bytes.fromhex(uuid_hex), 0), ("127.255.255.255", mesh["beacon_port"]))
        sock.close()

    with node, zmqmesh.Node("victim", **mesh) as victim:
        victim.service("echo", lambda msg: msg.data)
        wait_until(lambda: node.providers("echo"), 10, "the victim")
        for source in ("127.0.0.99", "127.0.0.1"):  # (from its own address: a routine goodbye, not counted)
            goodbye(victim.id, source)
        wait_until(lambda: rejected(node, "beacon_goodbye_ignored") >= 1, 5, "the forged goodbye ignored")
        time.sleep(0.5)  # (the second one handled too)
        assert node.request("echo", 1, timeout=5) == 1
        assert left == [] and victim.id in {p.id for p in node.peers()}

        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])  # a plain ZRE peer
        dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=endpoint, name="zyre"))
        wait_until(lambda: any(p.name == "zyre" for p in node.peers()), 10, "the plain peer")
        (plain,) = [p.id for p in node.peers() if p.name == "zyre"]
        goodbye(plain, "127.0.0.99")
        wait_until(lambda: rejected(node, "beacon_goodbye_ignored") >= 2, 5, "the forged goodbye ignored")
        assert left == []
        goodbye(plain, "127.0.0.1")  # its own address: it leaves
        wait_until(lambda: left == ["zyre"], 5, "the plain peer gone on its goodbye")
        dealer.close(0)
        inbox.close(0)


def test_a_hello_under_a_live_peers_uuid_does_not_take_its_place(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A stranger that greets the node under a live peer's uuid, from its own endpoint,
    would get that peer's requests: the live peer keeps its place."""
    with zmqmesh.Node("target", **mesh) as node, zmqmesh.Node("victim", **mesh) as victim:
        victim.service("balance", lambda msg: 100)
        wait_until(lambda: node.providers("balance"), 10, "the victim")
        (before,) = [p.endpoint for p in node.peers() if p.id == victim.id]
        inbox = ctx.socket(zmq.ROUTER)
        port = inbox.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + bytes.fromhex(victim.id))
        dealer.connect(node.endpoints["mailbox"])
        _stranger_hello(dealer, f"tcp://127.0.0.1:{port}", mesh, name="victim", groups=["zmqmesh/svc/balance"],
                        headers={"X-ZMQMESH-SERVICE": f"tcp://127.0.0.1:{port}"})
        wait_until(lambda: rejected(node, "zre_hello_conflict") >= 1, 5, "the claim refused")
        assert [p.endpoint for p in node.peers() if p.id == victim.id] == [before]
        assert node.request("balance", None, timeout=5) == 100
        dealer.close(0)
        inbox.close(0)


def test_a_peer_greeting_again_from_the_endpoint_it_announced_is_taken_back(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A node met through its beacon (at its source address) may announce another
    endpoint in its HELLO (an advertised address): greeting again from that one, while
    its link is up, is the peer itself, never a claim to refuse (a node refused it for
    good, and the two stayed apart)."""
    with zmqmesh.Node("target", **mesh) as node:
        uuid = os.urandom(16)
        heard_at = ctx.socket(zmq.ROUTER)  # where its beacon says it is
        beacon_port = heard_at.bind_to_random_port("tcp://127.0.0.1")
        announced = ctx.socket(zmq.ROUTER)  # where its HELLO says it is
        announced_port = announced.bind_to_random_port("tcp://127.0.0.1")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(zre.encode_beacon(uuid, beacon_port), ("127.255.255.255", mesh["beacon_port"]))
        sock.close()
        assert heard_at.poll(5000), "the node greets what the beacon named"
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + uuid)
        dealer.connect(node.endpoints["mailbox"])
        _stranger_hello(dealer, f"tcp://127.0.0.1:{announced_port}", mesh, name="adv")
        wait_until(lambda: [p.name for p in node.peers()] == ["adv"], 5, "the peer")
        _stranger_hello(dealer, f"tcp://127.0.0.1:{announced_port}", mesh, name="adv",  # it lost us, and greets again
                        groups=["zmqmesh/svc/later"])
        wait_until(lambda: node.providers("later"), 5, "the second HELLO taken")
        assert rejected(node, "zre_hello_conflict") == 0
        for closing in (dealer, heard_at, announced):
            closing.close(0)


def test_joins_past_a_hellos_bound_on_groups_are_refused(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """What a HELLO may carry in groups (1 MiB) bounds what JOINs may add (50,000 JOINs
    held 12.8 MB of group names)."""
    with zmqmesh.Node("target", **mesh) as node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        groups = [f"{i:05d}" + "g" * 250 for i in range(4100)]  # 1,045,500 characters: just within
        _stranger_hello(dealer, endpoint, mesh, groups=groups)
        wait_until(lambda: node.peers(), 10, "the stranger")
        for k in range(20):
            dealer.send_multipart(zre_frames(Command.JOIN, 2 + k, group=f"j{k:04d}" + "j" * 250, status=1 + k))
        refused = 20 - (1024 * 1024 - 1_045_500) // 255  # the room left holds 12 of the 255-character names
        wait_until(lambda: rejected(node, "zre_too_many_groups") >= refused, 10, "the JOINs past the bound refused")
        (peer,) = node.peers()
        assert sum(len(g) for g in peer.groups) <= 1024 * 1024
        assert len(peer.groups) == 4100 + 20 - refused
        assert rejected(node, "zre_too_many_groups") == refused
        dealer.close(0)
        inbox.close(0)


def test_the_group_names_of_all_peers_together_are_bounded(mesh: dict[str, Any], ctx: zmq.Context,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each peer's group names were bounded (1 MiB), not those of all peers together:
    1,024 fat peers could make a node hold 1 GiB of them, and some 25 times as much in the
    tables made of them. Past the budget (here two fat peers' worth and 100 characters) a
    HELLO or a JOIN that would add to them is refused and counted; a peer that leaves
    gives its share back."""
    from zmqmesh._membership import peer_groups

    fat = [f"{i:05d}" + "g" * 250 for i in range(4100)]  # 1,045,500 characters each
    monkeypatch.setattr(peer_groups, "MAX_GROUP_BYTES_ALL", 2 * 1_045_500 + 100)
    with zmqmesh.Node("target", **mesh) as node:
        strangers = [fake_zre_peer(ctx, node.endpoints["mailbox"]) for _ in range(3)]
        try:
            for k, (_inbox, dealer, endpoint) in enumerate(strangers[:2]):
                _stranger_hello(dealer, endpoint, mesh, name=f"fat{k}", groups=fat)
            wait_until(lambda: len(node.peers()) == 2, 10, "two fat peers, within the budget")
            _inbox, third, third_endpoint = strangers[2]
            _stranger_hello(third, third_endpoint, mesh, name="fat2", groups=fat)
            wait_until(lambda: rejected(node, "zre_groups_over_budget") == 1, 10, "the third refused")
            first = strangers[0][1]
            first.send_multipart(zre_frames(Command.JOIN, 2, group="j" * 200, status=1))  # (within its own 1 MiB)
            wait_until(lambda: rejected(node, "zre_groups_over_budget") == 2, 10, "a JOIN past the budget refused")
            assert sorted(p.name for p in node.peers()) == ["fat0", "fat1"]
            assert all(len(p.groups) == 4100 for p in node.peers())
            first.send_multipart(zre_frames(Command.GOODBYE, 3))
            wait_until(lambda: sorted(p.name for p in node.peers()) == ["fat1"], 10, "the first to leave")
            _stranger_hello(third, third_endpoint, mesh, name="fat2", groups=fat)  # (its share given back)
            wait_until(lambda: sorted(p.name for p in node.peers()) == ["fat1", "fat2"], 10, "the third admitted")
            assert rejected(node, "zre_groups_over_budget") == 2
        finally:
            for inbox, dealer, _endpoint in strangers:
                dealer.close(0)
                inbox.close(0)


def test_gossip_of_thousands_of_strangers_is_taken_in_part_and_counted(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A peer's list of others is its word: at most MAX_UNPROVEN_PEERS new ones a message
    are greeted, none making way for another (10,000 entries at 10,000 addresses opened
    and closed as many links in one turn of the loop, for seconds)."""
    from zmqmesh._membership import control
    from zmqmesh._membership.engine import MAX_UNPROVEN_PEERS
    from zmqmesh._wire.codec import Codec

    with zmqmesh.Node("target", **mesh) as node:
        node.service("ping", lambda msg: "pong")
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        _stranger_hello(dealer, endpoint, mesh)
        wait_until(lambda: node.peers(), 10, "the stranger")
        known = [[os.urandom(16).hex(), f"tcp://127.{i // 250 + 1}.{i % 250 + 1}.1:9", ""] for i in range(2000)]
        dealer.send_multipart(zre_frames(Command.WHISPER, 2, content=control.gossip(Codec(1 << 20), known)[0]))
        def refused() -> int:
            return rejected(node, "gossip_past_bound") + rejected(node, "unproven_peers_full")

        wait_until(lambda: refused() >= 2000 - MAX_UNPROVEN_PEERS, 10, "the gossip taken in part")
        assert rejected(node, "unproven_peer_evicted") == 0  # (before: 1,873 links opened, then closed)
        assert node.request("ping", None, timeout=5) == "pong"
        dealer.close(0)
        inbox.close(0)


def test_sweeps_that_find_the_mailbox_unread_queue_one_read_of_it_not_one_each(target: zmqmesh.Node,
                                                                                ctx: zmq.Context) -> None:
    """A sweep reads what waits in the mailbox before it judges anyone silent, and queues
    no read of its own beside the one already waiting: each sweep that found the mailbox
    unread used to, and each read that finds more queues itself again, so a mailbox kept
    full (a stranger's flood) gained one chain of reads a sweep. At most one read waits."""
    from zmqmesh._membership.mailbox import Mailbox

    engine = target._engine
    membership, loop = engine.membership, engine.loop
    reads = {Mailbox.on_readable, Mailbox.on_queued_read}
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.setsockopt(zmq.IDENTITY, b"\x01" + os.urandom(16))
    stranger.connect(target.endpoints["mailbox"])

    def sweeps_with_the_mailbox_unread() -> tuple[int, int]:
        for _ in range(8):  # (on the loop: nothing else reads the mailbox meanwhile)
            stranger.send(b"junk")
        assert membership.mailbox.poll(5000, zmq.POLLIN), "the stranger's messages never came"
        for _ in range(4):
            membership.liveness.sweep()
        queued = sum(1 for callback, _args in loop._ready if getattr(callback, "__func__", None) in reads)
        return queued, engine.stats.rejected["zre_malformed"]

    queued, read = engine.call_on_loop(sweeps_with_the_mailbox_unread)
    assert queued <= 1
    assert read >= 8  # (read by the sweep itself)
    still_serving(target)


def test_a_refused_hello_under_a_live_peers_uuid_does_not_drop_that_peer(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A stranger that greets the node under a live peer's uuid (public: its beacons name
    it), from its own endpoint, with a HELLO the node refuses (too large): the live peer,
    heard from over its link, keeps its place, as for a claim the node would have taken."""
    with zmqmesh.Node("target", **mesh) as node, zmqmesh.Node("victim", **mesh) as victim:
        victim.service("balance", lambda msg: 100)
        wait_until(lambda: node.providers("balance"), 10, "the victim")
        inbox = ctx.socket(zmq.ROUTER)
        port = inbox.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + bytes.fromhex(victim.id))
        dealer.connect(node.endpoints["mailbox"])
        _stranger_hello(dealer, f"tcp://127.0.0.1:{port}", mesh, name="victim",
                        headers={f"X-{i}": "v" * 100_000 for i in range(2)})
        wait_until(lambda: rejected(node, "zre_hello_too_large") >= 1, 5, "the HELLO refused")
        time.sleep(0.3)
        assert victim.id in {p.id for p in node.peers()}, "a stranger's refused HELLO dropped a live peer"
        assert node.request("balance", None, timeout=5) == 100
        dealer.close(0)
        inbox.close(0)


def test_a_malformed_at_least_once_batch_in_a_batch_of_requests_costs_only_itself(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A request to ``\\x00queue/<name>`` whose body is no batch of items is answered
    ``0x03`` and counted, alone or in a batch of requests, whose other requests are served
    and counted as if they had come one by one. (It escaped the batch: the requests after
    it were never answered, and those before it never counted as received.)"""
    def item(service: bytes, request_id: bytes, body: bytes) -> bytes:
        return bytes([len(service)]) + service + bytes([len(request_id)]) + request_id + \
            struct.pack(">I", len(body)) + body

    with zmqmesh.Node("target", **mesh) as node:
        node.service("echo", lambda msg: msg.data)
        node.pull("acked", lambda msg: None, at_least_once=True)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(node.endpoints["service"])
        replies: list[tuple[bytes, bytes]] = []

        def read(count: int) -> None:
            while len(replies) < count:
                assert dealer.poll(10_000), f"{len(replies)} replies of {count}"
                frames = dealer.recv_multipart()
                if frames[0][:1] == b"\x00":
                    replies.extend((r[0], r[1]) for r in parse_reply_batch(frames[0]) or [])
                else:
                    reply = parse_reply(frames)
                    assert reply is not None
                    replies.append(reply[:2])

        for bad in (b"\xc1", msgpack.packb([1, 2, 3])):  # undecodable; items that are none
            replies.clear()
            received = node.stats()["service"]["received"]
            dealer.send(b"\x00" + item(b"echo", b"r1", msgpack.packb(1)) + item(b"\x00queue/acked", b"rq", bad)
                        + item(b"echo", b"r2", msgpack.packb(2)))
            read(3)
            assert sorted(replies) == [(b"r1", STATUS_OK), (b"r2", STATUS_OK), (b"rq", STATUS_BAD_REQUEST)]
            assert node.stats()["service"]["received"] == received + 2
            replies.clear()
            dealer.send_multipart([b"\x00queue/acked", b"alone", bad])
            read(1)
            assert replies == [(b"alone", STATUS_BAD_REQUEST)]
        assert rejected(node, "service_malformed") == 4
        dealer.close(0)


def test_a_publication_on_a_topic_beginning_0xff_is_dropped_and_counted(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """No UTF-8 topic begins with the byte 0xFF (docs/protocol.md: a reader of every topic
    skips one): a stranger's publication on one is malformed, dropped and counted, never
    handed to a handler under a topic of replacement characters (as it was)."""
    heard: list[tuple[str, Any]] = []
    with zmqmesh.Node("target", **mesh) as node:
        node.subscribe("", lambda msg: heard.append((msg.topic, msg.data)))
        xpub = ctx.socket(zmq.XPUB)
        xpub.connect(node.endpoints["sub"])
        try:
            assert xpub.poll(10_000) and xpub.recv() == b"\x01", "the node's subscription to every topic"
            xpub.send_multipart([b"\xff\xfe", b"", msgpack.packb("mangled")])
            xpub.send_multipart([b"\xffmarkerless", os.urandom(16) + bytes(8), msgpack.packb("mangled")])
            xpub.send_multipart([b"after", b"", msgpack.packb("ok")])
            wait_until(lambda: heard[-1:] == [("after", "ok")], 10, "the good publication after the bad ones")
            assert heard == [("after", "ok")]
            assert rejected(node, "pubsub_malformed") == 2
        finally:
            xpub.close(0)


@pytest.mark.parametrize("named", ["q", "d" * 201, "\x00stats"], ids=["the-queue-itself", "201-bytes", "reserved"])
def test_a_dead_letter_queue_no_pull_could_take_named_by_a_puller_is_replaced_by_the_default(
        named: str, tmp_path: Any, mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """The pusher moves a durable message given up on to the dead-letter queue its puller
    names. `pull` refuses a ``dead_letter`` that is the queue itself or no queue's name,
    but a node before that check, or a stranger, still named one: the pusher took it as
    it came (measured, a puller naming the queue itself, max_deliveries=1: its handler ran
    2,806 times in 2 s, dead_lettered 2,762, and the message never left; a 100,000-byte
    name, or "\\x00stats", became a queue in the store no pull can take). Such a name is
    now replaced by "<queue>.dead", counted."""
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as node, \
            _stranger_pulling_at_least_once(ctx, mesh, node) as service:
        node.push("q", {"n": 1}, durable=True)
        assert service.poll(10_000), "the batch"
        routing, _name, batch_id, _body = service.recv_multipart()
        service.send_multipart([routing, batch_id, STATUS_OK, msgpack.packb([[0, named, "ValueError: poison"]])])
        wait_until(lambda: node.stats()["pipeline"].get("dead_lettered", 0) >= 1, 10, "the dead letter")
        queues = zmqmesh.inspect_store(tmp_path)["queues"]
        assert {name: q["messages"] for name, q in queues.items() if q["messages"]} == {"q.dead": 1}
        assert rejected(node, "dead_letter_refused") == 1
        assert not service.poll(200), "dealt again"


def test_dead_letter_queues_refused_on_every_acknowledgement_are_logged_at_most_every_10_s(
        tmp_path: Any, mesh: dict[str, Any], ctx: zmq.Context, caplog: pytest.LogCaptureFixture) -> None:
    """A stranger that names a dead-letter queue no pull could take in each of its
    acknowledgements has each replaced and counted, but logged in one line every 10 s at
    most, with how many since the last (it was a line per acknowledgement: 20 for 20)."""
    with zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as node, \
            _stranger_pulling_at_least_once(ctx, mesh, node) as service:
        for n in range(20):
            node.push("q", {"n": n}, durable=True)
            assert service.poll(10_000), "the batch"
            routing, _name, batch_id, body = service.recv_multipart()
            failures = [[i, "q", "ValueError: poison"] for i in range(len(msgpack.unpackb(body)))]
            service.send_multipart([routing, batch_id, STATUS_OK, msgpack.packb(failures)])
            wait_until(lambda n=n: node.stats()["pipeline"].get("dead_lettered", 0) >= n + 1, 10, "the dead letter")
        assert rejected(node, "dead_letter_refused") == 20
    said = [r.getMessage() for r in caplog.records if "dead-letter queue" in r.getMessage()]
    assert len(said) == 1, said


def test_a_stranger_coming_and_going_again_queues_no_join_or_leave_without_bound(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A stranger may greet and say GOODBYE again and again, each HELLO with a MiB of
    groups: while the join callbacks wait (here a handler held), each leave withdraws
    its join still waiting, and neither is called (counted, ``zre.unseen_peers``). Before,
    every join and leave waited with its peer's groups (1,225 HELLOs of 256 KiB in 8 s:
    +525 MiB); a real peer that stays is still reported."""
    release = threading.Event()
    joined: list[str] = []
    left: list[str] = []
    node = zmqmesh.Node("target", **mesh)

    @node.on_join
    def held(peer: zmqmesh.Peer) -> None:
        release.wait(30)
        joined.append(peer.name)

    node.on_leave(lambda peer: left.append(peer.name))
    churns = 200
    with node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        groups = [f"g{i:04d}" for i in range(100)]
        try:
            for _ in range(churns):
                dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=endpoint, name="churn", groups=groups))
                dealer.send_multipart(zre_frames(Command.GOODBYE, 2))
            wait_until(lambda: node.stats()["membership"].get("left", 0) == churns, 20, "the stranger's comings and goings")
            with zmqmesh.Node("real", **mesh) as real:
                wait_until(lambda: any(p.id == real.id for p in node.peers()), 10, "the real peer")
                unseen = node.stats()["zre"].get("unseen_peers", 0)
                assert unseen >= churns - 1, "joins and leaves of a stranger gone waited for the callbacks"
                release.set()
                wait_until(lambda: "real" in joined, 10, "the real peer reported")
            assert joined.count("churn") + unseen == churns
            wait_until(lambda: left.count("churn") == joined.count("churn"), 10, "a leave for every join seen")
        finally:
            release.set()
            inbox.close(0)
            dealer.close(0)


def _loopback_queues_empty(port: int) -> bool:
    """Whether every TCP connection to or from ``port`` has nothing left in the kernel's
    send and receive queues (what was sent over it has reached ZeroMQ's pipes)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in list(table)[1:]]
    ours = [r for r in rows if int(r[1].split(":")[1], 16) == port or int(r[2].split(":")[1], 16) == port]
    return bool(ours) and all(r[4] == "00000000:00000000" for r in ours)


def test_a_burst_of_the_mailbox_reads_a_bounded_share_of_a_strangers_fat_hellos(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """What a mailbox message costs the loop grows with its size (a HELLO of 10,000 short
    groups, 100 KB, about 8 ms), and a burst read up to 512 of them, four before a sweep's
    verdicts: one stranger's flood held the loop 16 s, and the node's own calls (a join)
    timed out meanwhile. A burst now reads about a MiB at most, then lets the loop go on."""
    from concurrent.futures import ThreadPoolExecutor

    with zmqmesh.Node("target", **mesh) as node:
        engine = node._engine
        router = engine.membership.router
        port = int(node.endpoints["mailbox"].rsplit(":", 1)[1])
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        hello = zre_frames(Command.HELLO, 2, endpoint=endpoint, name="fat",  # (2: each one counted)
                           groups=[f"g{i:05d}" for i in range(10_000)])
        count = 60
        held, sent = threading.Event(), threading.Event()

        def bursts() -> list[int]:
            """On the loop, which reads nothing else meanwhile: the HELLOs handled by each
            burst, once they all wait in the mailbox."""
            held.set()
            assert sent.wait(10)
            wait_until(lambda: _loopback_queues_empty(port), 10, "the HELLOs to reach the mailbox")
            sizes: list[int] = []
            handled = 0
            while handled < count:
                router._read_burst()
                now = engine.stats.rejected["zre_hello_sequence"]
                sizes.append(now - handled)
                handled = now
            return sizes

        with ThreadPoolExecutor(1) as pool:
            measured = pool.submit(engine.call_on_loop, bursts, timeout=30)
            assert held.wait(10)
            for _ in range(count):
                dealer.send_multipart(hello)
            sent.set()
            sizes = measured.result(40)
        assert max(sizes) <= 16, f"HELLOs of {len(hello[0])} bytes handled a burst: {sizes}"  # (a MiB: 11)
        node.join("still-answering")
        inbox.close(0)
        dealer.close(0)


def test_a_strangers_replay_of_a_frozen_peers_beacons_does_not_keep_it_listed(
        spawn: Any, mesh: dict[str, Any]) -> None:
    """A peer's beacon is public and its source address is forged at will on a host: a
    stranger replaying a SIGSTOPped peer's beacons kept it listed without end (its requests
    timing out), where it is gone after ``peer_timeout_s`` without them. A beacon counts
    as a sign of life only within `BEACON_TRUST_TIMEOUTS` timeouts of the peer's last word
    over its link; an idle peer that is alive is PINGed then, and stays."""
    mesh["peer_timeout_s"] = 1.0
    frozen = spawn("frozen")
    node = zmqmesh.Node("observer", **mesh)
    left: list[str] = []
    node.on_leave(lambda peer: left.append(peer.name))
    with node, zmqmesh.Node("idle", **mesh):
        node.wait_for_peers(2, timeout=10)
        port = int(frozen.mailbox.rsplit(":", 1)[1])
        replay = zre.encode_beacon(bytes.fromhex(frozen.id), port)
        frozen.signal(signal.SIGSTOP)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)

                def gone_while_replayed() -> bool:
                    sock.sendto(replay, ("127.255.255.255", mesh["beacon_port"]))
                    return "frozen" in left

                wait_until(gone_while_replayed, 15 * mesh["peer_timeout_s"],  # (10 timeouts of trust, then one)
                           "the frozen peer to be gone", every=0.25)
        finally:
            frozen.signal(signal.SIGCONT)
        assert left == ["frozen"], "the idle peer, alive, was dropped"


def test_a_hello_under_the_nodes_own_uuid_is_counted_and_ignored(target: zmqmesh.Node, ctx: zmq.Context) -> None:
    """A node never greets itself: a HELLO under its own (public) uuid is a stranger's,
    dropped and counted (it was dropped unseen; every other command under it is counted)."""
    inbox = ctx.socket(zmq.ROUTER)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + bytes.fromhex(target.id))
    dealer.connect(target.endpoints["mailbox"])
    dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=f"tcp://127.0.0.1:{port}", name="me"))
    wait_until(lambda: rejected(target, "zre_own_uuid") == 1, 5, "the HELLO counted")
    assert target.peers() == []
    still_serving(target)
    dealer.close(0)
    inbox.close(0)


HOSTILE_PROVIDER = Path(__file__).resolve().parent / "hostile_provider.py"

STOPPED_UNDER_A_FLOOD_OF_REPLIES = r"""
import logging, sys, threading, time
import zmqmesh
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
node = zmqmesh.Node("victim", mesh=sys.argv[1], beacon_port=int(sys.argv[2])).start()
node.wait_for_service("slow", timeout=20)
ended = []

def call():
    try:
        node.request("slow", 1, timeout=30)
    except zmqmesh.ZmqMeshError as exc:
        ended.append(type(exc).__name__)

caller = threading.Thread(target=call)
caller.start()
deadline = time.monotonic() + 20
while node.stats()["request"]["dropped"] < 20 and time.monotonic() < deadline:
    time.sleep(0.01)
print("dropped", node.stats()["request"]["dropped"], flush=True)
node.stop()
caller.join(40)
print("ended", *ended, flush=True)
"""


@pytest.mark.timeout(90)
def test_a_request_flooded_with_replies_to_nothing_sees_the_stop_and_lets_its_socket_go(
        mesh: dict[str, Any], procs: list[ScriptProcess]) -> None:
    """A provider that never answers a request but sends its caller, every few
    milliseconds, a reply to an id the caller never sent (`hostile_provider.py`): each is
    dropped and counted (``request.dropped``), and a stop of the caller's node ends the
    request with `NodeClosedError` at the next of them, the thread letting go of its socket
    before the stop closes it. (Before: a blocked request looked for the stop only when a
    poll slice passed with nothing read, which the flood never let happen; the stop waited
    1 s for the thread, logged that it still used its request sockets, and closed them
    under its receive: in 1 run of 3 the process aborted, ZeroMQ's
    ``Assertion failed: pfd.revents & POLLIN (src/signaler.cpp:238)``.)"""
    hostile = ScriptProcess(HOSTILE_PROVIDER, mesh["mesh"], mesh["beacon_port"])
    procs.append(hostile)
    victim = subprocess.run([sys.executable, "-c", STOPPED_UNDER_A_FLOOD_OF_REPLIES, mesh["mesh"],
                             str(mesh["beacon_port"])], capture_output=True, text=True, timeout=80)
    said = victim.stdout + victim.stderr[-3000:]
    assert "REQUEST" in hostile.lines, said
    assert victim.returncode == 0, said
    assert "ended NodeClosedError" in victim.stdout, said
    assert "still uses its request sockets" not in victim.stderr, said


def test_a_stranger_claiming_the_nodes_own_sub_endpoint_makes_it_handle_no_publication_twice(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """A stranger announces a subscription (``zmqmesh/sub/t.``) with the node's own SUB
    endpoint for its own: the node's XPUB connects to its own SUB, and its publications,
    which reach its own subscriptions directly, came back through that socket as well, each
    handled twice (measured: 5 published, 10 handled, ``pubsub.received`` 10). A frame under
    the node's own id on its SUB is none of its peers': dropped, counted
    (``rejected["pubsub_own_uuid"]``)."""
    got: list[int] = []
    node = zmqmesh.Node("mirrored", **mesh)
    node.subscribe("t.", lambda msg: got.append(msg.data))
    answering = threading.Event()

    with node:
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        dealer.send_multipart(zre_frames(Command.HELLO, 1, endpoint=endpoint, name="mirror", groups=["zmqmesh/sub/t."],
                                         headers={"X-ZMQMESH-MESH": mesh["mesh"], "X-ZMQMESH-PROTOCOL": "7",
                                                  "X-ZMQMESH-SUB": node.endpoints["sub"]}))

        def answer_pings() -> None:  # (the stranger's sockets are this thread's from here on)
            sequence = 1
            while answering.is_set():
                if inbox.poll(20) and zre.decode_command(inbox.recv_multipart()[1:]).command == Command.PING:
                    sequence += 1
                    dealer.send_multipart(zre_frames(Command.PING_OK, sequence))

        answering.set()
        pings = threading.Thread(target=answer_pings, daemon=True)
        pings.start()
        try:
            node.wait_for_subscribers("t.x", 2)  # (its own subscription, and its SUB's through the claim)
            for i in range(5):
                node.publish("t.x", i)
            wait_until(lambda: node.stats()["pubsub"]["received"] + rejected(node, "pubsub_own_uuid") >= 10, 10,
                       "each publication handled, and come back through the socket")
            time.sleep(0.2)  # (anything more that would come)
            came_back = rejected(node, "pubsub_own_uuid")
        finally:
            answering.clear()
            pings.join(5)
            inbox.close(0)
            dealer.close(0)
    assert got == [0, 1, 2, 3, 4]
    assert came_back == 5
