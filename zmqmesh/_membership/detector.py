"""Failure detection as pure policy: who to PING, who to declare gone, and when.

Sans-I/O: it reads the peers' liveness fields and returns decisions; the engine sends the
PINGs and removes the peers. A peer is declared gone:

* within ``disconnect_grace_s`` when its TCP link drops and is not re-established (a
  crashed process on this host, seen through a socket monitor);
* within ``peer_timeout_s`` when it falls silent (a stopped process, a cut link): a peer
  silent for ``heartbeat_interval_s`` is PINGed first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .peer import PeerState

__all__ = ["FailureDetector", "Sweep"]


@dataclass
class Sweep:
    """What one sweep decided: peers to PING, and peers to drop with the reason."""

    ping: list[PeerState] = field(default_factory=list)
    expired: list[tuple[PeerState, str]] = field(default_factory=list)


class FailureDetector:
    """Decides liveness from the times a peer was last heard from and its link events."""

    def __init__(self, heartbeat_interval_s: float, peer_timeout_s: float, disconnect_grace_s: float) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.peer_timeout_s = peer_timeout_s
        self.disconnect_grace_s = disconnect_grace_s

    @property
    def sweep_interval_s(self) -> float:
        """How often `sweep` should run."""
        return min(self.heartbeat_interval_s / 2, 0.5)

    def sweep(self, peers: Iterable[PeerState], now: float) -> Sweep:
        """Peers silent past ``peer_timeout_s`` expire; ready peers silent past a heartbeat get a PING.

        Marks each PINGed peer's ``ping_sent``, so one PING goes out per heartbeat interval.
        """
        result = Sweep()
        for peer in peers:
            silent = now - peer.last_rx
            if silent > self.peer_timeout_s:
                result.expired.append((peer, f"silent for {silent:.1f} s"))
            elif peer.ready and silent > self.heartbeat_interval_s and (
                peer.ping_sent is None or now - peer.ping_sent > self.heartbeat_interval_s
            ):
                peer.ping_sent = now
                result.ping.append(peer)
        return result

    def link_up(self, peer: PeerState) -> None:
        """The peer's link completed a handshake."""
        peer.link_up = True
        peer.disconnected_at = None

    def link_down(self, peer: PeerState, now: float) -> bool:
        """The peer's link dropped; True if a check is due ``disconnect_grace_s`` from now."""
        peer.link_up = False
        if peer.disconnected_at is None:
            peer.disconnected_at = now
            return True
        return False

    @staticmethod
    def still_disconnected(peer: PeerState) -> bool:
        """After the grace period: True if the link did not come back."""
        return peer.disconnected_at is not None
