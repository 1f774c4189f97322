"""The outgoing half of ZRE: one DEALER link per peer, its socket monitor, and sequenced sends."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .._io.reactor import EventLoop
from .._io.sockets import CONTROL_HWM, has_input, new_socket, recv_frames, send_frames
from .._stats import Stats
from .._wire import zre
from .._wire.frames import link_id
from .._wire.zre import ZreMessage
from ..config import NodeConfig
from .peer import PeerState

if TYPE_CHECKING:
    from .._io.curve import KeyPair

__all__ = ["Links", "link_liveness", "monitor_event"]

log = logging.getLogger("zmqmesh.membership")

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


def link_liveness(peer_timeout_s: float) -> dict[int, int]:
    """The options that drop a link whose TCP path died within about ``peer_timeout_s``
    (at least 2 s: the kernel counts whole seconds), left to the kernel: keepalive probes
    on an idle link, and half of ``peer_timeout_s`` for what it sent to be acknowledged
    (TCP_USER_TIMEOUT, which on Linux also ends the probing of an idle link).

    Beacons and ZRE PINGs watch the peer's process; these watch only its link, so that a
    dead link behind live beacons is seen as dead. ZeroMQ's own heartbeats (ZMTP PINGs)
    would do it too, but each one wakes the I/O threads of both nodes: 64 idle nodes on
    loopback, 85 wake-ups a second each, took 0.62-0.68 % of a CPU per node with them
    against 0.21-0.25 % with the kernel's probes."""
    probe_s = max(1, int(peer_timeout_s // 3))
    return {
        zmq.TCP_KEEPALIVE: 1,
        zmq.TCP_KEEPALIVE_IDLE: probe_s,
        zmq.TCP_KEEPALIVE_INTVL: probe_s,
        zmq.TCP_KEEPALIVE_CNT: max(1, int(peer_timeout_s // probe_s) - 1),
        zmq.TCP_MAXRT: max(1, int(peer_timeout_s * 500)),
    }


def monitor_event(frames: list[bytes]) -> int | None:
    """The event id of a socket-monitor message, or None if it is not one.

    libzmq sends two frames: a 16-bit event id and a 32-bit value in native byte order,
    then the endpoint. (pyzmq's own parser lives in a module that imports asyncio.)
    """
    if len(frames) != 2 or len(frames[0]) != 6:
        return None
    return int.from_bytes(frames[0][:2], sys.byteorder)


class Links:
    """Opens, watches and closes the links to peers; reports link up/down to ``on_link``:
    up at each completed handshake, down when a link that was up drops and when a connect
    fails while the link is down (at each retry: every 0.1 s at first, backing off to one a
    second)."""

    def __init__(self, *, ctx: zmq.Context[Any], loop: EventLoop, config: NodeConfig, uuid: bytes,
                 keys: KeyPair | None, stats: Stats, on_link: Callable[[PeerState, bool], None]) -> None:
        self.ctx = ctx
        self.loop = loop
        self.config = config
        self.uuid = uuid
        self.keys = keys
        self.stats = stats
        self.on_link = on_link
        self._options: dict[int, int | bytes] = {  # (the same for every link: made once, not at each join)
            zmq.ROUTING_ID: link_id(uuid),
            zmq.SNDHWM: CONTROL_HWM,
            zmq.SNDTIMEO: 0,
            zmq.RECONNECT_IVL: 100,
            zmq.RECONNECT_IVL_MAX: 1000,
            **link_liveness(config.peer_timeout_s),
        }

    def open(self, peer: PeerState, hello: ZreMessage) -> None:
        """Connect a link to ``peer.endpoint`` and send ``hello`` first. Raises `zmq.ZMQError`."""
        link = new_socket(self.ctx, zmq.DEALER, self._options)
        try:
            peer.monitor = link.get_monitor_socket(_MONITOR_EVENTS)
            if self.keys is not None:
                assert peer.key is not None, "secure links need the peer's key"
                # (a secure node only: a plain one never loads CURVE)
                from .._io.curve import make_client

                make_client(link, self.keys, peer.key)
            link.connect(peer.endpoint)
        except zmq.ZMQError:
            link.close(0)
            if peer.monitor is not None:
                peer.monitor.close(0)
                peer.monitor = None
            raise
        peer.link = link
        peer.out_sequence = 0
        self.loop.add_reader(peer.monitor.FD, self._on_monitor, peer)
        self.loop.call_soon(self._on_monitor, peer)  # the descriptor is edge-triggered
        self.send(peer, hello)
        peer.greeted_at = time.monotonic()

    def close(self, peer: PeerState, linger_ms: int = 0) -> None:
        """Close the link and its monitor; ``linger_ms`` lets queued commands go out."""
        if peer.monitor is not None:
            try:
                self.loop.remove_reader(peer.monitor.FD)
            except Exception:
                pass
            try:
                peer.link.disable_monitor()  # type: ignore[union-attr]
            except zmq.ZMQError:
                pass
            peer.monitor.close(0)
            peer.monitor = None
        if peer.link is not None:
            peer.link.close(linger_ms)
            peer.link = None
        peer.link_up = False

    def send(self, peer: PeerState, msg: ZreMessage) -> bool:
        """Send one command with the link's next sequence number; False if it cannot go now."""
        if peer.link is None:
            return False
        msg.sequence = zre.next_sequence(peer.out_sequence)
        try:
            send_frames(peer.link, zre.encode_command(msg))
        except zmq.Again:
            self.stats.membership["send_blocked"] += 1
            return False
        except zmq.ZMQError as exc:
            log.debug("send to %s failed: %s", peer.id, exc)
            return False
        peer.out_sequence = msg.sequence
        return True

    def _on_monitor(self, peer: PeerState) -> None:
        monitor = peer.monitor
        while monitor is not None:
            try:
                frames = recv_frames(monitor)
            except zmq.ZMQError:
                return
            event = monitor_event(frames)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.on_link(peer, True)
            elif event == zmq.EVENT_DISCONNECTED:
                self.on_link(peer, False)
            elif event == zmq.EVENT_CONNECT_RETRIED and not peer.link_up:
                # A connect failed (refused, timed out) while the link is down. For a link
                # that was up, DISCONNECTED said so already; for one that never came up (a
                # peer killed right after its HELLO reached us, before our own link to it got
                # through) no DISCONNECTED ever comes, so this is how it is seen down.
                self.on_link(peer, False)
            monitor = peer.monitor
            if monitor is not None and not has_input(monitor):  # (one event the common case: no Again raised after it)
                return
