"""The groups the peers are in, within a bound of memory: their HELLOs', JOINs and LEAVEs."""

from __future__ import annotations

from collections.abc import Iterable

from .._stats import Stats
from .._wire.zre import Command, ZreMessage
from .events import MembershipEvents
from .peer import PeerState

__all__ = ["PeerGroups", "MAX_HELLO_GROUP_BYTES", "MAX_GROUP_BYTES_ALL"]

MAX_HELLO_GROUP_BYTES = 1024 * 1024
"""What a peer's HELLO group names may hold in all (2,000 offers take about 150 KiB)."""
MAX_GROUP_BYTES_ALL = 32 * 1024 * 1024
"""What the group names of every peer together may hold (128 peers of 2,000 offers each
take about 10 MiB); past it, a HELLO or JOIN that would add to them is refused, counted
(``zre_groups_over_budget``): a crowd of fat peers costs a bounded share of memory, where
the bound per peer alone let 1,024 of them hold 1 GiB of names (and the tables made
of them, about 25 times as much)."""


class PeerGroups:
    """Keeps each peer's groups: those of its HELLO, then its JOINs and LEAVEs, within
    `MAX_HELLO_GROUP_BYTES` a peer and `MAX_GROUP_BYTES_ALL` for every peer together.
    What would pass a bound is refused and counted in ``stats``; a change, or a refusal
    that leaves a peer's groups short, is reported through ``events``."""

    def __init__(self, *, stats: Stats, events: MembershipEvents) -> None:
        self.stats = stats
        self.events = events
        self.chars = 0
        """The characters of every peer's group names together (`MAX_GROUP_BYTES_ALL`)."""

    def too_many_for_one(self, group_chars: int) -> bool:
        """Whether a HELLO's groups, ``group_chars`` characters in all, pass the bound of a peer."""
        return group_chars > MAX_HELLO_GROUP_BYTES

    def past_budget(self, peer: PeerState | None, group_chars: int) -> bool:
        """Whether a HELLO's groups, ``group_chars`` characters in all, would pass the
        budget of every peer together, once those of ``peer`` (its sender, if known) made way."""
        return self.chars - (peer.group_chars if peer is not None else 0) + group_chars > MAX_GROUP_BYTES_ALL

    def set_groups(self, peer: PeerState, groups: Iterable[str]) -> None:
        """``peer``'s groups are ``groups`` (its HELLO's, checked against the bounds)."""
        self.chars -= peer.group_chars
        peer.set_groups(groups)
        self.chars += peer.group_chars

    def on_join_or_leave(self, peer: PeerState, msg: ZreMessage) -> None:
        """A ready peer's JOIN or LEAVE (in sequence): its status is taken (a jump counted
        as ``zre_status_mismatch``), and the group added, within the bounds, or removed."""
        if msg.status != (peer.status + 1) % 256:
            self.stats.reject("zre_status_mismatch")
        peer.status = msg.status
        had = peer.group_chars
        if msg.command == Command.JOIN:
            if msg.group not in peer.groups and self.chars + len(msg.group) > MAX_GROUP_BYTES_ALL:
                self.stats.reject("zre_groups_over_budget")
                self._refused(peer)
                return
            if not peer.join(msg.group, MAX_HELLO_GROUP_BYTES):
                self.stats.reject("zre_too_many_groups")  # (bounded as a HELLO's groups are)
                self._refused(peer)
                return
        else:
            peer.leave(msg.group)
        self.chars += peer.group_chars - had
        peer.changed()
        self.events.peer_groups_changed(peer)

    def release(self, peer: PeerState) -> None:
        """``peer`` is forgotten: its groups leave the budget."""
        self.chars -= peer.group_chars

    def clear(self) -> None:
        """Every peer is forgotten."""
        self.chars = 0

    def _refused(self, peer: PeerState) -> None:
        """A JOIN of ``peer`` was refused: its groups as known here may lack an offer of it,
        a subscription among them (the publisher then connects to it all the same, as it
        cannot tell: `Publisher.sync_connections`). Said once, until a HELLO of it is taken."""
        if not peer.groups_refused:
            peer.groups_refused = True
            self.events.peer_groups_changed(peer)
