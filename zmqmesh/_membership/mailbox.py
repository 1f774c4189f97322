"""The mailbox: the ROUTER every peer's link connects to, read on the loop in bounded bursts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .._io.reactor import EventLoop
from .._io.sockets import (
    CONTROL_HWM,
    LISTEN_BACKLOG,
    has_input,
    new_socket,
    recv_routed,
)
from .._stats import Stats
from .._wire.frames import FRAME_HEADROOM
from ..config import NodeConfig
from ..errors import ZmqMeshError

if TYPE_CHECKING:
    from .._io.curve import KeyPair

__all__ = ["Mailbox"]

log = logging.getLogger("zmqmesh.membership")

_MAILBOX_BURST = 512
_MAILBOX_BURST_BYTES = 1 << 20
"""Bytes of messages a burst of the mailbox reads at most (a message at least): what a
message costs the loop grows with its size (a HELLO of 10,000 one-character groups, 110 KB,
about 8 ms), and a stranger's 512 fat HELLOs held the loop for seconds a burst (a sweep
reads up to four), where every call of the node's users waits."""
_SWEEP_READS = 4
"""Bursts of the mailbox a sweep reads before it judges who fell silent (2,048 messages, 4 MiB of them at most)."""


class Mailbox:
    """Binds the mailbox ROUTER and reads it: each message (its frames, the sender's
    routing id first) goes to the ``on_message`` given to `start`. An error there is
    counted (``zre_handler_error``) and logged, never raised into the loop."""

    def __init__(self, *, loop: EventLoop, ctx: zmq.Context[Any], config: NodeConfig,
                 keys: KeyPair | None, stats: Stats) -> None:
        self.loop = loop
        self.ctx = ctx
        self.config = config
        self.keys = keys
        self.stats = stats
        self.socket: zmq.Socket[Any] | None = None
        """The ROUTER, from `bind` until `close`."""
        self._on_message: Callable[[list[bytes]], None] | None = None
        self._read_queued = False  # a read of the mailbox waits on the loop (`read_soon`)

    def bind(self, address: str) -> int:
        """Bind the ROUTER on ``address`` to ``mailbox_port``, or to a random port in
        0xC000-0xFFFF (as ZRE asks); the port. Raises `ZmqMeshError` if it cannot."""
        mailbox = new_socket(self.ctx, zmq.ROUTER, {
            zmq.RCVHWM: CONTROL_HWM,
            zmq.MAXMSGSIZE: self.config.max_message_bytes + FRAME_HEADROOM,
            # a peer reconnecting after a cut link takes over its routing id at once,
            # instead of being shut out by its own half-open previous connection
            zmq.ROUTER_HANDOVER: 1,
            zmq.BACKLOG: LISTEN_BACKLOG,  # (every peer connects at once when this node starts)
        })
        if self.keys is not None:
            # (a secure node only: a plain one never loads CURVE)
            from .._io.curve import make_server

            make_server(mailbox, self.keys)
        try:
            if self.config.mailbox_port:
                mailbox.bind(f"tcp://{address}:{self.config.mailbox_port}")
                port = self.config.mailbox_port
            else:
                try:
                    port = mailbox.bind_to_random_port(
                        f"tcp://{address}", min_port=0xC000, max_port=0xFFFF, max_tries=200
                    )
                except zmq.ZMQBindError:
                    port = _bind_ephemeral(mailbox, address)
        except zmq.ZMQError as exc:
            mailbox.close(0)
            raise ZmqMeshError(f"cannot bind the mailbox on {address}: {exc}") from exc
        self.socket = mailbox
        return port

    def start(self, on_message: Callable[[list[bytes]], None]) -> None:
        """Watch the ROUTER on the loop, handing each message to ``on_message``."""
        assert self.socket is not None, "bind() first"
        self._on_message = on_message
        self.loop.add_reader(self.socket.FD, self.on_readable)

    def close(self) -> None:
        """Stop watching the ROUTER and close it (idempotent)."""
        if self.socket is not None:
            try:
                self.loop.remove_reader(self.socket.FD)
            except Exception:
                pass
            self.socket.close(0)
            self.socket = None

    def on_readable(self) -> None:
        """Read a burst, and another at the next turn of the loop if that one filled."""
        if self._read_burst():
            self.read_soon()  # more may be waiting: yield, then go on

    def _read_burst(self) -> bool:
        """Handle the messages waiting in the mailbox, up to `_MAILBOX_BURST` or
        `_MAILBOX_BURST_BYTES`; whether the burst filled (more may wait, and the descriptor
        will not say so again)."""
        mailbox, on_message = self.socket, self._on_message
        if mailbox is None or on_message is None:
            return False
        read = 0
        for i in range(_MAILBOX_BURST):
            if read >= _MAILBOX_BURST_BYTES:
                return True
            if i and not has_input(mailbox):  # (the common single message: a flag looked at, not an Again raised)
                return False
            try:
                frames = recv_routed(mailbox)  # (pyzmq's recv_multipart: half as much again)
            except zmq.Again:
                return False
            except zmq.ZMQError as exc:
                log.debug("mailbox receive failed: %s", exc)
                return False
            read += sum(map(len, frames))
            try:
                on_message(frames)
            except Exception:  # never let one message take the node down
                self.stats.reject("zre_handler_error")
                log.exception("error handling a ZRE message")
        return True

    def read_before_verdicts(self) -> None:
        """Before a sweep judges who fell silent, read what waits in the mailbox, up to
        `_SWEEP_READS` bursts: a peer's words may be there, left unread by a loop busy
        with others (in a launch of 128 nodes on 2 CPUs, half the peers declared gone
        were declared so by a node with its mailbox unread). ZeroMQ hands the messages
        of the peers out in turn, so a stranger's flood does not stand before them."""
        mailbox = self.socket
        if mailbox is None or not has_input(mailbox):
            return
        for _ in range(_SWEEP_READS):
            if not self._read_burst():
                return
        self.read_soon()  # (more waits, and the looks may have taken the descriptor's signal)

    def read_soon(self) -> None:
        """Read the mailbox at the next turn of the loop, unless a read waits there already:
        one at a time, however many ask (each read that finds more asks again, and a sweep
        that finds messages waiting asks too: queued beside a read already waiting, each
        became a chain of reads of its own, and a mailbox kept full took a share of the loop
        that grew by one chain a sweep)."""
        if not self._read_queued:
            self._read_queued = True
            self.loop.call_soon(self.on_queued_read)

    def on_queued_read(self) -> None:
        """The read `read_soon` queued: one more may be queued from now on."""
        self._read_queued = False
        self.on_readable()


def _bind_ephemeral(sock: zmq.Socket[Any], address: str) -> int:
    sock.bind(f"tcp://{address}:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])
