"""Who may become a peer: the mesh filter, CURVE key admission, endpoint checks, ghosts."""

from __future__ import annotations

import time
from collections.abc import Iterable

from .._stats import Stats
from .._wire.frames import HEADER, parse_endpoint
from .peer import PeerState

__all__ = ["Admission"]

_FOREIGN_MEMORY_S = 30.0
_MAX_FOREIGN = 1024
GREETINGS_PER_S = 32.0
"""Links a node opens per second to strangers announced (by beacon or gossip) at one IP
address, after a burst of `GREETING_BURST`; past it, announcements are counted and dropped."""
GREETING_BURST = 128.0
_MAX_ADDRESSES = 1024


class Admission:
    """Decides whom this node greets and keeps, counting every refusal in ``stats``.

    ``keys_public`` is this node's public key (None for a plain node); ``allowed`` the
    public keys it admits besides its own.
    """

    def __init__(self, *, mesh: str, accept_plain_zre: bool, keys_public: str | None,
                 allowed: frozenset[str], loopback_only: bool, stats: Stats) -> None:
        self.mesh = mesh
        self.accept_plain_zre = accept_plain_zre
        self.secure = keys_public is not None
        self.allowed = allowed | ({keys_public} if keys_public else set())
        self.loopback_only = loopback_only
        self.stats = stats
        self._foreign: dict[bytes, float] = {}
        self._greetings: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def key_allowed(self, key: str | None) -> bool:
        """Whether a peer with this public key may be greeted (always True for a plain node)."""
        if not self.secure:
            return key is None
        return key is not None and key in self.allowed

    def endpoint_ok(self, endpoint: str) -> str | None:
        """The IP address of a usable ``tcp://ip:port`` endpoint, or None (counted as rejected)."""
        parsed = parse_endpoint(endpoint)
        if parsed is None or (self.loopback_only and not parsed[0].startswith("127.")):
            self.stats.reject("bad_endpoint")
            return None
        return parsed[0]

    def may_greet(self, address: str) -> bool:
        """Whether a stranger announced at ``address`` may be greeted now (a token bucket per
        address: `GREETING_BURST`, refilled at `GREETINGS_PER_S`). A refusal is counted as
        ``greeting_rate``: a flood of beacons under fresh UUIDs then costs a lookup each,
        not a link, and one address cannot crowd out the others."""
        now = time.monotonic()
        tokens, then = self._greetings.get(address, (GREETING_BURST, now))
        tokens = min(GREETING_BURST, tokens + (now - then) * GREETINGS_PER_S)
        if tokens < 1.0:
            self.stats.reject("greeting_rate")
            return False
        if address not in self._greetings and len(self._greetings) >= _MAX_ADDRESSES:
            full_by = now - GREETING_BURST / GREETINGS_PER_S  # buckets refilled since: forget them
            self._greetings = {a: b for a, b in self._greetings.items() if b[1] > full_by}
            if len(self._greetings) >= _MAX_ADDRESSES:
                self._greetings.clear()
        self._greetings[address] = (tokens - 1.0, now)
        return True

    def mesh_of(self, headers: dict[str, str]) -> tuple[bool, bool]:
        """``(welcome, is_zmqmesh)`` for a HELLO's headers: another mesh, or a plain ZRE
        node when those are not accepted, is not welcome."""
        mesh = headers.get(HEADER["mesh"])
        if mesh is None:
            return self.accept_plain_zre, False
        return mesh == self.mesh, True

    def is_foreign(self, uuid: bytes) -> bool:
        """True while ``uuid`` is remembered as a node of another mesh."""
        expiry = self._foreign.get(uuid)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._foreign[uuid]
            return False
        return True

    def remember_foreign(self, uuid: bytes) -> None:
        """Ignore ``uuid`` for a while (bounded memory)."""
        now = time.monotonic()
        if len(self._foreign) >= _MAX_FOREIGN:
            self._foreign = {u: t for u, t in self._foreign.items() if t > now}
            while len(self._foreign) >= _MAX_FOREIGN:  # (all still remembered: the oldest goes)
                del self._foreign[next(iter(self._foreign))]
        self._foreign.pop(uuid, None)  # (remembered anew: it goes to the end, the newest)
        self._foreign[uuid] = now + _FOREIGN_MEMORY_S
        self.stats.membership["foreign_ignored"] += 1

    def foreign_count(self) -> int:
        """How many other-mesh nodes are remembered now."""
        return len(self._foreign)

    @staticmethod
    def ghosts(newcomer: PeerState, peers: Iterable[PeerState], quiet_s: float) -> list[PeerState]:
        """Ready peers that ``newcomer`` replaces: a restarted node at the same endpoint, or
        with the same name on the same host whose link dropped. A peer still heard from
        (within ``quiet_s``) over a link still up is never replaced on a newcomer's word:
        anyone can claim an endpoint in a HELLO.

        Only a peer at ``newcomer``'s endpoint or whose link dropped can be one: they are
        picked out first, in one pass that reads two fields of each (every join walks
        every peer, and the newcomer walks its whole mesh once per peer it meets)."""
        endpoint = newcomer.endpoint
        candidates = [old for old in peers if old.endpoint == endpoint or old.disconnected_at is not None]
        host = newcomer.headers.get(HEADER["host"])
        now = time.time()
        found = []
        for old in candidates:
            if old is newcomer or not old.ready:
                continue
            alive = old.disconnected_at is None and now - old.last_seen <= quiet_s
            same_endpoint = old.endpoint == newcomer.endpoint and not alive
            same_node_down = (
                old.disconnected_at is not None  # its link was up and dropped: not a slow start
                and old.name == newcomer.name
                and host is not None
                and old.headers.get(HEADER["host"]) == host
                and old.address == newcomer.address
            )
            if same_endpoint or same_node_down:
                found.append(old)
        return found
