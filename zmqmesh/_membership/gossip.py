"""Gossip: zmqmesh peers telling each other of the others they know."""

from __future__ import annotations

from .._stats import Stats
from .._wire.codec import Codec
from .._wire.zre import Command, ZreMessage
from . import control
from .links import Links
from .peer import PeerState
from .roster import Roster
from .timers import Timers

__all__ = ["Gossip"]

_GOSSIP_HEARTBEATS = 10
"""Every so many heartbeat intervals, a node tells one proven peer (each in turn) of the
others it has proven: two peers that lost each other while a third still hears from both
meet again. (In a mesh of seeds no beacon brings them back; gossip went only to newcomers.)"""


class Gossip:
    """Tells a zmqmesh peer of the others in ``roster`` (a newcomer at once, a proven peer
    in turn every `_GOSSIP_HEARTBEATS` heartbeats), and takes in those a peer tells of,
    within the places left (the rest counted as ``gossip_past_bound``)."""

    def __init__(self, *, codec: Codec, links: Links, roster: Roster, stats: Stats, timers: Timers,
                 heartbeat_interval_s: float) -> None:
        self.codec = codec
        self.links = links
        self.roster = roster
        self.stats = stats
        self.timers = timers
        self.heartbeat_interval_s = heartbeat_interval_s
        self._turn = 0

    def start(self) -> None:
        """Begin the rounds: the first `_GOSSIP_HEARTBEATS` heartbeats from now."""
        self.timers.later(_GOSSIP_HEARTBEATS * self.heartbeat_interval_s, self._round)

    def tell(self, peer: PeerState, proven_only: bool = False) -> None:
        """Tell ``peer`` of the other ready peers, in as many WHISPERs as `max_message_bytes`
        needs; ``proven_only``: of those proven to be where they say. (A newcomer hears of
        every one, those that came a moment before it too, still being proven; the rounds,
        of proven ones only: a stranger that greeted this node alone, claiming an endpoint
        it does not own, would have the mesh greet that endpoint every round.)"""
        known = [[p.id, p.endpoint, p.key or ""] for p in self.roster.peers.values()
                 if p.ready and p is not peer and (p.proven and p.link_up or not proven_only)]
        for part in control.gossip(self.codec, known):
            self.links.send(peer, ZreMessage(Command.WHISPER, 0, content=part))

    def take(self, entries: list[tuple[bytes, str, str | None]]) -> None:
        """A peer's word about others (``(uuid, endpoint, key)`` each, see `control.parse`):
        as many new ones are taken in as there are places left, none making way for another
        (a list of 10,000 strangers at 10,000 addresses opened and closed as many links in
        one turn of the loop: seconds)."""
        if not entries:  # (every one known already: the common case once a mesh formed)
            return
        room = self.roster.places_left()  # (counted down here: each count walks every peer)
        for at, (uuid, endpoint, key) in enumerate(entries):
            if room <= 0:
                self.stats.reject("gossip_past_bound", len(entries) - at)
                break
            if self.roster.learn(uuid, endpoint, key) is not None:  # (a place taken: never one made)
                room -= 1

    def _round(self) -> None:
        """Gossip to the next proven zmqmesh peer in turn, and again `_GOSSIP_HEARTBEATS` later."""
        if self.timers.closed:
            return
        self.timers.later(_GOSSIP_HEARTBEATS * self.heartbeat_interval_s, self._round)
        told = [p for p in self.roster.peers.values() if p.proven and p.link_up and p.is_zmqmesh]
        if len(told) >= 2 and not self.roster.leaving:
            self._turn += 1
            self.tell(told[self._turn % len(told)], proven_only=True)
