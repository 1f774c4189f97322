"""Keeping peers alive and proven: PINGs, link events, and the sweep that drops the silent.

The `FailureDetector` decides; `Liveness` carries its decisions out on the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .._stats import Stats
from .._wire.zre import Command, ZreMessage
from .detector import FailureDetector
from .discovery import Seeds
from .links import Links
from .peer import PeerState
from .roster import Roster
from .timers import Timers

__all__ = ["Liveness", "check_proof"]

log = logging.getLogger("zmqmesh.membership")


def check_proof(peer: PeerState) -> None:
    """A peer is proven once our link to the endpoint it claims came up and it answered
    a PING sent over that link (as far as ZRE can tell, the endpoint is its own)."""
    if peer.answered and peer.link_up:
        peer.proven = True


class Liveness:
    """PINGs peers, proves them, follows their links' events, and sweeps every
    ``detector.sweep_interval_s``: the `FailureDetector` says whom to PING and whom to
    declare gone (dropped from ``roster``), and the silent seeds are greeted anew.

    ``read_first()`` reads what waits in the mailbox before a sweep's verdicts; ``name``
    is this node's, for the log.
    """

    def __init__(self, *, detector: FailureDetector, links: Links, roster: Roster, seeds: Seeds, stats: Stats,
                 timers: Timers, disconnect_grace_s: float, read_first: Callable[[], None], name: str) -> None:
        self.detector = detector
        self.links = links
        self.roster = roster
        self.seeds = seeds
        self.stats = stats
        self.timers = timers
        self.disconnect_grace_s = disconnect_grace_s
        self.read_first = read_first
        self.name = name

    def ping(self, peer: PeerState) -> None:
        """Send ``peer`` a PING, counted as owed until it answers (unless it cannot go now)."""
        if self.links.send(peer, ZreMessage(Command.PING, 0)):
            peer.pings_out += 1
            self.stats.membership["pings_sent"] += 1

    def on_link(self, peer: PeerState, up: bool) -> None:
        """``peer``'s link came ``up`` (which may prove it) or went down (it is dropped if
        the link is still down ``disconnect_grace_s`` later)."""
        if up:
            self.detector.link_up(peer)
            check_proof(peer)
        elif self.detector.link_down(peer, time.monotonic()):
            self.timers.later(self.disconnect_grace_s, self._check_disconnected, peer)

    def _check_disconnected(self, peer: PeerState) -> None:
        if not self.detector.still_disconnected(peer):
            return
        if self.roster.peers.get(peer.uuid) is peer:
            self.roster.drop(peer, "connection lost")
        else:  # not (or no longer) a peer, e.g. a seed not yet answered: should it become
            self.detector.forget_disconnect(peer)  # one, its link's next failure counts anew

    def sweep(self) -> None:
        """Read the mailbox, then drop the peers silent too long and PING the quiet ones;
        greet the silent seeds anew; and sweep again ``detector.sweep_interval_s`` later.
        Does nothing once membership is closed."""
        if self.timers.closed:
            return
        was_late = self.detector.slack > 0
        self.read_first()
        if self.timers.closed:
            return
        now = time.monotonic()
        sweep = self.detector.sweep(list(self.roster.peers.values()), now)
        if sweep.late_s:
            self.stats.membership["late_sweeps"] += 1
            if not was_late:
                log.warning("node %s: its event loop ran %.1f s late (a starved host or a stopped process); that time "
                            "is not counted as its peers' silence, and they get more time to answer (%.0f s for now)",
                            self.name, sweep.late_s, self.detector.timeout_s)
        elif was_late and not self.detector.slack:
            log.info("node %s: its event loop runs on time again; peers are declared gone after %.1f s of silence",
                     self.name, self.detector.timeout_s)
        for peer, reason in sweep.expired:
            self.roster.drop(peer, reason)
        for peer in sweep.ping:
            self.ping(peer)
        self.seeds.regreet_silent(now, self.detector.timeout_s)  # (seeds get the same slack as peers)
        self.timers.later(self.detector.sweep_interval_s, self.sweep)
