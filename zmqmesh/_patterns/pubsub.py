"""pub/sub: the publishing side (one XPUB, batching, sequence numbers, subscription counts)
and the receiving side's count of messages lost at a high-water mark.

The XPUB is connected to the SUB of every zmqmesh peer that subscribes to something (see
`Publisher.sync_connections`), so a publication reaches each subscriber once, in order
per publisher. This node's own subscriptions get its publications directly (``local``),
never through a socket: none is lost while a subscription would still be on its way.
Frames of kept topics (``history=``) are numbered by the history and committed to it
before they are sent; the first frame of a topic numbered afresh past the history's
floor says where its numbering begins if it has a meta frame (`start_meta`), and every
frame with a meta frame says its history position (``"p"``). A replay marker subscribed
(`MARKER_PREFIX`) is answered at once with the position the history gives next
(`Publisher.answer_marker`), never counted as a subscription.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable
from itertools import accumulate
from time import monotonic
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from .._io.reactor import EventLoop
from .._io.sockets import PeerConnections, close_watched, has_input, send_frames
from .._mesh.directory import Directory
from .._stats import Stats
from .._wire.frames import (
    BATCH_BYTES,
    LARGE_FRAME,
    MARKER_PREFIX,
    MAX_BATCH_ITEMS,
    MAX_NAME_BYTES,
    Headed,
    pub_sender,
    wire_size,
)
from ..errors import MeshTimeoutError

if TYPE_CHECKING:
    from .history import History

__all__ = ["Publisher", "GapCounter", "meta_frame", "start_meta", "fit_within"]

log = logging.getLogger("zmqmesh.pubsub")

_MAX_TRACKED_TOPICS = 65_536
_MAX_TRACKED_STREAMS = 65_536
MAX_PUBLISHERS_GONE = 1_024
"""Publishers not present whose numbers a `GapCounter` keeps: past them, as a new publisher
comes, those met first are forgotten (kept until `_MAX_TRACKED_STREAMS` filled, those of
every short-lived publisher stayed: 3,000 publishers gone, 11,000 topics' numbers)."""
_MAX_GAP = 1 << 32  # a larger jump is a restarted or lying sequence, not a count of drops
_XPUB_BURST = 1024


def meta_frame(bodies: list[Headed], first: int | None = None, position: int | None = None) -> bytes:
    """The fourth frame of a batch of messages with headers: the msgpack map ``{"h":
    [headers map per message], "t": the first one's send time}`` (and ``"n": first``, the
    number of the batch's first message, on pipelines; ``"p": position``, the batch's
    position in its publisher's history, on a kept topic)."""
    timestamp = bodies[0].timestamp
    parts = [b.headers for b in bodies]
    count = len(parts)
    array = bytes([0x90 | count]) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
    entries: bytes = b"\xa1h" + array + b"".join(parts) + b"\xa1t" + msgpack.packb(timestamp)
    if first is None and position is None:
        return b"\x82" + entries
    field: bytes = b"\xa1n" + msgpack.packb(first) if position is None else b"\xa1p" + msgpack.packb(position)
    return b"\x83" + entries + field


def start_meta(meta: bytes, start: int) -> bytes:
    """The meta frame ``meta`` of a batch on a kept topic numbered afresh from ``start``
    (the history's floor, above 0), with ``"s": start``: a replaying subscriber new to the
    topic then expects it from there instead of reading a page of the history to learn it
    (a node before this field ignores it). Only a batch that has a meta frame (headers)
    says it: without headers the frames stay the three of protocol 1."""
    fields = msgpack.unpackb(meta)
    fields["s"] = start
    packed: bytes = msgpack.packb(fields)
    return packed


def fit_within(items: list[Any], weigh: Callable[[Any], int], room: int) -> tuple[list[Any], int]:
    """The first of ``items`` that fit in ``room`` bytes, as ``weigh`` weighs each (one
    at least: a message larger than the bound still goes), and their bytes."""
    size = sum(map(weigh, items))
    if size > room and len(items) > 1:
        running = list(accumulate(map(weigh, items)))
        taken = max(1, bisect_right(running, room))
        return items[:taken], running[taken - 1]
    return items, size


def _entry_size(entry: tuple[bytes, Any]) -> int:
    return wire_size(entry[1])


class Publisher:
    """Sends what callers queued on ``queue`` as batches, and counts the XPUB's subscriptions.

    ``on_subscriptions`` is called (on the loop) when a subscription came or went.
    Every method but `full` and `take` (and the callers' appends to `queue`) runs on the loop.

    The queue holds ``queue_max`` messages at most, and ``max_bytes`` (payloads and
    headers) as `held_bytes` counts them, as a `Pusher`'s send queues do: callers add
    what they append, and the loop sets it to 0 once the queue is empty, or counts it
    exactly after a flush once it reached ``max_bytes`` (the XPUB never blocks, so the
    queue is long only while the callers outpace the loop). A caller weighs its message
    first, then adds it (``held_bytes += size``, no call between the read and the write):
    a call there let another thread's addition be lost, and the queue grow past its bound.
    A ``publish_many`` measures the room, takes it and counts it in one step (`take`), so
    that callers together go past ``max_bytes`` by a message each at most.
    """

    def __init__(self, *, loop: EventLoop, stats: Stats, uuid: bytes, xpub: zmq.Socket[Any],
                 directory: Directory, connect: Callable[[zmq.Socket[Any], str, str | None], None],
                 on_subscriptions: Callable[[], None], local: Callable[[list[bytes], int], None],
                 own_prefixes: Callable[[], Any], queue_max: int, max_bytes: int,
                 history: History | None = None) -> None:
        self.loop = loop
        self.stats = stats
        self._sent_names = stats.names("pubsub", "sent")  # (written on the loop only)
        self.uuid = uuid
        self.xpub = xpub
        self.directory = directory
        self.connect = connect
        self.on_subscriptions = on_subscriptions
        self.local = local
        self.own_prefixes = own_prefixes
        self.history = history
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.queue_max = queue_max
        self.held_bytes = 0
        """The bytes `queue` holds, headers included, at least (callers add, the loop counts again: `count_held`)."""
        self.max_bytes = max_bytes
        self._counted: tuple[int, int] | None = None  # (the queue's length, `held_bytes`) when last counted exactly
        self._taking = threading.Lock()  # (`take`: two that measured the room at once each took all of it)
        self._sequences: dict[bytes, int] = {}
        self._fresh_from = 0  # where a topic not in `_sequences` is numbered from
        self._sub_counts: Counter[bytes] = Counter()
        self._subscribers = PeerConnections(xpub, connect)  # (the SUB endpoints it is connected to)
        self._routes: dict[bytes, tuple[bool, bool]] = {}  # topic -> (subscribed here, subscribed elsewhere)
        self._routes_key: Any = None

    def start(self) -> None:
        """Watch the XPUB for subscriptions."""
        self.loop.add_reader(self.xpub.FD, self.on_xpub)
        self.loop.call_soon(self.on_xpub)  # descriptors are edge-triggered: look once now

    @property
    def closed(self) -> bool:
        """True once the XPUB is closed."""
        return self.xpub.closed

    def subscription_count(self) -> int:
        """How many distinct prefixes subscribers hold at this publisher."""
        return len(self._sub_counts)

    def full(self) -> bool:
        """Whether a publication must wait for room: the queue holds ``queue_max``
        messages, or ``max_bytes`` (any thread)."""
        return len(self.queue) >= self.queue_max or self.held_bytes >= self.max_bytes

    def refusal(self) -> MeshTimeoutError:
        """The error for a publication that found no room in time, naming the bound it met."""
        if self.held_bytes >= self.max_bytes:
            held = f"{self.held_bytes} bytes (send_queue_max_bytes={self.max_bytes})"
        else:
            held = f"{len(self.queue)} messages (send_queue_max={self.queue_max})"
        return MeshTimeoutError(f"publish queue full: it holds {held}; the node cannot send them as fast as they "
                                "are published")

    def take(self, entries: list[tuple[bytes, Any]]) -> int:
        """Queue the first of ``entries`` (``(topic, body)``) that fit in the room
        ``max_bytes`` leaves (one at least), counted; how many it took (callers' threads,
        one at a time)."""
        with self._taking:
            chunk, size = fit_within(entries, _entry_size, self.max_bytes - self.held_bytes)
            self.queue.extend(chunk)
            self.held_bytes += size
        return len(chunk)

    def count_held(self) -> None:
        """Set `held_bytes` right (loop only, after a flush): 0 once the queue is empty;
        counted once it reached ``max_bytes``, unless nothing was added or sent since it
        was last counted."""
        q = self.queue
        if not q:
            self.held_bytes = 0
            self._counted = None
        elif self.held_bytes >= self.max_bytes and (len(q), self.held_bytes) != self._counted:
            items = list(q)  # (one copy: a caller's append meanwhile makes the next look count again)
            counted = sum(wire_size(body) for _, body in items)
            self.held_bytes = counted
            self._counted = (len(items), counted)

    def sync_connections(self, changed: Iterable[str] | None = None) -> None:
        """Connect to the SUB endpoint of every zmqmesh peer that subscribes to a topic,
        and stay connected while it is present (its subscriptions may change: a peer
        that swaps them loses nothing between its LEAVE and its JOIN). A peer that
        subscribes to nothing gets no connection, and costs none of its sockets and
        handshakes: two of the four a pair of nodes made at every join. A peer a JOIN of
        which was refused here (a group budget: `Directory.unannounced`) may subscribe
        unannounced: it is connected too, so that its subscriptions reach the XPUB as before.

        Looks at the peers ``changed`` (ids: come, changed or gone since the last call,
        `Directory.touched`) and those it could not connect to before, not at every
        subscriber (it runs at every join: 80-100 us at 127 subscribing peers); at every
        peer it may connect to if None."""
        directory = self.directory
        reached = self._subscribers.reached
        unreached = self._subscribers.unreached
        if changed is None:
            look = set().union(directory.subscribers, directory.unannounced, reached, unreached)
        else:
            look = unreached.union(changed)
        self._subscribers.update_from(directory.in_joined_order(look), self._target)

    def _target(self, node_id: str) -> tuple[str, str | None] | None:
        """The SUB endpoint (and CURVE key) of the peer ``node_id`` if this node's XPUB is to
        be connected to it (see `sync_connections`), else None."""
        directory = self.directory
        if node_id not in directory.subscribers and node_id not in directory.unannounced and \
                node_id not in self._subscribers.reached:
            return None
        peer = directory.peer_state(node_id)
        if peer is None or not peer.is_zmqmesh:
            return None
        endpoint = directory.peer_endpoints(peer).get("sub")
        return (endpoint, peer.key) if endpoint is not None else None

    def flush(self, until: float) -> None:
        """Send what is queued, until the monotonic clock reads ``until`` (a frame at least;
        the caller flushes again while more is queued): consecutive messages of one topic
        share a frame. With a history, the frames of kept topics are committed to it first,
        all in one transaction, and every frame is sent after that commit, in order."""
        q = self.queue
        history = self.history
        built: list[tuple[list[bytes], int, int, bool, bool, bool]] = []
        sent = unrouted = 0
        while q and (not built or monotonic() < until):  # (what is left goes at the loop's next turn)
            topic, body = q.popleft()
            bodies = [body]
            size = wire_size(body)
            # consecutive messages of the topic, those with headers apart (the meta frame is theirs)
            headed = type(body) is Headed
            while q and q[0][0] == topic and len(bodies) < MAX_BATCH_ITEMS:
                more = q[0][1]
                grown = size + wire_size(more)
                if grown > BATCH_BYTES or (type(more) is Headed) is not headed:
                    break
                q.popleft()
                bodies.append(more)
                size = grown
            payload = body if len(bodies) == 1 else b"".join(bodies)
            here, elsewhere = self._route(topic)
            keeps = history is not None and history.policy(topic) is not None
            # (a kept frame's meta frame says where the frame is kept: a replaying subscriber
            # then knows where its live stream began, `Cursor.hold`)
            place = history.upcoming if keeps else None  # type: ignore[union-attr]
            meta = meta_frame(bodies, None, place) if headed else None  # type: ignore[arg-type]
            if keeps:
                seq = history.number(topic, len(bodies))  # type: ignore[union-attr]
                history.record(topic, seq, len(bodies), payload, meta)  # type: ignore[union-attr]
                if history.began:  # type: ignore[union-attr]
                    history.began = False  # type: ignore[union-attr]
                    if meta is not None:  # (live only: a page says it with "start")
                        meta = start_meta(meta, seq)
            else:
                seq = self._sequences.get(topic)
                if seq is None:
                    if len(self._sequences) >= _MAX_TRACKED_TOPICS:
                        # forgotten, the topics are numbered afresh past a jump no subscriber counts
                        # as lost (a new baseline), never below a number given: a lower one is late
                        self._fresh_from = max(self._sequences.values()) + _MAX_GAP + 1
                        self._sequences.clear()
                    seq = self._fresh_from
                self._sequences[topic] = seq + len(bodies)
            frames = [topic, pub_sender(self.uuid, seq), payload]
            if meta is not None:
                frames.append(meta)
            built.append((frames, size, len(bodies), here, elsewhere, keeps))
        # every frame goes after the history's commit (if any): the order holds
        stored = history.commit() if built and history is not None else True
        for frames, size, count, here, elsewhere, keeps in built:
            if keeps and not stored:
                continue  # counted by the history: never seen live what it lacks
            sent += self._send(frames, size, count, here, elsewhere)
            if not (here or elsewhere):
                unrouted += count
        self.stats.pattern["pubsub"]["sent"] += sent
        if unrouted:
            self.stats.add("pubsub", "unrouted", unrouted)
        if has_input(self.xpub):
            self.loop.call_soon(self.on_xpub)

    def _send(self, frames: list[bytes], size: int, count: int, here: bool, elsewhere: bool) -> int:
        """Deliver a frame to this node's subscriptions and the others' (the XPUB filters:
        a subscription it holds but this node has not counted yet still gets it); how many
        of its ``count`` messages went to someone as far as this node knows."""
        if here:
            self.local(frames, count)
        try:
            send_frames(self.xpub, frames, copy=size < LARGE_FRAME)
        except zmq.ZMQError:
            if elsewhere:
                self.stats.add("pubsub", "dropped", count)  # the inbox counts drops too
            sent = count if here else 0
        else:
            sent = count if here or elsewhere else 0
        if sent:
            self._sent_names.add(frames[0], sent)
        return sent

    def _route(self, topic: bytes) -> tuple[bool, bool]:
        """Whether a subscription here, and one elsewhere, match ``topic`` (cached until the
        subscriptions change)."""
        own = self.own_prefixes()
        if self._routes_key is not own:
            self._routes, self._routes_key = {}, own
        found = self._routes.get(topic)
        if found is None:
            name = topic.decode("utf-8", "replace")
            found = (any(name.startswith(p) for p in own), any(topic.startswith(p) for p in self._sub_counts))
            if len(self._routes) >= _MAX_TRACKED_TOPICS:
                self._routes.clear()
            self._routes[topic] = found
        return found

    def on_xpub(self) -> None:
        """Count the subscription events waiting on the XPUB."""
        xpub = self.xpub
        if xpub.closed:
            return
        changed = False
        counts = self._sub_counts
        for _ in range(_XPUB_BURST):
            try:
                event = xpub.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            if not event:
                continue
            prefix = event[1:]
            if len(prefix) > MAX_NAME_BYTES:
                continue  # longer than any topic: it can match nothing we publish
            if prefix.startswith(MARKER_PREFIX):
                if event[0] == 1:
                    self.answer_marker(prefix)
                continue
            if event[0] == 1:
                counts[prefix] += 1
            elif event[0] == 0:
                counts[prefix] -= 1
                if counts[prefix] <= 0:
                    del counts[prefix]
            changed = True
        else:  # a whole burst read: more may wait, and the descriptor will not say so again
            self.loop.call_soon(self.on_xpub)
        if changed:
            self._routes = {}
            self.on_subscriptions()

    def answer_marker(self, marker: bytes) -> None:
        """Answer a replay marker a subscriber just subscribed (`MARKER_PREFIX`), with one
        frame on exactly that topic, its sender frame numbered with the position the
        history gives the next frame it keeps (`History.upcoming`), its body empty (no
        message: a reader before markers that subscribes to every topic drops it as
        malformed, never hands it to a handler). The XPUB applied the subscriptions the
        subscriber sent before the marker already, and every frame kept before that
        position was sent already (positions are given in `flush`, which sends what it
        built before it returns): that subscriber has had, before this frame, every frame
        it subscribes to that was sent since its subscription came, and gets every one kept
        from there after it. Nothing without a history (nothing to replay). Kept nowhere: a
        subscriber that subscribes many markers gets as many frames, one per subscription
        event the XPUB passes on (at most `_XPUB_BURST` events a turn of the loop; ZeroMQ
        queues the events themselves as it does every subscription's). An answer the XPUB
        drops (the subscriber's pipe at its ``pub_hwm``) is not known here: the subscriber
        reads without it after its wait, and counts that (`pubsub.replay_unmarked`)."""
        history = self.history
        if history is None:
            return
        try:
            send_frames(self.xpub, [marker, pub_sender(self.uuid, history.upcoming), b""])
        except zmq.ZMQError as exc:  # (the subscriber catches up without it, as from a publisher before markers)
            log.debug("cannot answer a replay marker: %s", exc)

    def subscribers_ready(self, topic: str, n: int) -> bool:
        """True once ``n`` subscribers matching ``topic`` have their subscription at the XPUB.

        Counts the XPUB's subscription events (so subscribers from outside the mesh count
        too), and this node if it subscribes; a member subscribed with several matching
        prefixes is counted once.
        """
        topic_b = topic.encode()
        total = sum(c for p, c in self._sub_counts.items() if topic_b.startswith(p))
        per_node: Counter[str] = Counter()
        for prefix, ids in self.directory.offers["topics"].items():
            if topic.startswith(prefix):
                per_node.update(i for i in ids if i != self.directory.node_id)
        overcount = sum(k - 1 for k in per_node.values())
        here = any(topic.startswith(p) for p in self.own_prefixes())  # delivered directly, never missed
        return total - overcount + here >= n

    def subscriptions_in_place(self, node_id: str) -> bool:
        """Whether every subscription the member ``node_id`` announced has reached this
        node's XPUB (counted per prefix: as many subscriptions as members announce it)."""
        own = self.directory.node_id
        for prefix, ids in self.directory.offers["topics"].items():
            if node_id in ids:
                members = sum(1 for i in ids if i != own)
                if self._sub_counts.get(prefix.encode(), 0) < members:
                    return False
        return True

    def close(self, linger_ms: int) -> None:
        """Stop watching the XPUB and close it."""
        close_watched(self.loop, self.xpub, linger_ms)


class GapCounter:
    """Counts, per publisher and topic, the messages a subscriber never received.

    Publishers number the messages of each topic; a jump in the numbers is a loss at a
    high-water mark. Bounded: of the publishers that left, it keeps the numbers of at most
    `MAX_PUBLISHERS_GONE` (one that leaves and comes back is still counted, while they are
    kept), those met first forgotten as a new publisher comes; past `_MAX_TRACKED_STREAMS`
    topics in all, a new one first makes room by forgetting the publishers that left, then
    takes the place of the oldest topic of the publisher met first (that topic's next frame
    starts counting afresh: one jump there goes uncounted). A frame numbered below one
    counted already is late: dropped (`missed`), also once its publisher left, while its
    numbers are kept.
    """

    def __init__(self, directory: Directory) -> None:
        self._directory = directory
        self._expected: dict[bytes, dict[bytes, int]] = {}  # publisher uuid -> topic -> the number next
        self._tracked = 0
        self._swept = -1  # the membership (its epoch) when the publishers that left were last forgotten
        self._gone_counted = -1  # the membership (its epoch) when the publishers gone were last counted

    def __len__(self) -> int:
        return self._tracked

    def missed(self, uuid: bytes, topic: bytes, sequence: int, count: int, member: bool = True) -> int | None:
        """How many messages before these ``count`` (numbered from ``sequence``) were lost;
        None if they are late: numbered below a frame counted already, they come from a
        connection to the publisher made again (the subscriber was taken for gone, frozen
        past ``peer_timeout_s``) while the one before still delivers what it held. The
        jump past them counted them as lost already: the caller drops them, so that the
        messages of a publisher stay in order and the drops counted are those missing.
        (Taken as a new start, each turn between the two connections counted the whole
        jump again: 88 million drops for 85,000 messages.) A numbering that restarts
        begins at 0 (a publisher of a version before) or past a jump over `_MAX_GAP`: a new start.

        A sender that is not a ``member`` (any more) is counted against the numbers kept of
        it, but gets no new ones (0: a stranger could claim any number of ids): the old
        connection of a publisher that left still delivers what it held, and those frames
        are late all the same. (Passed as a stranger's, they were handled out of order once
        its goodbye came, and counted lost at the jump as well.)"""
        topics = self._expected.get(uuid)
        if topics is None:
            if not member:
                return 0
            self._forget_gone(uuid)
            topics = self._expected[uuid] = {}
        expected = topics.get(topic)
        lost = 0
        if expected is None:
            if not member:
                return 0
            if self._tracked >= _MAX_TRACKED_STREAMS:
                self._make_room(uuid)
                topics = self._expected.setdefault(uuid, topics)  # (evicting may have emptied it)
            self._tracked += 1
        elif expected < sequence <= expected + _MAX_GAP:
            lost = sequence - expected
        elif 0 < sequence < expected <= sequence + _MAX_GAP:
            return None
        topics[topic] = sequence + count
        return lost

    def forget_topics(self, added: Iterable[bytes], kept: Iterable[bytes]) -> None:
        """Start counting afresh the topics under the prefixes just subscribed (``added``)
        that no prefix subscribed all along (``kept``) covers: what their publishers sent
        while this node did not subscribe never came, and was never meant to (the
        publisher counts it as unrouted). Counted as lost at a high-water mark, each
        unsubscribe and subscribe again made a false drop and a warning."""
        added, kept = tuple(added), tuple(kept)
        for uuid, topics in list(self._expected.items()):
            for topic in [t for t in topics if t.startswith(added) and not t.startswith(kept)]:
                del topics[topic]
                self._tracked -= 1
            if not topics:
                del self._expected[uuid]

    def _gone(self, sender: bytes) -> list[bytes]:
        """The publishers whose numbers are kept and that are no peer now, met first first;
        never ``sender``, whose frame is at hand (it may have left since it was found present)."""
        alive = self._directory.alive_ids
        return [uuid for uuid in self._expected if uuid != sender and uuid.hex() not in alive]

    def _forget(self, publishers: list[bytes]) -> None:
        for uuid in publishers:
            self._tracked -= len(self._expected.pop(uuid))

    def _forget_gone(self, sender: bytes) -> None:
        """Past `MAX_PUBLISHERS_GONE` publishers gone, forget those met first (a walk per
        change of membership, as a new publisher comes: not per frame)."""
        epoch = self._directory.epoch
        if epoch == self._gone_counted:
            return
        self._gone_counted = epoch
        gone = self._gone(sender)
        self._forget(gone[:max(0, len(gone) - MAX_PUBLISHERS_GONE)])

    def _make_room(self, sender: bytes) -> None:
        directory = self._directory
        if directory.epoch != self._swept:  # (a walk per change of membership, not per new topic)
            self._swept = directory.epoch
            self._forget(self._gone(sender))
        if self._tracked >= _MAX_TRACKED_STREAMS:
            uuid, topics = next(iter(self._expected.items()))
            del topics[next(iter(topics))]
            self._tracked -= 1
            if not topics:
                del self._expected[uuid]
