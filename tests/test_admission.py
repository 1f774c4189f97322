"""Floods of strangers: real peers are admitted first, and a flood's cost stays bounded.

A beacon costs its sender 22 bytes; a HELLO, a connection. Neither may keep real nodes
apart or grow what a node holds: strangers past the bound of unproven peers make way for
each other, and a peer that answers at its endpoint is never the one that makes way.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Any

import pytest
import zmq
from helpers import fake_zre_peer, rejected, wait_until

import zmqmesh
from zmqmesh._membership.engine import MAX_UNPROVEN_PEERS
from zmqmesh._wire import zre
from zmqmesh._wire.zre import Command, ZreMessage

pytestmark = pytest.mark.timeout(60)


def meet(a: zmqmesh.Node, b: zmqmesh.Node) -> bool:
    return any(p.id == b.id for p in a.peers()) and any(p.id == a.id for p in b.peers())


class BeaconFlood:
    """Beacons under fresh UUIDs, from another loopback address (another host, as far as
    the nodes can tell), each claiming a port where nothing listens."""

    def __init__(self, port: int, per_second: int = 4000) -> None:
        self.port = port
        self.per_second = per_second
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BeaconFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(("127.0.0.66", 0))
            start = time.monotonic()
            while not self._stop.is_set():
                if self.sent > (time.monotonic() - start) * self.per_second:
                    time.sleep(0.001)
                    continue
                fake_port = 1024 + int.from_bytes(os.urandom(2), "big") % 60000
                sock.sendto(b"ZRE\x01" + os.urandom(16) + struct.pack("!H", fake_port),
                            ("127.255.255.255", self.port))
                self.sent += 1


def test_a_beacon_flood_under_fresh_uuids_does_not_keep_real_nodes_apart(mesh: dict[str, Any]) -> None:
    with BeaconFlood(mesh["beacon_port"]) as flood:
        wait_until(lambda: flood.sent > 2000, 10, "the flood to start")
        with zmqmesh.Node("a", **mesh) as a:
            time.sleep(1.0)  # the flood has had a second to fill a's tables
            with zmqmesh.Node("b", **mesh) as b:
                wait_until(lambda: meet(a, b), 15, "a and b to meet during the flood")
                assert rejected(a, "greeting_rate") > 0  # the flood is refused at a lookup's cost
                # and what it costs is bounded: links to at most MAX_UNPROVEN_PEERS strangers
                assert len(a.peers()) == 1
                a.service("still", lambda msg: "here")
                wait_until(lambda: "still" in next(p for p in b.peers() if p.id == a.id).services, 10,
                           "b to see a's service")
                assert b.request("still", None, timeout=5) == "here"
    assert flood.sent > 4000


def test_a_hello_flood_makes_way_for_real_peers_and_never_evicts_them(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """Strangers that HELLO from connections of their own, claim endpoints where nothing
    answers and keep pinging become peers, but at most MAX_UNPROVEN_PEERS of them: past
    it the oldest makes way. A real node proves itself (it answers a PING at its
    endpoint) and is never the one that makes way. (Refused at their endpoints, strangers
    would also go after ``disconnect_grace_s``: here it is long, so that they stay as
    strangers behind a silent firewall do, and have to make way.)"""
    dealers: list[Any] = []

    def flood(count: int, mailbox: str) -> None:
        for i in range(count):
            inbox, dealer, _ = fake_zre_peer(ctx, mailbox)
            inbox.close(0)  # its endpoint answers nothing
            dealer.send_multipart(zre.encode_command(ZreMessage(
                Command.HELLO, 1, endpoint=f"tcp://127.0.0.1:{2000 + i}", name=f"stranger-{i}")))
            dealers.append(dealer)

    try:
        with zmqmesh.Node("a", **mesh, disconnect_grace_s=60.0) as a:
            flood(MAX_UNPROVEN_PEERS + 72, a.endpoints["mailbox"])
            wait_until(lambda: rejected(a, "unproven_peer_evicted") >= 72, 15, "strangers to make way")
            assert len(a.peers()) <= MAX_UNPROVEN_PEERS
            with zmqmesh.Node("b", **mesh) as b:
                wait_until(lambda: meet(a, b), 15, "a and b to meet during the flood")
                time.sleep(0.5)  # b answers a's PING
                evicted = rejected(a, "unproven_peer_evicted")
                flood(MAX_UNPROVEN_PEERS + 50, a.endpoints["mailbox"])
                wait_until(lambda: rejected(a, "unproven_peer_evicted") >= evicted + MAX_UNPROVEN_PEERS, 15,
                           "the second wave to make way")
                assert any(p.id == b.id for p in a.peers()), "the proven peer was evicted"
                assert len(a.peers()) <= MAX_UNPROVEN_PEERS + 1
                assert b.node_stats(a.id)["id"] == a.id
    finally:
        for dealer in dealers:
            dealer.close(0)


def _commands(inbox: Any, until: float) -> list[ZreMessage]:
    got = []
    while time.monotonic() < until:
        if inbox.poll(50):
            got.append(zre.decode_command(inbox.recv_multipart()[1:]))
    return got


def test_a_seeds_node_stopping_says_goodbye_to_zyre_peers(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """Without beacons there is no port-0 beacon: a plain ZRE peer (Zyre) gets its
    GOODBYE command, in sequence, and need not wait for its expiry."""
    inbox, dealer, endpoint = fake_zre_peer(ctx, "tcp://127.0.0.1:1")
    dealer.close(0)
    try:
        node = zmqmesh.Node("seeded", **{**mesh, "discovery": False, "seeds": (endpoint,)})
        node.start()
        frames = inbox.recv_multipart() if inbox.poll(10_000) else None
        assert frames is not None, "the node never greeted its seed"
        hello = zre.decode_command(frames[1:])
        assert hello.command == Command.HELLO and hello.sequence == 1
        zyre = ctx.socket(zmq.DEALER)
        zyre.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(16))
        zyre.connect(hello.endpoint)
        zyre.send_multipart(zre.encode_command(ZreMessage(Command.HELLO, 1, endpoint=endpoint, name="zyre")))
        wait_until(lambda: any(p.name == "zyre" for p in node.peers()), 10, "the zyre peer to be known")
        node.stop()
        got = _commands(inbox, time.monotonic() + 1.0)
        assert got and got[-1].command == Command.GOODBYE
        assert [m.sequence for m in got] == list(range(2, 2 + len(got)))
        zyre.close(0)
    finally:
        inbox.close(0)


def test_a_zyre_goodbye_removes_the_peer_at_once(mesh: dict[str, Any], ctx: zmq.Context) -> None:
    left: list[str] = []
    with zmqmesh.Node("target", **{**mesh, "peer_timeout_s": 30.0}) as node:
        node.on_leave(lambda peer: left.append(peer.name))
        inbox, dealer, endpoint = fake_zre_peer(ctx, node.endpoints["mailbox"])
        try:
            dealer.send_multipart(zre.encode_command(ZreMessage(Command.HELLO, 1, endpoint=endpoint, name="zyre")))
            wait_until(lambda: any(p.name == "zyre" for p in node.peers()), 10, "the zyre peer to be known")
            dealer.send_multipart(zre.encode_command(ZreMessage(Command.GOODBYE, 2)))
            wait_until(lambda: left == ["zyre"], 2, "the peer to be gone at once")
            assert not any(p.name == "zyre" for p in node.peers())
        finally:
            inbox.close(0)
            dealer.close(0)
