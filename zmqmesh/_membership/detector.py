"""Failure detection as pure policy: who to PING, who to declare gone, and when.

Sans-I/O: it reads the peers' liveness fields and returns decisions; the engine sends the
PINGs and removes the peers. A peer is declared gone:

* within ``disconnect_grace_s`` when its TCP link drops and is not re-established, or
  never comes up because the endpoint refuses it (a crashed process on this host, seen
  through a socket monitor);
* within ``peer_timeout_s`` when it falls silent (a stopped process, a cut link): a peer
  silent for ``heartbeat_interval_s`` is PINGed first.

A node whose own loop runs late (a starved host, a stopped process) cannot tell a silent
peer from one it had no time to hear. So a sweep that comes late does not count the time
it was late as anyone's silence, and each such sweep gives peers one more `peer_timeout_s`
(up to `MAX_SLACK` more), given back one per `peer_timeout_s` of sweeps on time. Without
this, a node stopped or starved for longer than the timeout dropped every peer it had not
heard meanwhile, and each of them then had to join it again.
"""

from __future__ import annotations

from collections.abc import Iterable

from .peer import PeerState

__all__ = ["FailureDetector", "Sweep", "MAX_SLACK"]

MAX_SLACK = 8
"""The most timeouts a late-running node adds to `peer_timeout_s` (and heartbeats to
``heartbeat_interval_s``): a silent peer is then declared gone after 9 of them at most."""
_LATE_FRACTION = 0.5
"""A sweep is late when it comes this share of ``peer_timeout_s`` after it was due, or
a whole sweep interval if that is longer (timer jitter and a busy moment stay under it)."""


class Sweep:
    """What one sweep decided: peers to PING, and peers to drop with the reason; how late
    the sweep came (0.0 when on time, see `FailureDetector.sweep`)."""

    __slots__ = ("ping", "expired", "late_s")

    def __init__(self, late_s: float = 0.0) -> None:
        self.ping: list[PeerState] = []
        self.expired: list[tuple[PeerState, str]] = []
        self.late_s = late_s


class FailureDetector:
    """Decides liveness from the times a peer was last heard from and its link events."""

    def __init__(self, heartbeat_interval_s: float, peer_timeout_s: float, disconnect_grace_s: float) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.peer_timeout_s = peer_timeout_s
        self.disconnect_grace_s = disconnect_grace_s
        self.slack = 0
        """Timeouts added to `peer_timeout_s` after late sweeps (0 to `MAX_SLACK`)."""
        self._due: float | None = None  # when the next sweep is due (None before the first)
        self._calm_since = 0.0  # the last late sweep, or the last slack given back

    @property
    def timeout_s(self) -> float:
        """How long a peer may be silent now: `peer_timeout_s`, more after late sweeps."""
        return self.peer_timeout_s * (1 + self.slack)

    @property
    def sweep_interval_s(self) -> float:
        """How often `sweep` should run."""
        return min(self.heartbeat_interval_s / 2, 0.5)

    def sweep(self, peers: Iterable[PeerState], now: float) -> Sweep:
        """Peers silent past `timeout_s` expire; ready peers silent past a heartbeat (as
        many more as `slack`) get a PING. Call it every `sweep_interval_s`.

        A sweep that comes late (see `_LATE_FRACTION`) first moves each peer's
        ``last_rx`` on by how late it is, and adds one to `slack`. Marks each PINGed
        peer's ``ping_sent``, so one PING goes out per heartbeat interval.
        """
        late = self._lateness(now)
        timeout, heartbeat = self.timeout_s, self.heartbeat_interval_s * (1 + self.slack)
        result = Sweep(late_s=late)
        for peer in peers:
            if late:
                peer.last_rx = min(peer.last_rx + late, now)
            silent = now - peer.last_rx
            if silent > timeout:
                result.expired.append((peer, f"silent for {silent:.1f} s"))
            elif peer.ready and silent > heartbeat and (peer.ping_sent is None or now - peer.ping_sent > heartbeat):
                peer.ping_sent = now
                result.ping.append(peer)
        return result

    def _lateness(self, now: float) -> float:
        """How late this sweep is (0.0 when on time); counts it in `slack`."""
        due, self._due = self._due, now + self.sweep_interval_s
        if due is None:
            self._calm_since = now
            return 0.0
        late = now - due
        if late > max(self.peer_timeout_s * _LATE_FRACTION, self.sweep_interval_s):
            self.slack = min(self.slack + 1, MAX_SLACK)
            self._calm_since = now
            return late
        if self.slack and now - self._calm_since >= self.peer_timeout_s:
            self.slack -= 1
            self._calm_since = now
        return 0.0

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
    def forget_disconnect(peer: PeerState) -> None:
        """Stop counting the link as down since the last `link_down` (its next one counts anew)."""
        peer.disconnected_at = None

    @staticmethod
    def still_disconnected(peer: PeerState) -> bool:
        """After the grace period: True if the link did not come back."""
        return peer.disconnected_at is not None
