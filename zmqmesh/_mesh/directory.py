"""Who offers what: the mesh's offer tables, peer snapshots, and the choice of a provider.

Updated on the event loop after every membership or registry change, with what changed;
read from any thread. The offer tables are replaced whole, never changed in place; the caches of
snapshots, endpoints and providers are filled by whichever thread asks first (single
dict assignments) and pruned by the loop without iterating them in Python.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import NamedTuple, TypeVar

from .._membership.peer import PeerState
from .._stats import LogThrottle, Stats
from .._wire.frames import (
    ENDPOINT_KEYS,
    HEADER,
    OFFER_KINDS,
    OFFER_PREFIXES,
    PROTOCOL,
    parse_endpoint,
)
from ..errors import NoProviderError
from ..message import Peer
from .turns import Turns

__all__ = ["Directory", "Provider", "no_provider", "offers_of"]

log = logging.getLogger("zmqmesh.mesh")

_SKIP_S = 2.0
"""How long a node that refused a service (or a queue's batch) is passed over."""
_MAX_SKIPS = 1024
_NO_OFFERS: dict[str, frozenset[str]] = {}


class Provider(NamedTuple):
    """A node offering something, the endpoint to reach that offer, and its CURVE key."""

    id: str
    endpoint: str
    key: str | None = None
    protocol: int = 1  # the wire protocol it announced (see `Directory.protocol_of`)


def no_provider(service: str, only: str | None) -> NoProviderError:
    """The error for a service nobody (or not the node ``only``) offers."""
    if only:
        return NoProviderError(f"node {only[:8]} does not offer the service {service!r} (or is not known)")
    return NoProviderError(f"no node offers the service {service!r}")


_NO_IDS: frozenset[str] = frozenset()
_MAX_RUNS = 64
_HEX = frozenset("0123456789abcdef")


def _runs_of(header: str | None) -> tuple[str, ...]:
    """The runs a peer's store names (``X-ZMQMESH-RUNS``: tokens of 1 to 32 lowercase hex
    digits, comma-separated, newest first); none for a header missing (a node before it)
    or malformed (a stranger's: then its numbering is taken on trust, as before)."""
    if not header or len(header) > _MAX_RUNS * 33:
        return ()
    runs = tuple(header.split(","))
    if len(runs) > _MAX_RUNS or not all(0 < len(r) <= 32 and _HEX.issuperset(r) for r in runs):
        return ()
    return runs


def small_number(text: str, digits: int) -> int | None:
    """``text`` as a whole number of at most ``digits`` ASCII digits, else None. (A peer's
    word: ``str.isdigit`` also takes digits such as "²", which ``int`` refuses, and ``int``
    of thousands of digits is slow or refused.)"""
    return int(text) if len(text) <= digits and text.isascii() and text.isdigit() else None


def offers_of(groups: Iterable[str], kind: str) -> frozenset[str]:
    """The names of ``kind`` that a member of ``groups`` offers (pulling a queue at least
    once is pulling it: ``queues`` counts the at-least-once ones too)."""
    prefix = OFFER_PREFIXES[kind]
    found = frozenset(g[len(prefix):] for g in groups if g.startswith(prefix))
    return found | offers_of(groups, "ackqueues") if kind == "queues" else found


class _Entry(NamedTuple):
    """What the tables hold of one ready peer (`Directory._entry`); None: nothing of it."""

    peer: PeerState
    limit: int | None  # its max_message_bytes, if below this node's (`Directory.narrower`)
    refused: bool  # a JOIN of it was refused (`Directory.unannounced`)
    offers: dict[str, frozenset[str]] | None  # a zmqmesh peer's offers, by kind
    stream: tuple[str, tuple[str, ...]] | None  # its history: (stream id, kept prefixes)
    runs: tuple[str, ...] | None  # the runs of its store (`_runs_of`)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _edited(current: dict[_K, _V], changes: dict[_K, _V | None]) -> dict[_K, _V]:
    """``current`` with ``changes`` made (None: the key removed): a copy if any changes
    it, else ``current`` itself (readers on other threads keep a whole one)."""
    edited = current
    for key, value in changes.items():
        if (key not in current) if value is None else (current.get(key) == value):
            continue
        if edited is current:
            edited = dict(current)
        if value is None:
            del edited[key]
        else:
            edited[key] = value
    return edited


def _edited_set(current: frozenset[_K], changes: dict[_K, bool]) -> frozenset[_K]:
    """``current`` with the keys of ``changes`` in it or not, as their values say."""
    added = {key for key, within in changes.items() if within and key not in current}
    removed = {key for key, within in changes.items() if not within and key in current}
    return (current | added) - removed if added or removed else current


class Directory:
    """The offer tables of the mesh as this node sees it, and provider choice.

    ``self_peer`` describes this node; ``own_endpoints`` are its in-process pattern
    endpoints (this node reaches its own offers through them). With ``loopback_only``,
    a peer's pattern endpoint off loopback is refused (counted in ``stats``).
    """

    def __init__(self, node_id: str, stats: Stats, self_peer: Callable[[], Peer], loopback_only: bool,
                 max_message_bytes: int | None = None) -> None:
        self.node_id = node_id
        self.max_message_bytes = max_message_bytes  # this node's: what it may send at most
        self._own_limit = None if max_message_bytes is None else str(max_message_bytes)  # (as peers announce it)
        self.stats = stats
        self.self_peer = self_peer
        self._unread_log = LogThrottle(10.0)  # (`update`: peers whose entry could not be worked out)
        self.loopback_only = loopback_only
        self.own_endpoints: dict[str, str] = {}
        self.offers: dict[str, dict[str, tuple[str, ...]]] = {k: {} for k in OFFER_KINDS}
        """Kind -> name -> the ids of the nodes that offer it (this node first); a name is
        listed only while some node offers it (``name in offers[kind]`` says whether one does)."""
        self.alive_ids: frozenset[str] = frozenset({node_id})
        self.epoch = 0
        self._peers: dict[str, PeerState] = {}
        self._endpoints: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        self._snapshots: dict[str, tuple[float, int, Peer]] = {}
        self._parsed: dict[str, tuple[PeerState, int, dict[str, frozenset[str]]]] = {}  # (loop only)
        self._turns = Turns()  # (whose turn it is among a service's providers: `pick_provider`)
        self._skip: dict[tuple[str, str], float] = {}
        self._skip_until = 0.0  # when the last skip ends: the table is cleared then, at the next pick
        self._ack_timeouts: dict[tuple[str, str], float] = {}
        self.streams: dict[str, tuple[str, tuple[str, ...]]] = {}  # peer id -> (stream id, kept prefixes)
        self.runs: dict[str, tuple[str, ...]] = {}  # peer id -> the runs of its store, newest first (`_runs_of`)
        self._pick: tuple[dict[str, tuple[str, ...]], dict[str, Provider | None]] = ({}, {})
        self._contributions: dict[str, dict[str, frozenset[str]]] = {}  # node id -> its offers in the tables
        self.touched: frozenset[str] = frozenset()
        """The ids of the peers the last `update` was told of (come, changed or gone)."""
        self.subscribers: frozenset[str] = frozenset()
        """The peers (this node not among them) that subscribe to some topic."""
        self.narrower: dict[str, int] = {}
        """The peers that announced a ``max_message_bytes`` below this node's, with it: a
        payload past it they refuse, and the frame that carries it ends its connection. A
        peer that announced none (a node before ``X-ZMQMESH-MAX-MESSAGE-BYTES``) is not in
        it, and is sent to as before. Empty in the common case: every node takes what this
        one sends."""
        self.unannounced: frozenset[str] = frozenset()
        """The ready peers a JOIN of which was refused here (a group budget): their groups,
        as known here, may lack some of their offers (`PeerState.groups_refused`)."""

    # -- rebuilding (loop only) ------------------------------------------------------------

    def rebuild(self, own_offers: dict[str, frozenset[str]], ready: Iterable[PeerState]) -> None:
        """Bring every table up to date with this node's offers and the ready peers, all of
        them (those not among them are gone): every peer is looked at again. The engine,
        which knows which peers changed, calls `update` instead."""
        ready = list(ready)
        present = {peer.id for peer in ready}
        self.update(own_offers, ready, [node_id for node_id in self._peers if node_id not in present])

    def update(self, own_offers: dict[str, frozenset[str]], changed: Iterable[PeerState] = (),
               gone: Iterable[str] = ()) -> list[PeerState]:
        """Bring every table up to date with this node's offers, the ready peers ``changed``
        (come, greeted again, or their groups changed) and the ids of those ``gone``.
        Returns the peers of ``changed`` whose entry could not be worked out (a bug: nothing
        a peer sends is known to make `_entry` raise; logged, at most every 10 s): the
        tables hold them as they were, and the caller tells of them again with its next
        change. (One such peer, kept pending by the engine, made every later update raise:
        the node saw no peer come or go after it.)

        Only those are looked at, and only what they changed is applied (each join walked
        every peer: 33 us at 127 peers, 120 us a join in a 48-node mesh running; earlier,
        each join rebuilt every table from every peer's offers, a cost that grew with the
        square of the offers a crowd of peers made: 16 strangers offering 10,000 names each
        held the loop 3 s). A table that changes is copied first: readers on other threads
        keep a whole one.
        """
        entries: dict[str, _Entry | None] = dict.fromkeys(gone)
        unread: list[PeerState] = []
        for peer in changed:
            try:
                entries[peer.id] = self._entry(peer)
            except Exception:  # (it stays as it was; one gone, then back under its id, stays gone)
                unread.append(peer)
                said = self._unread_log.due()
                if said:
                    log.error("cannot work out what the tables hold of peer %s (%d such since the last line): "
                              "left as it was, read again at the next change", peer.id[:8], said, exc_info=True)
        peers = _edited(self._peers, {i: None if e is None else e.peer for i, e in entries.items()})
        before = self._contributions
        contributions = _edited(before, {self.node_id: own_offers,
                                         **{i: None if e is None else e.offers for i, e in entries.items()}})
        # (this node first: a provider choice that can stay here does)
        changed_ids = [i for i in (self.node_id, *entries) if before.get(i) is not contributions.get(i)]
        tables = dict(self.offers)
        for kind in OFFER_KINDS:
            table: dict[str, tuple[str, ...]] | None = None
            for node_id in changed_ids:
                was = before.get(node_id, _NO_OFFERS).get(kind, frozenset())
                now = contributions.get(node_id, _NO_OFFERS).get(kind, frozenset())
                if was == now:
                    continue
                if table is None:
                    table = dict(tables[kind])
                for name in was - now:
                    ids = table[name]
                    at = ids.index(node_id)  # (once in it: a node's offers are a set)
                    ids = ids[:at] + ids[at + 1:]
                    if ids:
                        table[name] = ids
                    else:
                        del table[name]
                own = node_id == self.node_id
                for name in now - was:
                    ids = table.get(name, ())
                    table[name] = (node_id, *ids) if own else (*ids, node_id)
            if table is not None:
                tables[kind] = table
        ack_timeouts = self._ack_timeouts
        if tables["acktimeouts"] is not self.offers["acktimeouts"]:
            ack_timeouts = {}
            # "<milliseconds>/<queue>": peers' checked (`_offers_of_peer`), this node's made so (`Registry.offers`)
            for name, ids in tables["acktimeouts"].items():
                millis, _, queue = name.partition("/")
                ack_timeouts.update(((queue, i), int(millis) / 1000) for i in ids)
        subscribing = {i: bool(contributions.get(i, _NO_OFFERS).get("topics")) for i in changed_ids if i != self.node_id}
        subscribers = _edited_set(self.subscribers, subscribing)
        unannounced = _edited_set(self.unannounced, {i: e is not None and e.refused for i, e in entries.items()})
        narrower = _edited(self.narrower, {i: None if e is None else e.limit for i, e in entries.items()})
        runs = _edited(self.runs, {i: None if e is None else e.runs for i, e in entries.items()})
        streams = _edited(self.streams, {i: None if e is None else e.stream for i, e in entries.items()})
        # (all computed first, then taken on: an update that raised changed nothing, and the
        # engine tells the next one of its peers again)
        came_or_went = peers is not self._peers
        self._contributions = contributions
        self._peers = peers
        self._ack_timeouts = ack_timeouts
        self.subscribers = subscribers
        self.unannounced = unannounced
        self.narrower = narrower
        self.runs = runs  # (the runs before the streams: a reader that finds a stream finds its runs)
        self.streams = streams
        self._pick = (tables["services"], {})  # what a provider choice reads, swapped as one
        self.offers = tables
        self.touched = frozenset(entries)
        if came_or_went:
            self.alive_ids = frozenset(peers) | {self.node_id}
        self.epoch += 1
        if any(entry is None for entry in entries.values()):  # (set operations in C: other threads add keys)
            for left in self._endpoints.keys() - peers.keys():
                self._endpoints.pop(left, None)
            for left in self._snapshots.keys() - peers.keys():
                self._snapshots.pop(left, None)
            for left in self._parsed.keys() - peers.keys():
                del self._parsed[left]
        return unread

    def _entry(self, peer: PeerState) -> _Entry:
        """What the tables hold of a ready peer, read from its headers and groups."""
        announced = peer.headers.get(HEADER["max_message_bytes"])
        limit = None
        if announced is not None and announced != self._own_limit:  # (the same as this node's: no parse, no entry)
            limit = self._narrower_limit(announced)
        offers = stream = runs = None
        if peer.is_zmqmesh:
            offers = self._offers_of_peer(peer)
            kept = offers["history"]
            if kept:
                stream_id = peer.headers.get(HEADER["stream"])
                if stream_id is not None and 0 < len(stream_id) <= 64:
                    stream = (stream_id, tuple(kept))
                    runs = _runs_of(peer.headers.get(HEADER["runs"])) or None
        return _Entry(peer, limit, peer.groups_refused, offers, stream, runs)

    def _narrower_limit(self, announced: str) -> int | None:
        """A peer's ``X-ZMQMESH-MAX-MESSAGE-BYTES``, if it is below this node's own limit
        (else None: it takes whatever this node sends); one that is no number of at most
        12 digits is taken as absent."""
        limit = small_number(announced, 12)
        own = self.max_message_bytes
        return limit if limit is not None and own is not None and limit < own else None

    def refusing(self, size: int) -> frozenset[str]:
        """The peers that announced a ``max_message_bytes`` below ``size``: a payload of
        ``size`` bytes they refuse, and the frame carrying it would end its connection (a
        DEALER's, for good: the requests in flight on it with it). Empty in the common case."""
        narrower = self.narrower
        if not narrower:
            return _NO_IDS
        return frozenset(node_id for node_id, limit in narrower.items() if limit < size)

    def widest_limit(self, ids: Iterable[str]) -> int | None:
        """The largest payload some node of ``ids`` takes, if each of them announced a limit
        below this node's; None if one of them takes whatever this node sends."""
        narrower = self.narrower
        widest = 0
        for node_id in ids:
            limit = narrower.get(node_id)
            if limit is None:
                return None
            widest = max(widest, limit)
        return widest

    def _offers_of_peer(self, peer: PeerState) -> dict[str, frozenset[str]]:
        """What a zmqmesh peer offers, by kind: read from its groups once per change of
        them (`PeerState.version`), not again when the peer is looked at for another reason
        (a JOIN of it refused; a whole `rebuild`)."""
        cached = self._parsed.get(peer.id)
        if cached is not None and cached[0] is peer and cached[1] == peer.version:
            return cached[2]
        by_kind = {kind: offers_of(peer.groups, kind) for kind in OFFER_KINDS}
        timeouts = by_kind["acktimeouts"]  # "<milliseconds>/<queue>", at most a day
        usable = frozenset(t for t in timeouts if small_number(t.partition("/")[0], 8) is not None)
        if len(usable) < len(timeouts):
            self.stats.reject("bad_offer", len(timeouts) - len(usable))
            by_kind["acktimeouts"] = usable
        self._parsed[peer.id] = (peer, peer.version, by_kind)
        return by_kind

    # -- reading ---------------------------------------------------------------------------

    def stream_of(self, node_id: str, topic: str) -> str | None:
        """The stream id of the history in which the peer ``node_id`` keeps ``topic``, if
        it keeps it (this node never replays from itself)."""
        found = self.streams.get(node_id)
        if found is None or not any(topic.startswith(p) for p in found[1]):
            return None
        return found[0]

    def peer_state(self, node_id: str) -> PeerState | None:
        """The ready peer ``node_id`` as of the last rebuild (the loop's own record), or None."""
        return self._peers.get(node_id)

    def in_joined_order(self, ids: AbstractSet[str]) -> list[str]:
        """``ids`` in the order their peers joined: those not in the table first (gone, or
        this node), then the present ones as the table lists them, the newest last (a node
        restarted at its ghost's endpoint comes after the ghost)."""
        if len(ids) < 2:
            return list(ids)
        peers = self._peers
        return [*(i for i in ids if i not in peers), *(i for i in peers if i in ids)]

    def peer_count(self) -> int:
        """How many peers are present."""
        return len(self._peers)

    def mesh_peers(self) -> list[PeerState]:
        """The ready zmqmesh peers (not plain ZRE ones)."""
        return [p for p in list(self._peers.values()) if p.is_zmqmesh]

    def ack_timeout_s(self, queue: str, node_id: str) -> float | None:
        """The ``ack_timeout_s`` the puller ``node_id`` announced for ``queue``, if any."""
        return self._ack_timeouts.get((queue, node_id))

    def protocol_of(self, node_id: str) -> int:
        """The wire protocol the node ``node_id`` speaks (this one: `PROTOCOL`; a peer: the
        one its HELLO announced, 1 if none, or one this node cannot read)."""
        if node_id == self.node_id:
            return PROTOCOL
        peer = self._peers.get(node_id)
        announced = peer.headers.get(HEADER["protocol"], "1") if peer is not None else "1"
        return small_number(announced, 4) or 1

    def speaks(self, node_id: str, protocol: int) -> bool:
        """Whether the node ``node_id`` (this one included) speaks wire protocol ``protocol``
        or later."""
        return self.protocol_of(node_id) >= protocol

    def providers(self, kind: str, name: str) -> tuple[str, ...]:
        """Ids of the nodes (this one included) offering ``name`` of ``kind``."""
        return self.offers[kind].get(name, ())

    def endpoint_of(self, node_id: str, key: str) -> tuple[str, str | None] | None:
        """The endpoint of a node's pattern socket ``key`` (one of `ENDPOINT_KEYS`) and its CURVE key."""
        if node_id == self.node_id:
            return self.own_endpoints[key], None
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        endpoint = self.peer_endpoints(peer).get(key)
        return (endpoint, peer.key) if endpoint is not None else None

    def peer_endpoints(self, peer: PeerState) -> dict[str, str]:
        """The pattern endpoints a peer's HELLO announced, less those this node must not use."""
        cached = self._endpoints.get(peer.id)
        if cached is not None and cached[0] is peer.headers:
            return cached[1]
        checked: dict[str, str] = {}
        for key in ENDPOINT_KEYS:
            value = peer.headers.get(HEADER[key])
            if value is None:
                continue
            parsed = parse_endpoint(value)
            if parsed is None or (self.loopback_only and not parsed[0].startswith("127.")):
                self.stats.reject("bad_endpoint")
                continue
            checked[key] = value
        self._endpoints[peer.id] = (peer.headers, checked)
        return checked

    def lookup_peer(self, node_id: str) -> Peer | None:
        """The `Peer` with this id (this node included), or None."""
        if node_id == self.node_id:
            return self.self_peer()
        peer = self._peers.get(node_id)
        return self.snapshot(peer) if peer is not None else None

    def peers(self) -> list[Peer]:
        """Snapshots of every ready peer."""
        return [self.snapshot(p) for p in list(self._peers.values())]

    def snapshot(self, peer: PeerState) -> Peer:
        """An immutable `Peer` view of ``peer`` (cached until it changes)."""
        cached = self._snapshots.get(peer.id)
        if cached is not None and cached[0] == peer.last_seen and cached[1] == peer.version:
            return cached[2]
        groups = frozenset(peer.groups)
        snap = Peer(
            id=peer.id,
            name=peer.name,
            address=peer.address,
            endpoint=peer.endpoint,
            groups=groups,
            services=offers_of(groups, "services"),
            queues=offers_of(groups, "queues"),
            topics=offers_of(groups, "topics"),
            headers=self._visible_headers(peer),
            last_seen=peer.last_seen,
            is_zmqmesh=peer.is_zmqmesh,
        )
        if peer.id in self._peers:
            self._snapshots[peer.id] = (peer.last_seen, peer.version, snap)
        return snap

    def _visible_headers(self, peer: PeerState) -> dict[str, str]:
        """The peer's headers, less the pattern endpoints this node refused to use."""
        headers = dict(peer.headers)
        usable = self.peer_endpoints(peer)
        for key in ENDPOINT_KEYS:
            if HEADER[key] in headers and key not in usable:
                del headers[HEADER[key]]
        return headers

    # -- choosing a provider ---------------------------------------------------------------

    def pick_provider(self, service: str, only: str | None = None, avoid: frozenset[str] = frozenset()
                      ) -> Provider | None:
        """One provider of ``service`` (``only`` that node, if given; none of ``avoid``),
        round-robin, skipping those that just refused it; None if there is none."""
        services, known = self._pick
        ids = services.get(service, ())
        if only is not None:
            builtin = service.startswith("\x00") and only in self.alive_ids
            ids = (only,) if only in ids or builtin else ()
        if avoid:
            ids = tuple(i for i in ids if i not in avoid)
        if not ids:
            return None
        if len(ids) == 1 and (only_one := known.get(ids[0])) is not None:  # (skipped or not: no other)
            return only_one
        candidates: Sequence[str] = ids
        if self._skip:  # (a look at each provider: only while a skip lasts)
            candidates = self.unskipped(service, ids) or ids
        start = self._turns[service]
        for k in range(len(candidates)):
            index = (start + k) % len(candidates)
            node_id = candidates[index]
            if node_id in known:
                provider = known[node_id]
            else:
                target = self.endpoint_of(node_id, "service")
                provider = known[node_id] = Provider(node_id, *target, self.protocol_of(node_id)) if target is not None else None
            if provider is not None:
                self._turns.chosen(service, index)
                return provider
        return None

    def sole_provider(self, service: str, only: str | None = None) -> Provider | None:
        """The provider `pick_provider` (without ``avoid``) answers for ``service`` every
        time until the tables next change (`epoch`): the one node that offers it (``only``,
        if it does), whatever the round robin and the skips. None when several offer it,
        or none (with a usable endpoint)."""
        ids = self._pick[0].get(service, ())
        if only is not None:
            ids = (only,) if only in ids else ()
        return self.pick_provider(service, only) if len(ids) == 1 else None

    def skip_provider(self, service: str, node_id: str, rest_s: float | None = None) -> float:
        """Avoid ``node_id`` for ``service`` for ``rest_s`` (`_SKIP_S` by default: it said it
        no longer offers it, or could not take a call); returns how long."""
        rest_s = _SKIP_S if rest_s is None else rest_s
        now = time.monotonic()
        if len(self._skip) >= _MAX_SKIPS:  # (bounded: departed nodes' entries would pile up)
            self._skip = {k: t for k, t in self._skip.items() if t > now}
        self._skip[(service, node_id)] = now + rest_s
        self._skip_until = max(self._skip_until, now + rest_s)
        return rest_s

    def unskipped(self, service: str, ids: Sequence[str]) -> Sequence[str]:
        """``ids`` less the nodes that refused ``service`` a moment ago (`skip_provider`)."""
        if not self._skip:
            return ids
        now = time.monotonic()
        if now >= self._skip_until:
            self._skip = {}
            return ids
        return [i for i in ids if self._skip.get((service, i), 0) < now]

    def may_retry(self, service: str, lost_id: str, deadline: float) -> bool:
        """Whether a request to ``service`` lost with provider ``lost_id`` is to be resent.

        The lost provider is gone from the offer tables by now, so this asks whether the
        remaining providers declare the service idempotent (and time is left).
        """
        if not self.offers["idempotent"].get(service) or time.monotonic() >= deadline:
            return False
        log.info("provider %s of idempotent %r left: retrying elsewhere", lost_id[:8], service)
        return True
