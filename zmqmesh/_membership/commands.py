"""What the mailbox receives: each ZRE command checked, then handled or handed on."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._stats import Stats
from .._wire import zre
from .._wire.codec import Codec
from .._wire.zre import Command, ZreMessage
from . import control
from .events import MembershipEvents
from .links import Links
from .liveness import check_proof
from .peer import PeerState
from .peer_groups import PeerGroups
from .roster import Roster

__all__ = ["Commands"]

log = logging.getLogger("zmqmesh.membership")


class Commands:
    """Handles each message of the mailbox (`handle`): checks the sender's routing id,
    the command and its sequence (a gap drops the peer, as RFC 36 requires); then
    delivers a WHISPER or a SHOUT to one of ``own_groups`` through ``events``, answers
    a PING, takes a PING-OK, and hands a HELLO to ``on_hello``, a JOIN or LEAVE to
    ``peer_groups``, a control WHISPER's gossip to ``take_gossip``. Whatever is malformed
    or unexpected is counted in ``stats.rejected`` and dropped; nothing raises.

    ``own_groups`` is this node's set of groups, read as it changes.
    """

    def __init__(self, *, codec: Codec, stats: Stats, events: MembershipEvents, links: Links, roster: Roster,
                 own_groups: set[str], peer_groups: PeerGroups,
                 on_hello: Callable[[bytes, PeerState | None, ZreMessage], None],
                 take_gossip: Callable[[list[tuple[bytes, str, str | None]]], None]) -> None:
        self.codec = codec
        self.stats = stats
        self.events = events
        self.links = links
        self.roster = roster
        self.peers = roster.peers
        self.own_groups = own_groups
        self.peer_groups = peer_groups
        self.on_hello = on_hello
        self.take_gossip = take_gossip

    def handle(self, frames: list[bytes]) -> None:
        """Handle one message of the mailbox: ``frames``, the sender's routing id first."""
        identity = frames[0]
        if len(identity) != 17 or identity[0] != 1:
            self.stats.reject("zre_bad_identity")
            return
        try:
            msg = zre.decode_command(frames[1:])
        except zre.ZreError as exc:
            self.stats.reject("zre_malformed")
            log.debug("malformed ZRE message: %s", exc)
            return
        uuid = identity[1:]
        peer = self.peers.get(uuid)
        if msg.command == Command.HELLO:
            self.on_hello(uuid, peer, msg)
            return
        if peer is None or not peer.ready:
            self.stats.reject("zre_before_hello")
            return
        expected = zre.next_sequence(peer.in_sequence)
        if msg.sequence != expected and not (
            # pyre wraps its sequence at 65535 instead of 65536: tolerate that from plain peers
            not peer.is_zmqmesh and peer.in_sequence == 65534 and msg.sequence == 0
        ):
            self.stats.reject("zre_sequence_gap")
            log.warning(
                "sequence gap from %s (expected %d, got %d): dropping the peer",
                peer.id[:8], expected, msg.sequence,
            )
            self.roster.remove(peer, "sequence gap")
            return
        peer.in_sequence = msg.sequence
        peer.spoke = True
        peer.touch()
        cmd = msg.command
        if cmd not in Command.NAMES:  # e.g. Zyre's leader election: not ours, but in sequence
            self.stats.reject("zre_unknown_command")
            return
        if cmd == Command.WHISPER:
            if control.is_control(msg.content):
                if peer.is_zmqmesh:
                    self._on_control(peer, msg.content)
                else:
                    self.stats.reject("control_from_plain_peer")
            else:
                self.stats.pattern["zre"]["received"] += 1
                self.events.zre_message("whisper", peer, "", msg.content)
        elif cmd == Command.SHOUT:
            if msg.group in self.own_groups:
                self.stats.pattern["zre"]["received"] += 1
                self.events.zre_message("shout", peer, msg.group, msg.content)
        elif cmd in (Command.JOIN, Command.LEAVE):
            self.peer_groups.on_join_or_leave(peer, msg)
        elif cmd == Command.PING:
            self.links.send(peer, ZreMessage(Command.PING_OK, 0))
            self.stats.membership["pings_answered"] += 1
        elif cmd == Command.PING_OK:
            if peer.pings_out:
                peer.pings_out -= 1
                peer.answered = True
                check_proof(peer)
        elif cmd == Command.GOODBYE:
            self.roster.remove(peer, "left (goodbye)")

    def _on_control(self, peer: PeerState, content: list[bytes]) -> None:
        """A zmqmesh peer's control WHISPER: its ``bye``, or its word about others."""
        parsed = control.parse(self.codec, content, self.roster.ids)
        if parsed is None:
            self.stats.reject("control_malformed")
        elif parsed[0] == "bye":
            self.roster.remove(peer, "left")
        elif parsed[0] == "peers":
            self.take_gossip(parsed[1])
        else:
            self.stats.reject("control_unknown")
