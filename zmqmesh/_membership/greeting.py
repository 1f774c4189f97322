"""Greeting: the HELLOs a node takes in, and a ready peer that lost us greeted again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .._stats import Stats
from .._wire.frames import HEADER
from .._wire.zre import ZreMessage
from .admission import Admission
from .events import MembershipEvents
from .links import Links
from .peer import PeerState
from .peer_groups import PeerGroups
from .roster import Roster
from .timers import Timers

__all__ = ["Greeter", "MAX_HELLO_HEADER_BYTES"]

log = logging.getLogger("zmqmesh.membership")

MAX_HELLO_HEADER_BYTES = 64 * 1024
"""What a peer's HELLO headers may hold in all (zmqmesh's own take under 1 KiB)."""


class Greeter:
    """Takes a peer's HELLO in: admits its sender (not this node, of this mesh, at a
    usable endpoint, within the bounds of a HELLO and of ``peer_groups``), makes it a
    ready peer in ``roster`` (reported through ``events``; a zmqmesh peer is told of
    the others by ``gossip_to``) or refreshes one, and greets again a ready peer that
    lost us. Refusals are counted in ``stats``.

    ``hello()`` is the HELLO our link sends first; ``ping(peer)`` sends a PING;
    ``secure``: this node has CURVE keys (a HELLO's key header is read).
    """

    def __init__(self, *, uuid: bytes, secure: bool, admission: Admission, stats: Stats, events: MembershipEvents,
                 links: Links, roster: Roster, peer_groups: PeerGroups, timers: Timers, heartbeat_interval_s: float,
                 hello: Callable[[], ZreMessage], ping: Callable[[PeerState], None],
                 gossip_to: Callable[[PeerState], None]) -> None:
        self.uuid = uuid
        self.secure = secure
        self.admission = admission
        self.stats = stats
        self.events = events
        self.links = links
        self.roster = roster
        self.peer_groups = peer_groups
        self.timers = timers
        self.heartbeat_interval_s = heartbeat_interval_s
        self.hello = hello
        self.ping = ping
        self.gossip_to = gossip_to

    @property
    def quiet_s(self) -> float:
        """Longer than a live peer stays silent: it pings at least every heartbeat."""
        return 1.5 * self.heartbeat_interval_s

    def on_hello(self, uuid: bytes, peer: PeerState | None, msg: ZreMessage) -> None:
        """A HELLO from ``uuid`` (``peer``: the one kept under it, if any): taken in, a
        known peer refreshed or greeted again, or refused (counted, see the class)."""
        if uuid == self.uuid:  # (this node never greets itself: a stranger's, under its public uuid)
            self.stats.reject("zre_own_uuid")
            return
        if self.admission.is_foreign(uuid) or self.roster.leaving:
            return  # (leaving: greeted back, a peer that had our goodbye would list us again)
        if self.admission.endpoint_ok(msg.endpoint) is None:
            return
        welcome, is_zmqmesh = self.admission.mesh_of(msg.headers)
        if not welcome:
            self.admission.remember_foreign(uuid)
            if peer is not None:
                self.roster.drop(peer, "moved to another mesh")
            return
        group_chars = sum(len(g) for g in msg.groups)
        if sum(len(k) + len(v) for k, v in msg.headers.items()) > MAX_HELLO_HEADER_BYTES or \
                self.peer_groups.too_many_for_one(group_chars):
            self.stats.reject("zre_hello_too_large")  # never kept: a stranger's megabytes stay his
            self._hello_refused(peer, msg, "its HELLO was too large")
            return
        if self.peer_groups.past_budget(peer, group_chars):
            self.stats.reject("zre_groups_over_budget")  # (never kept either: those of the peers known stay)
            self._hello_refused(peer, msg, "its HELLO's groups were past the budget of all peers")
            return
        if msg.sequence != 1:
            self.stats.reject("zre_hello_sequence")
        key = msg.headers.get(HEADER["key"]) if self.secure else None
        if peer is None:
            peer = self.roster.learn(uuid, msg.endpoint, key, answered=True)
            if peer is None:
                return
        elif peer.ready:
            # The peer greeted us again: it had lost us. Restart our side of the link so
            # that our sequence starts afresh too. Not at another endpoint while it is still
            # heard from over its link: anyone can claim a peer's uuid (its beacons make it
            # public), and the peer's traffic would go to the claimant.
            now = time.monotonic()
            if self._claims_live_peer(peer, msg.endpoint):
                self.stats.reject("zre_hello_conflict")
                log.warning("a HELLO claims peer %r (%s) at %s, while it is heard from at %s: ignored",
                            peer.name, peer.id[:8], msg.endpoint, peer.endpoint)
                return
            if now - peer.greeted_at < self.quiet_s:
                # Ours went out less than a heartbeat and a half ago: this one crossed it or
                # answers it. Answering at once would have two peers that hold each other as
                # ready trade HELLOs and links for good. A PING tells them apart: a peer that
                # holds us as ready answers it; one that lost us again waits for our HELLO
                # and takes nothing else, so it gets the HELLO if it stays silent.
                self.stats.membership["hellos_crossed"] += 1
                if not peer.silence_check:  # (one at a time: a peer's HELLOs may come by the thousand)
                    peer.silence_check = True
                    self.ping(peer)
                    self.timers.later(self.quiet_s, self._greet_if_silent, peer)
            else:
                self._greet_again(peer, msg.endpoint)
        peer.in_sequence = msg.sequence
        peer.spoke = False
        peer.hello_endpoint = msg.endpoint  # (it may differ from where we heard of it: an advertised address)
        peer.name = msg.name
        peer.headers = dict(msg.headers)
        self.peer_groups.set_groups(peer, msg.groups)
        peer.status = msg.status
        peer.is_zmqmesh = is_zmqmesh
        peer.touch()
        peer.changed()
        if peer.ready:
            self.events.peer_groups_changed(peer)
            return
        for ghost in self.admission.ghosts(peer, self.roster.peers.values(), self.quiet_s):  # (listed before any is removed)
            self.roster.remove(ghost, "replaced by a restarted node")
        peer.ready = True
        self.ping(peer)  # answered over a link that came up, it proves the peer
        self.stats.membership["joined"] += 1
        log.info("peer %r (%s) joined from %s", peer.name, peer.id[:8], peer.endpoint)
        self.events.peer_ready(peer)
        if peer.is_zmqmesh:
            self.gossip_to(peer)

    def _hello_refused(self, peer: PeerState | None, msg: ZreMessage, reason: str) -> None:
        """A HELLO was refused (a bound): a ready peer that sent it is dropped now, as one
        that greets us first would not be taken. Its sequence began afresh with that HELLO,
        so kept, it would be dropped at its next message anyway, for a sequence gap (and
        with groups as known here that its HELLO may have changed). Not a HELLO that
        `_claims_live_peer`: a stranger's, under a peer's public uuid, drops nobody."""
        if peer is not None and peer.ready and not self._claims_live_peer(peer, msg.endpoint):
            self.roster.remove(peer, reason)

    def _claims_live_peer(self, peer: PeerState, endpoint: str) -> bool:
        """Whether a HELLO from ``endpoint`` under a ready ``peer``'s uuid claims it from
        elsewhere while it is still heard from over its link: anyone can send one (its
        beacons make the uuid public), and it is no word of the peer's."""
        return endpoint not in (peer.endpoint, peer.hello_endpoint) and peer.link_up and \
            time.monotonic() - peer.last_rx < self.quiet_s

    def _greet_again(self, peer: PeerState, endpoint: str) -> None:
        """Restart our link to a ready peer that lost us, at ``endpoint``, with a HELLO."""
        self.links.close(peer)
        peer.endpoint = endpoint
        self.links.open(peer, self.hello())
        self.stats.membership["regreeted"] += 1
        if not peer.proven:  # (what it owed on the old link is lost with it)
            peer.pings_out = 0
            self.ping(peer)

    def _greet_if_silent(self, peer: PeerState) -> None:
        """Greet a ready peer again if it sent nothing but HELLOs since the one that crossed
        ours (`on_hello`), not even the answer to our PING: it lost us, and waits for one."""
        peer.silence_check = False
        if self.timers.closed or self.roster.leaving or self.roster.peers.get(peer.uuid) is not peer or not peer.ready:
            return
        if not peer.spoke and time.monotonic() - peer.greeted_at >= self.quiet_s:
            self._greet_again(peer, peer.endpoint)
