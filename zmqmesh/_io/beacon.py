"""UDP beacons: announcing this node's mailbox and hearing others' (ZRE discovery).

The socket is non-blocking; the node's event loop calls `BeaconSocket.receive` when the
descriptor is readable and `BeaconSocket.send` on its beacon timer. Several nodes on one
host share the beacon port (SO_REUSEADDR + SO_REUSEPORT); a broadcast reaches all of them.
"""

from __future__ import annotations

import logging
import socket

from .._addresses import is_ipv4
from .._stats import LogThrottle

__all__ = ["BeaconSocket", "RECEIVE_BUFFER"]

log = logging.getLogger("zmqmesh.discovery")

_MAX_DATAGRAM = 512
SEND_FAILED_LOG_S = 60.0
"""Beacons that could not be sent are logged at most this often (a target that does not
resolve, a network that went away: every tick fails alike)."""
_RECEIVE_BURST = 256
RECEIVE_BUFFER = 1 << 20
"""The beacon socket's receive buffer (``SO_RCVBUF``; the kernel caps it at
``net.core.rmem_max``). A beacon takes about 830 bytes of it, so Linux's default (208 KiB)
holds 256: two seconds of a 128-node mesh, a quarter of one at the most peers a node keeps
(1,024). The loop reads beacons in batches, and a node that could not run for longer lost
the rest (in a 128-node launch on two CPUs, hundreds of thousands). This one holds about
2,500."""


class BeaconSocket:
    """One UDP socket that both sends beacons to ``target`` and receives them on ``port``.

    ``target`` is a broadcast address (127.255.255.255 on loopback, the interface's
    broadcast address on a real network). Only datagrams sent to that broadcast address
    are received when it is bindable, so a loopback node never hears the LAN.
    """

    def __init__(self, target: str, port: int, loopback_only: bool) -> None:
        self.target = target
        self.port = port
        self.loopback_only = loopback_only
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((self._bind_address(target), port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._failed_log = LogThrottle(SEND_FAILED_LOG_S)

    @staticmethod
    def _bind_address(target: str) -> str:
        """Bind to the broadcast address itself when possible: then only broadcasts to it arrive."""
        if not is_ipv4(target):
            return ""
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((target, 0))
        except OSError:
            return ""
        finally:
            probe.close()
        return target

    def fileno(self) -> int:
        """The descriptor to watch for readability."""
        return self._sock.fileno()

    def send(self, payload: bytes) -> None:
        """Send one beacon; a failure is logged (at most every `SEND_FAILED_LOG_S`), never
        raised (the next tick tries again)."""
        try:
            self._sock.sendto(payload, (self.target, self.port))
        except OSError as exc:  # (a beacon_address that does not resolve failed here, unseen at debug level)
            said = self._failed_log.due()
            if said:
                log.warning("%d beacon(s) to %s:%s could not be sent since the last such line (peers cannot "
                            "find this node by them): %s; said again at most every %g s",
                            said, self.target, self.port, exc, SEND_FAILED_LOG_S)

    def receive(self) -> tuple[list[tuple[bytes, str]], bool]:
        """The datagrams waiting now (a bounded burst), as ``(payload, source_ip)``, and
        whether that was all of them (False: more wait, the burst was full)."""
        out: list[tuple[bytes, str]] = []
        for _ in range(_RECEIVE_BURST):
            try:
                data, (source, _port) = self._sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return out, True
            except OSError as exc:
                log.debug("beacon receive failed: %s", exc)
                return out, True
            if self.loopback_only and not source.startswith("127."):
                continue
            out.append((data, source))
        return out, False

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()
