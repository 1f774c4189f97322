"""What membership knows of one peer: ZRE facts only (the pattern layer reads its groups)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import zmq

__all__ = ["PeerState"]


class PeerState:
    """One peer as the ZRE engine tracks it: identity, link, sequences, groups, liveness.

    Mutated on the node's event loop only. ``version`` changes whenever the groups or the
    headers do, so readers can cache what they derive from them.
    """

    def __init__(self, uuid: bytes, endpoint: str, address: str, seed: str | None = None) -> None:
        self.uuid = uuid
        self.id = uuid.hex()
        self.endpoint = endpoint
        self.hello_endpoint = endpoint  # the endpoint its last HELLO gave (our link's may be another)
        self.address = address
        self.seed = seed  # the seed option this link was opened for, until the peer answers
        self.link: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.key: str | None = None
        self.out_sequence = 0
        self.greeted_at = float("-inf")  # when our link last sent it a HELLO (time.monotonic)
        self.spoke = False  # it sent more than a HELLO since its last one
        self.silence_check = False  # a crossed HELLO of its awaits `Greeter._greet_if_silent`
        self.in_sequence = 0
        self.ready = False
        self.name = ""
        self.headers: dict[str, str] = {}
        self.groups: set[str] = set()  # (changed through `set_groups`, `join`, `leave`: `group_chars` follows)
        self.group_chars = 0
        self.groups_refused = False  # a JOIN of it was refused (a budget): `groups` may lack some of its offers
        self.status = 0
        self.last_rx = time.monotonic()
        self.last_word = self.last_rx  # its last command over its link (`last_rx`: beacons too)
        self.last_seen = time.time()
        self.ping_sent: float | None = None
        self.link_up = False
        self.disconnected_at: float | None = None
        self.is_zmqmesh = False
        self.pings_out = 0  # PINGs sent and not yet answered
        self.answered = False  # it answered one of them
        self.proven = False  # it answered, and our link to its endpoint came up
        self.version = 0

    def touch(self) -> None:
        """Record a command from the peer over its link (its word: a sign of life)."""
        self.seen()
        self.last_word = self.last_rx

    def seen(self) -> None:
        """Record a sign of life that is not the peer's word: its beacon, which anyone can
        send under its uuid."""
        self.last_rx = time.monotonic()
        self.last_seen = time.time()
        self.ping_sent = None

    def changed(self) -> None:
        """Note that the groups or headers changed."""
        self.version += 1

    def set_groups(self, groups: Iterable[str]) -> None:
        """Its groups are ``groups`` (a HELLO's)."""
        self.groups = set(groups)
        self.group_chars = sum(map(len, self.groups))
        self.groups_refused = False

    def join(self, group: str, most_chars: int) -> bool:
        """It joined ``group``: False (not added) if its groups' names would pass
        ``most_chars`` characters in all (bounded as a HELLO's are)."""
        if group not in self.groups:
            if self.group_chars + len(group) > most_chars:
                return False
            self.groups.add(group)
            self.group_chars += len(group)
        return True

    def leave(self, group: str) -> None:
        """It left ``group``."""
        if group in self.groups:
            self.groups.discard(group)
            self.group_chars -= len(group)
