"""At-least-once and durable queues: the pusher's side.

A queue whose pullers announce ``at_least_once`` is not sent over PUSH/PULL. The pusher
deals batches to the pullers itself, over a DEALER to each puller's service ROUTER,
keeping every batch until the puller acknowledges it. A puller acknowledges a batch once
its handler has returned for every message of it. When a puller leaves (crash,
shutdown, silence), or does not acknowledge within its announced ``ack_timeout_s``, what
it had not acknowledged goes back to the front of the queue, marked as redelivered, and
is dealt to the remaining pullers. So every message is handled at least once, and at
most ``ack_window`` messages per lost puller are handled twice. A puller has at most
``ack_window`` messages and about `WINDOW_BYTES` in flight at once.

Items are the encoded payloads of in-memory pushes, or `StoredMessage` rows of durable
pushes (see `durable`); a durable item carries its id, timestamp, headers and failed
attempts, and its outcome (delivered, failed, dead-lettered) goes to ``settle``.

Frames: request ``["\\x00queue/<name>", batch_id, body]`` where ``body`` is a batch of
msgpack arrays ``[redelivered, data]`` or ``[redelivered, data, id, timestamp, headers,
attempts]``; reply ``[batch_id, status, body]`` (status as for requests; 0x02 means the
node no longer pulls the queue). ``body`` is empty, or lists the items whose handler
failed: ``[[index, dead_letter_queue or nil, error], ...]``. A stopping puller answers a
batch it handled part of with status 0x04 (`STATUS_PARTLY_HANDLED`, protocol 7) and the
body ``[[index of an item left unhandled, ...], failures as above]``: only those left are
dealt again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import msgpack
import zmq

from .._io.reactor import EventLoop
from .._io.sockets import close_watched, has_input, new_socket, send_frames
from .._mesh.directory import Directory
from .._mesh.turns import Turns
from .._stats import LogThrottle, Stats
from .._store.messages import (
    ATTEMPTS,
    BODY,
    HEADERS,
    ID,
    RECOVERED,
    STORED,
    TIMESTAMP,
    WIRE,
    wire_of,
)
from .._wire.codec import Codec, durable_item
from .._wire.frames import (
    BATCH_BYTES,
    KEEP_SERVICE_PREFIX,
    MAX_BATCH_ITEMS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PARTLY_HANDLED,
    Headed,
    RawPayload,
    dead_letter_queue,
    keep_service,
    parse_reply,
    pullable,
    queue_service,
    wrap_item,
)
from ..config import NodeConfig
from .pipeline import drop_front

__all__ = ["ReliableSender", "Failure", "fill_batch", "payload_size", "wire_form"]

log = logging.getLogger("zmqmesh.reliable")

_TIMEOUT_CHECK_S = 0.05
_FAILED_REST_S = 0.05
"""How long a node that could not take a batch (``0x01``: a keeper's store failed) gets
none of the queue; one that refused it (``0x02``: it no longer pulls or keeps it) rests
`Directory.skip_provider`'s 2 s. A stopping pusher has about a second (``linger_s``) to
hand its messages over, and a store may fail once."""
_REFUSED_LOG_S = 10.0
"""Dead-letter queues refused in acknowledgements (`ReliableSender._failures_of`) are
logged at most this often: a stranger may name one in every acknowledgement."""
WINDOW_BYTES = 16 << 20
"""The bytes a puller has in flight at most, besides ``ack_window``'s messages (a batch
past it still goes to a puller with nothing in flight)."""
TIMED_BATCH_ITEMS = 8
"""The most messages in a batch to a puller with an ack timeout for the queue. A batch has
``ack_timeout_s`` per message once it heads its puller's line (`_redeal_expired`), so a
stuck handler is seen within eight times ``ack_timeout_s`` at most."""
_GHOSTS_KEPT = 1024
"""Batches that timed out and were not answered since, remembered per puller and queue at most
(`ReliableSender._ghosts`): a puller dealt nothing more while it handles them keeps a few."""
WEDGED_S = 10.0
"""A puller taken for stuck on a queue (a batch timed out behind one it has not answered) is
dealt nothing of it until it answers, or for this long at most: then one batch again, which,
timing out behind them too, takes it for stuck again, and which it answers if the batches it
did not answer were lost rather than being handled (its queue would otherwise wait for good)."""


class Failure(NamedTuple):
    """A delivered item whose handler failed: the puller names a dead-letter queue when
    the item used up its deliveries."""

    position: int
    dead_letter: str | None
    error: str


def _may_dead_letter_to(dead_letter: str, queue: str) -> bool:
    """Whether the messages of ``queue`` given up on may move to ``dead_letter``: a queue a
    pull can take (`pullable`: the rule `pull` applies), not ``queue`` itself (a message
    moved there would be dealt again without end)."""
    return dead_letter != queue and pullable(dead_letter)


_NOT_HELD: tuple[frozenset[int], int] = (frozenset(), 0)
"""What `ReliableSender._held` holds for a queue with nothing held aside."""


class _Batch(NamedTuple):
    id: bytes
    queue: str
    puller: str
    items: list[Any]
    sent_at: float  # monotonic
    sent_wall: float  # the wall clock a redelivery reports as its time
    size: int  # its bytes on the wire
    service: str  # what it was sent to: the queue's pullers, or its keepers (`flush`)
    probe: bool = False  # one message under suspicion, dealt alone (`_suspects`)
    ack_timeout_s: float | None = None  # what its puller announced for the queue when it was dealt
    stored: bool = False  # its items are all durable (`StoredMessage`), from a durable queue's buffer


def _with_items(batch: _Batch, items: list[Any]) -> _Batch:
    """``batch`` with only ``items`` of it (to settle part of it)."""
    return _Batch(batch.id, batch.queue, batch.puller, items, batch.sent_at, batch.sent_wall, batch.size,
                  batch.service, batch.probe, batch.ack_timeout_s, batch.stored)


def fill_batch(source: deque[Any], items: list[Any], parts: list[bytes], n: int, size: int, again: bool,
               wrap: Callable[[Any, bool], bytes], limit: int | None = None, stored: bool = False) -> int:
    """Move items from ``source`` to ``items``, and their wire form (``wrap(item,
    redelivered)``) to ``parts``, while there are fewer than ``n`` and the batch stays
    within `BATCH_BYTES` (a single large item goes alone); the batch's size after.
    ``again``: they are dealt again (marked redelivered); so is a durable message with
    failed deliveries counted, or one stored before this node started. ``limit``: the
    puller's ``max_message_bytes``, when it is below this node's: the items stop before
    the first whose payload is larger (`payload_size`), which it would refuse. ``stored``:
    ``source`` holds durable messages only (`StoredMessage`: a durable queue's buffer), so
    their types need no look."""
    look = _FIRST_LOOK
    # (items of a batch of several are within `BATCH_BYTES` each: only a limit below it
    # needs a look at each, and above it only an item that goes alone)
    while not again and source and len(items) < n and (limit is None or limit >= BATCH_BYTES):
        # fresh items at the head, in runs that double while they are taken whole: a run
        # costs no Python step per item, and a batch cut short by large payloads looks at
        # a few past it only
        head = list(itertools.islice(source, min(n - len(items), len(source), look)))
        fresh = _fresh_sizes(head, wrap is not _wrap_two_fields, stored)
        if fresh is None:
            break  # (the loop below takes any mix)
        lengths, wires = fresh
        sizes = list(itertools.accumulate(lengths, initial=size))
        count = bisect_right(sizes, BATCH_BYTES) - 1
        if count < 1 and not items:
            if limit is not None and payload_size(head[0]) > limit:
                return size
            count = 1
        if count < 1:
            return size
        taken = head[:count]
        items += taken
        # (wrapped once cut: a large payload is copied for the batch that takes it only)
        parts += wires[:count] if wires is not None else map(_FIRST_DELIVERY.__add__, taken)
        drop_front(source, count)  # (no Python step per item)
        size = sizes[count]
        if count < len(head):
            return size
        look *= 2
    while len(items) < n and source:
        item = source[0]
        stored = type(item) is STORED
        if items and size + len(item[BODY] if stored else item) > BATCH_BYTES:
            break  # (its payload alone does not fit: no need to wrap it to know)
        if limit is not None and payload_size(item) > limit:
            break
        if type(item) is RawPayload:  # (at-least-once items are msgpack)
            item = item.encoded()
        part = wrap(item, again or (stored and (item[ATTEMPTS] > 0 or item[RECOVERED])))
        if items and size + len(part) > BATCH_BYTES:
            break
        source.popleft()
        items.append(item)
        parts.append(part)
        size += len(part)
    return size


_FIRST_DELIVERY = wrap_item(b"", False)
_FIRST_DELIVERY_BYTES = len(_FIRST_DELIVERY)
_FIRST_LOOK = 32  # (fresh items looked at in the first run of `fill_batch`)


def payload_size(item: Any) -> int:
    """The bytes of an item's encoded payload, which a puller's ``max_message_bytes``
    bounds (its headers, id and the batch around it are within `FRAME_HEADROOM`)."""
    return len(item[BODY]) if type(item) is STORED else len(item)


def _fresh_sizes(head: list[Any], stored_wire: bool, stored: bool = False,
                 ) -> tuple[Iterable[int], list[bytes] | None] | None:
    """The sizes of the wire forms of a first delivery of ``head``, when each is known
    without a Python step per item, with those forms if they are made already: plain
    in-memory payloads (their forms are not: `_FIRST_DELIVERY` and the payload), or
    (``stored_wire``: the puller reads the form made as they were committed) durable
    messages never delivered before, each with that form. None for any other mix.
    ``stored``: ``head`` is known to hold durable messages only (their types are not looked at)."""
    kinds = _STORED_ONLY if stored else set(map(type, head))
    if kinds == {bytes}:
        return map(_FIRST_DELIVERY_BYTES.__add__, map(len, head)), None
    if not stored_wire or kinds != _STORED_ONLY:
        return None
    wires = list(map(wire_of, head))
    # (a message marked recovered or with failed deliveries counted has no wire form,
    # `StoredMessage`'s `WIRE`; a form is never empty, so `all` finds a missing one, where
    # `in` would compare each)
    if not all(wires):
        return None
    return map(len, wires), wires


_STORED_ONLY = frozenset({STORED})  # (the kinds `_fresh_sizes` takes a durable buffer's items for)


def wire_form(item: Any, redelivered: bool, pack: Callable[[Any], bytes]) -> bytes:
    """An item in the form a puller of protocol 2 or later reads (``pack``: a
    `msgpack.Packer`'s own, of one thread at a time)."""
    if type(item) is STORED:
        form: bytes | None = item[WIRE]
        if form is not None and not redelivered:  # (made as it was committed)
            return form
        return durable_item(item[BODY], redelivered, item[ID], item[TIMESTAMP], item[HEADERS], item[ATTEMPTS], pack)
    if type(item) is Headed:  # carries headers: the item form that has room for them
        return durable_item(item, redelivered, item.id, item.timestamp, item.headers, 0, pack)
    return wrap_item(item, redelivered)


HELD_BYTES = WINDOW_BYTES
"""The bytes of a queue's messages held aside at most, as larger than any of its pullers
takes (`ReliableSender.flush`), besides ``ack_window`` messages; past either, the queue waits
behind the next such message (its pushes then wait for room, as for a full send queue, and
a durable queue is not read back further). One alone is held whatever its size."""


def _too_large_ahead(source: deque[Any], widest: int, aside: list[Any], held: int, most: int) -> int:
    """Move from the front of ``source`` to ``aside`` the items whose payload is larger
    than ``widest`` (what the largest taker there takes): none could go, and the items
    behind them would wait on them. Within `HELD_BYTES` and ``most`` items for ``aside``
    (``held``: its bytes so before); its bytes after."""
    while source and (size := payload_size(source[0])) > widest:
        if aside and (held + size > HELD_BYTES or len(aside) >= most):
            break  # (left at the front: the queue waits behind it)
        aside.append(source.popleft())
        held += size
    return held


def _blocked(q: deque[Any], again: deque[Any], widest: int) -> bool:
    """Whether what is left to deal waits behind a message larger than ``widest`` (held
    aside no more: `HELD_BYTES`)."""
    return bool(again and payload_size(again[0]) > widest or not again and q and payload_size(q[0]) > widest)


def _in_memory(items: Iterable[Any]) -> int:
    """How many of ``items`` (messages sent or to send again) live only in memory: all but
    the durable ones (`StoredMessage`), which stay stored. (Not only the bytes: a large
    payload held aside for want of a puller that takes it is a `RawPayload`, and went
    uncounted at a stop.)"""
    return sum(1 for item in list(items) if type(item) is not STORED)


def _wrap_two_fields(item: Any, redelivered: bool) -> bytes:
    """An item in the form a puller of protocol 1 reads: its payload only (no headers, id or clock)."""
    return wrap_item(item if isinstance(item, bytes) else item[BODY], redelivered)


class ReliableSender:
    """Deals the at-least-once and durable queues of one node; runs on the node's loop.

    ``wake`` asks the loop to flush (acknowledgements made room in a window); ``settle``
    (set by the durable queues) learns the outcome of every batch of durable items.
    """

    def __init__(self, *, ctx: zmq.Context[Any], loop: EventLoop, config: NodeConfig, stats: Stats,
                 uuid: bytes, directory: Directory, codec: Codec, routing_id: Callable[[], bytes],
                 connect: Callable[[zmq.Socket[Any], str, str | None], None], wake: Callable[[], None]) -> None:
        self.ctx = ctx
        self.loop = loop
        self.stats = stats
        self._sent_names = stats.names("pipeline", "sent")  # (written on the loop only)
        self._refused_log = LogThrottle(_REFUSED_LOG_S)  # (`_failures_of`)
        self.uuid = uuid
        # a requester's routing id, fresh for each connection to a puller (from the node's random
        # serial: unguessable). Not one for all: a puller taken for gone (silent past the peer
        # timeout, e.g. stopped) and back refused a new connection under the id its old one
        # still held (with batches unread), and what was sent on it was dropped without a word
        self._routing_id = routing_id
        self.directory = directory
        self.codec = codec
        self._wrap = functools.partial(wire_form, pack=msgpack.Packer().pack)  # (the packer: the loop's alone)
        self.connect = connect
        self.wake = wake
        self.window = config.ack_window
        self.settle: Callable[[str, list[Any], list[Failure], bool], list[Any]] | None = None
        """The durable queues' `settle` of a batch with durable items: ``(queue, items,
        failures, stored)``, ``stored``: its items are all durable ones."""
        self.redeliver: dict[str, deque[Any]] = {}
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self.inflight: dict[bytes, _Batch] = {}
        self.inflight_count: dict[str, int] = {}
        self.inflight_bytes: dict[str, int] = {}
        self._batch_ids = itertools.count(1)
        # the puller of each queue whose turn it is: moved by a batch dealt only, not by a flush
        # that deals nothing (one follows each acknowledgement) nor by other queues' (`flush`)
        self._turns = Turns()
        self._timeout_check: Any = None
        # (puller, queue) -> when the head of its line last left (acknowledged or taken
        # back): the oldest batch in flight starts its ack timeout then, not when it was
        # sent (`_left_line`; only for lines with an ack timeout)
        self._line_moved: dict[tuple[str, str], float] = {}
        # ids of the durable messages of a failed batch (its puller vanished, or it was not
        # acknowledged in time) that may not be to blame: the puller may never have reached
        # them. None has an attempt counted; each is dealt alone next, one at a time per
        # queue (a probe), where a failure is its own and counts
        self._suspects: set[str] = set()
        # queue -> the ids of the objects held aside at its last flush, too large for every
        # puller there (`_hold`), which wait in `redeliver`, and how many of them are durable
        # (they stay stored)
        self._held: dict[str, tuple[frozenset[int], int]] = {}
        # (puller, queue) -> the batches of that line that timed out and that the puller has not
        # answered since (it may still be handling them, and then has not reached what it was
        # dealt after them), by id, with the ids of their durable messages (`_behind`)
        self._ghosts: dict[tuple[str, str], dict[bytes, frozenset[str]]] = {}
        # lines whose puller answered nothing of the queue since one of them was taken back: it
        # may be stuck on that one (`_behind`)
        self._quiet: set[tuple[str, str]] = set()
        # quiet lines where a batch timed out behind such a batch: the puller is stuck there;
        # dealt nothing more until it answers one of its batches of the queue, or for
        # `WEDGED_S` at most (until when: then one batch again, in case those it did not
        # answer were lost, not being handled)
        self._wedged: dict[tuple[str, str], float] = {}
        # lines with batches that timed out unanswered (`_ghosts`): until when the messages
        # of those batches are dealt to any puller but that line's (`_take_own`), which may
        # still be handling them (dealt to it, they waited behind its own delivery, timed
        # out there in turn and each counted an attempt)
        self._withheld: dict[tuple[str, str], float] = {}

    def pending(self, pulled: Callable[[str], object]) -> int:
        """Messages sent but not yet acknowledged, plus those waiting to be resent: of these,
        durable ones count only for the queues ``pulled(queue)`` is true of (the others stay
        stored, for a puller or a keeper to come). Safe to ask from any thread: the loop's
        tables are copied, in C, before they are read."""
        held = dict(self._held)
        return sum(len(b.items) for b in list(self.inflight.values())) + \
            sum(len(q) - held.get(name, _NOT_HELD)[1] if pulled(name) else _in_memory(q)
                for name, q in list(self.redeliver.items()))

    def to_deal_again(self, queue: str) -> int:
        """How many messages of ``queue`` wait to be dealt again, but for the durable ones
        held aside, too large for every puller (or keeper) there: those stay stored, for
        one that takes them, and nothing there will take them meanwhile (a stop does not
        wait for them). Loop only."""
        again = self.redeliver.get(queue)
        return len(again) - self._held.get(queue, _NOT_HELD)[1] if again else 0

    def take_in_memory(self, queue: str) -> list[Any]:
        """Take, in order, the in-memory messages of ``queue`` waiting to be dealt again
        (the queue's at-least-once pullers are gone and plain ones pull it now: they go to
        them); durable ones stay, for an at-least-once puller."""
        again = self.redeliver.get(queue)
        if not again:
            return []
        # (a payload named for its redelivery, without headers, goes plain: a plain puller names its own)
        taken = [bytes(item) if type(item) is Headed and not item.headers else item
                 for item in again if type(item) is not STORED]
        if taken:
            kept = deque(item for item in again if type(item) is STORED)
            if kept:
                self.redeliver[queue] = kept
            else:
                del self.redeliver[queue]
        return taken

    def pending_in_memory(self) -> int:
        """The part of `pending` that lives only in memory (not in the store)."""
        return sum(_in_memory(b.items) for b in list(self.inflight.values())) + \
            sum(map(_in_memory, list(self.redeliver.values())))

    def flush(self, queue: str, q: deque[Any], to_keepers: bool = False, stored: bool = False) -> bool:
        """Deal what is queued to pullers with room in their window; True if some had to wait
        for room (False while every puller rests after refusing a batch: a timer wakes the
        flush when that ends).

        ``to_keepers``: deal to the keepers of ``queue`` instead (a stopping node's hand-over).
        ``stored``: ``q`` holds durable messages only (`StoredMessage`: a durable queue's
        buffer); a batch dealt from it alone is noted so (`_Batch.stored`), and neither its
        dealing nor its settling looks at its items' types.
        """
        directory = self.directory
        kind, name = ("keepers", keep_service(queue)) if to_keepers else ("ackqueues", queue_service(queue))
        pullers: Sequence[str] = [i for i in directory.providers(kind, queue)  # a node keeps its own messages anyway
                                  if not (to_keepers and i == directory.node_id) and directory.endpoint_of(i, "service")]
        again = self.redeliver.get(queue)
        if not pullers:
            return bool(q or again)
        narrow = directory.narrower  # (the pullers that take less than this node sends: rarely any)
        widest = directory.widest_limit(pullers) if narrow else None
        service = name.decode()
        pullers = directory.unskipped(service, pullers)
        if not pullers:  # (each refused the queue a moment ago: `_on_acks` wakes the flush after)
            return False
        if again is None:
            again = deque()  # (kept below only if a failed send puts messages back in it)
        start = self._turns[queue]
        last = -1  # (the index of the puller dealt the last batch)
        progress = True
        probing = False
        dealt_again = again  # (what is dealt again goes first)
        if self._suspects and not to_keepers and again and type(again[0]) is STORED \
                and again[0][ID] in self._suspects:
            if any(b.probe and b.queue == queue for b in self.inflight.values()):
                dealt_again = deque()  # (a probe of this queue is out: the suspects wait for its outcome, fresh ones go)
            else:
                probing = True
        aside: list[Any] = []  # too large for every puller there: held, at the front of what is dealt again
        held = 0  # (their bytes)
        while (q or dealt_again) and progress:
            progress = False
            if widest is not None:
                held = _too_large_ahead(dealt_again, widest, aside, held, self.window)
                held = _too_large_ahead(q, widest, aside, held, self.window)
            # (an even share of what waits as the pass begins: counted again after each batch, it
            # gave the first puller half, the next a quarter)
            share = max(1, (len(q) + len(dealt_again)) // len(pullers))
            for k in range(len(pullers)):
                puller = pullers[(start + k) % len(pullers)]
                room = self.window - self.inflight_count.get(puller, 0)
                ack_timeout_s = directory.ack_timeout_s(queue, puller)
                most = 1 if probing else TIMED_BATCH_ITEMS if ack_timeout_s else MAX_BATCH_ITEMS
                n = min(room, share, most)
                if n <= 0 or self.inflight_bytes.get(puller, 0) >= WINDOW_BYTES or \
                        (self._wedged and self._is_wedged((puller, queue))):
                    continue
                items: list[Any] = []
                parts: list[bytes] = []
                wrap = self._wrap if directory.speaks(puller, 2) else _wrap_two_fields
                limit = narrow.get(puller) if narrow else None
                own = self._take_own((puller, queue), dealt_again, n) if self._withheld else []
                size = fill_batch(dealt_again, items, parts, n, 0, True, wrap, limit)  # first what is dealt again
                all_stored = stored and not items  # (none dealt again: all from ``q``, if any)
                if not dealt_again or limit is None or payload_size(dealt_again[0]) <= limit:  # (in order)
                    size = fill_batch(q, items, parts, n, size, False, wrap, limit, stored)
                if own:
                    dealt_again.extendleft(reversed(own))
                if not items:
                    if limit is None and not own:
                        break
                    continue  # (the next is too large for this puller, or its own: another takes it)
                if wrap is _wrap_two_fields:
                    stripped = sum(1 for i in items if (type(i) is Headed and i.headers)
                                   or (type(i) is STORED and i[HEADERS]))
                    if stripped:
                        self.stats.reject("headers_not_carried", stripped)
                batch_id = next(self._batch_ids).to_bytes(8, "big")
                try:
                    send_frames(self._socket(puller), [name, batch_id, b"".join(parts)])
                except zmq.ZMQError:
                    for item in reversed(items):
                        again.appendleft(item)
                    continue
                self.inflight[batch_id] = _Batch(batch_id, queue, puller, items, time.monotonic(), time.time(), size,
                                                 service, probing, ack_timeout_s, all_stored)
                self.inflight_count[puller] = self.inflight_count.get(puller, 0) + len(items)
                self.inflight_bytes[puller] = self.inflight_bytes.get(puller, 0) + size
                self.stats.pattern["pipeline"]["sent"] += len(items)
                self._sent_names.add(queue, len(items))  # (by name, as the pusher counts)
                progress = True
                last = (start + k) % len(pullers)
                if self._suspects:
                    for item in items:
                        if type(item) is STORED:
                            self._suspects.discard(item[ID])
                if probing:
                    progress = False  # (one probe at a time)
                    break
        if last >= 0:
            self._turns.chosen(queue, last)
        for puller in pullers:  # sending may have consumed the edge that announces acks
            sock = self.sockets.get(puller)
            if sock is not None and has_input(sock):
                self.loop.call_soon(self._on_acks, puller)
        if self.inflight and self._timeout_check is None and self._timed():
            self._timeout_check = self.loop.call_later(_TIMEOUT_CHECK_S, self._check_timeouts)
        # (not those held aside, nor what waits behind one past their bound: a puller that
        # takes them wakes the flush)
        waiting = bool(q or again) and not (widest is not None and _blocked(q, again, widest))
        if aside or queue in self._held:
            was_held = self._held.get(queue, _NOT_HELD)[0]
            still: list[Any] = []
            if was_held and widest is not None and not was_held <= {id(item) for item in aside}:
                # (held before, and now behind messages put back in front of them since: held all the same)
                still = [item for item in again if id(item) in was_held and payload_size(item) > widest]
            self._hold(queue, aside, widest, still)
            again.extendleft(reversed(aside))
        if again:  # (no entry for a queue with nothing to deal again: one a name pushed to stayed for good)
            self.redeliver[queue] = again
        else:
            self.redeliver.pop(queue, None)
        return waiting

    def _hold(self, queue: str, aside: list[Any], widest: int | None, still: Sequence[Any] = ()) -> None:
        """Note the messages of ``queue`` held aside by this flush, too large for every
        puller there (``widest``: the most one takes), and those held before that are
        ``still`` to deal again, behind messages put back in front of them since: those
        newly held are counted in ``pipeline.held_too_large`` and logged, once each however
        many flushes hold them."""
        before = self._held.pop(queue, _NOT_HELD)[0]
        if not aside and not still:
            return
        both = [*aside, *still] if still else aside
        held = frozenset(map(id, both))  # (the same objects while they are held)
        self._held[queue] = (held, sum(1 for item in both if type(item) is STORED))
        fresh = [item for item in aside if id(item) not in before]
        if not fresh:
            return
        self.stats.add("pipeline", "held_too_large", len(fresh))
        log.warning("%d message(s) of %r (the largest of %d bytes) are larger than any of its pullers takes "
                    "(max_message_bytes %s at most): held, not dealt, until a puller that takes them comes "
                    "(%d held now; counted in pipeline.held_too_large)",
                    len(fresh), queue, max(map(payload_size, fresh)), widest, len(held))

    def _socket(self, puller: str) -> zmq.Socket[Any]:
        sock = self.sockets.get(puller)
        if sock is None:
            endpoint, key = self.directory.endpoint_of(puller, "service")  # type: ignore[misc]
            sock = new_socket(self.ctx, zmq.DEALER, {zmq.ROUTING_ID: self._routing_id(), zmq.SNDHWM: 0})
            self.connect(sock, endpoint, key)
            self.sockets[puller] = sock
            self.loop.add_reader(sock.FD, self._on_acks, puller)
            self.loop.call_soon(self._on_acks, puller)
        return sock

    def _on_acks(self, puller: str) -> None:
        """Read the answers ``puller`` sent to the batches dealt to it. An answer naming a
        batch dealt to another puller is dropped, counted (``rejected["ack_not_dealt"]``):
        taken, it settled messages that puller still held, lost if it then died."""
        sock = self.sockets.get(puller)
        freed = False
        while sock is not None:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            reply = parse_reply(frames)
            batch = self.inflight.get(reply[0]) if reply is not None else None
            if batch is not None and batch.puller != puller:  # (a batch dealt to another: not its to answer)
                self.stats.reject("ack_not_dealt")
                continue
            if batch is not None:
                del self.inflight[batch.id]
            if batch is None or reply is None:
                # late: the batch timed out and went to another puller (its puller moves on)
                if reply is not None and self._ghosts and self._answered_late(puller, reply[0]):
                    freed = True
                continue
            if self._quiet:
                self._quiet.discard((batch.puller, batch.queue))
                self._wedged.pop((batch.puller, batch.queue), None)
            self.inflight_count[batch.puller] -= len(batch.items)
            self.inflight_bytes[batch.puller] -= batch.size
            self._left_line(batch)
            freed = True
            if reply[1] != STATUS_OK:  # the puller stops, stopped pulling, or the keeper's store failed: deal
                if reply[1] == STATUS_PARTLY_HANDLED:  # them (what it left of them) again, to others first
                    self._partly_handled(batch, reply[2])
                else:
                    self._put_back(batch.queue, self._named(batch))
                rest = self.directory.skip_provider(batch.service, batch.puller,
                                                    _FAILED_REST_S if reply[1] == STATUS_ERROR else None)
                self.loop.call_later(rest, self.wake)
                continue
            retry = self._settle_answered(batch, self._failures(reply[2], batch.queue, len(batch.items)))
            if retry:
                self._put_back(batch.queue, retry)
        if freed:
            self.wake()

    def _partly_handled(self, batch: _Batch, body: bytes) -> None:
        """A stopping puller handled part of ``batch`` (`STATUS_PARTLY_HANDLED`): settle
        what it handled, its failures as any acknowledgement's, and deal the items it left
        again, marked redelivered, with no attempt counted. A body that cannot be read
        (counted, ``rejected["ack_malformed"]``) deals the whole batch again, as a stop did
        before."""
        named = self._named(batch)
        try:
            left_positions, entries = self.codec.decode(body)
            left = {int(i) for i in left_positions}
        except Exception:
            left = None
        if not left or not left <= set(range(len(batch.items))):
            self.stats.reject("ack_malformed")
            self._put_back(batch.queue, named)
            return
        handled = [i for i in range(len(batch.items)) if i not in left]
        place = {position: at for at, position in enumerate(handled)}
        failures = [Failure(place[f.position], f.dead_letter, f.error)
                    for f in self._failures_of(entries, batch.queue, len(batch.items)) if f.position in place]
        retry = self._settle_answered(_with_items(batch, [batch.items[i] for i in handled]), failures)
        self._put_back(batch.queue, [named[i] for i in sorted(left)] + retry)

    def _settle_answered(self, batch: _Batch, failures: list[Failure]) -> list[Any]:
        """Settle ``batch`` as its puller answered it, ``failures`` (its handlers' that
        raised, counted in ``pipeline.errors``) among its items: what to deal again."""
        if failures:
            self.stats.pattern["pipeline"]["errors"] += len(failures)
        return self._settle(batch, failures, [])

    def _failures(self, body: bytes, queue: str, count: int) -> list[Failure]:
        """The failures a puller of ``queue`` named in the acknowledgement ``body`` of a
        batch of ``count`` items (`_failures_of`)."""
        if not body:
            return []
        try:
            entries = self.codec.decode(body)
        except Exception:
            self.stats.reject("ack_malformed")
            return []
        return self._failures_of(entries, queue, count)

    def _failures_of(self, entries: Any, queue: str, count: int) -> list[Failure]:
        """The failures ``entries`` (``[[index, dead_letter_queue or nil, error], ...]``, as
        decoded) name, of a batch of ``count`` items of ``queue``; none if malformed
        (counted, ``rejected["ack_malformed"]``). A dead-letter queue no pull could take
        (the queue itself, a name past `MAX_NAME_BYTES` or beginning ``\\x00``: an older
        node's or a stranger's; `pull` refuses them) is replaced by ``"<queue>.dead"``,
        counted (``rejected["dead_letter_refused"]``) and logged at most every `_REFUSED_LOG_S`."""
        try:
            failures = [Failure(int(i), dl if isinstance(dl, str) else None, str(err)) for i, dl, err in entries]
        except Exception:
            self.stats.reject("ack_malformed")
            return []
        failures = [f for f in failures if 0 <= f.position < count]
        default = dead_letter_queue(queue)
        refused = {f.position for f in failures
                   if f.dead_letter and f.dead_letter != default and not _may_dead_letter_to(f.dead_letter, queue)}
        if refused:
            self.stats.reject("dead_letter_refused", len(refused))
            said = self._refused_log.due(len(refused))
            if said:
                log.warning("pullers named %d dead-letter queue(s) no pull could take (the queue itself, or no "
                            "queue's name) since the last such line, the last a puller of %r: those dead letters go "
                            "to '<queue>.dead', here %r (counted in rejected.dead_letter_refused; said again at most "
                            "every %g s)", said, queue, default, _REFUSED_LOG_S)
            failures = [Failure(f.position, default, f.error) if f.position in refused else f for f in failures]
        return failures

    def _put_back(self, queue: str, items: list[Any]) -> None:
        self.redeliver.setdefault(queue, deque()).extendleft(reversed(items))
        counters = self.stats.pattern["pipeline"]
        counters["redelivered"] = counters.get("redelivered", 0) + len(items)

    def _check_timeouts(self) -> None:
        self._timeout_check = None
        try:
            self._redeal_expired()
        finally:
            if self.inflight and self._timed():
                self._timeout_check = self.loop.call_later(_TIMEOUT_CHECK_S, self._check_timeouts)

    def _timed(self) -> bool:
        """Whether a batch in flight may time out: a puller announces an ack timeout, or one
        announced it when a batch still in flight was dealt to it (`_ack_timeout_s`)."""
        return bool(self.directory.offers["acktimeouts"]) or \
            any(b.ack_timeout_s is not None for b in self.inflight.values())

    def _ack_timeout_s(self, batch: _Batch) -> float | None:
        """The ack timeout ``batch`` runs under: the one its puller announces for its queue,
        or, if it announces none now, the one it announced when the batch was dealt. (A
        puller that unpulls leaves the queue's ack-timeout group with its others: what it
        held of a stuck handler then never timed out, and was not dealt again while the
        puller stayed in the mesh.)"""
        timeout = self.directory.ack_timeout_s(batch.queue, batch.puller)
        return batch.ack_timeout_s if timeout is None else timeout

    def _redeal_expired(self) -> None:
        now = time.monotonic()
        # a puller handles what it was dealt in turn: a batch waits in its line behind the
        # batches dealt before it (up to ``ack_window`` messages), and its handlers run one
        # after the other; so only the oldest batch of a puller and queue is on the clock,
        # from when it reached the head of the line, and it has ``ack_timeout_s`` per message
        heads: dict[tuple[str, str], _Batch] = {}
        for batch in self.inflight.values():  # (in the order they were sent)
            heads.setdefault((batch.puller, batch.queue), batch)

        def late(batch: _Batch) -> bool:
            line = (batch.puller, batch.queue)
            if heads.get(line) is not batch:
                return False
            timeout = self._ack_timeout_s(batch)
            started = max(batch.sent_at, self._line_moved.get(line, 0.0))
            return timeout is not None and now - started > timeout * len(batch.items)

        held = Counter(b.puller for b in self.inflight.values())
        expired = self._take_inflight(late)
        for batch in expired:
            log.warning("puller %s did not acknowledge %d message(s) of %r in time: redelivering",
                        batch.puller[:8], len(batch.items), batch.queue)
            line = (batch.puller, batch.queue)
            behind = self._behind(line)
            again = self._failed(batch, "ack timeout", held[batch.puller] == 1, behind)
            self._unanswered(line, batch)
            self._withheld[line] = now + WEDGED_S
            if behind is not None:  # stuck on a batch before: what else the line holds waits behind it too
                self._wedged[line] = now + WEDGED_S
                # (to another puller at once; with none, left to time out in turn: taken back, it would
                # be handled twice, by this one unstuck and again once dealt to it)
                stuck = self._take_line(line) if self._other_puller(line) else []
                for other in reversed(stuck):
                    self._put_back(other.queue, self._failed(other, "ack timeout", False, behind))
                for other in stuck:
                    self._unanswered(line, other)
            self._put_back(batch.queue, again)
        if expired:
            self.wake()
            # (the lines withheld or wedged now are dealt to again then: nothing else may flush)
            self.loop.call_later(WEDGED_S, self.wake)

    def _take_own(self, line: tuple[str, str], again: deque[Any], n: int) -> list[Any]:
        """Take out of the front of ``again``, in order, the durable messages of the batches
        of ``line`` that timed out and that its puller has not answered (`_ghosts`), until
        ``n`` others lead it (what that puller's turn takes at most), for up to `WEDGED_S`
        after the last of them timed out: its handler may still be on them, so they go to
        other pullers; dealt to it, they would wait behind its own delivery. The caller puts
        them back after that puller's turn. (Looking at the whole of ``again`` cost 0.8 ms a
        turn with 20,000 messages in it, up to 125 turns a flush.)"""
        until = self._withheld.get(line)
        if until is None or not again:
            return []
        ghosts = self._ghosts.get(line)
        if not ghosts or time.monotonic() >= until:
            del self._withheld[line]  # (answered, or past the bound: dealt to it again, in case its answer was lost)
            return []
        own = frozenset().union(*ghosts.values())
        taken: list[Any] = []
        others: list[Any] = []
        while again and len(others) < n:
            item = again.popleft()
            (taken if type(item) is STORED and item[ID] in own else others).append(item)
        again.extendleft(reversed(others))
        return taken

    def _is_wedged(self, line: tuple[str, str]) -> bool:
        """Whether the puller of ``line`` is taken for stuck on its queue now (`_wedged`)."""
        until = self._wedged.get(line)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._wedged[line]  # (dealt again: a batch that times out behind the others takes it for stuck again)
        return False

    def _other_puller(self, line: tuple[str, str]) -> bool:
        """Whether the queue of ``line`` has a puller besides that of ``line`` not stuck on it."""
        puller, queue = line
        return any(other != puller and not self._is_wedged((other, queue))
                   for other in self.directory.providers("ackqueues", queue))

    def _take_line(self, line: tuple[str, str]) -> list[_Batch]:
        """Take back what is in flight on ``line`` (a puller and a queue), oldest first."""
        return self._take_inflight(lambda b: (b.puller, b.queue) == line)

    def _unanswered(self, line: tuple[str, str], batch: _Batch) -> None:
        """``batch`` of ``line`` was taken back unanswered: its puller may still handle it."""
        ghosts = self._ghosts.setdefault(line, {})
        if len(ghosts) < _GHOSTS_KEPT:
            ghosts[batch.id] = frozenset(item[ID] for item in batch.items if type(item) is STORED)
        self._quiet.add(line)

    def _behind(self, line: tuple[str, str]) -> frozenset[str] | None:
        """The ids of the durable messages of the batches of ``line`` that timed out and that
        its puller has not answered since, if it answered nothing of the queue since the
        last of them (it may be stuck on them: with handlers to spare it would have); None
        if there are none, or it did."""
        ghosts = self._ghosts.get(line)
        return frozenset().union(*ghosts.values()) if ghosts and line in self._quiet else None

    def _answered_late(self, puller: str, batch_id: bytes) -> bool:
        """``puller`` answered ``batch_id`` after it timed out: whether it was a batch its
        line still waited on (the line is then no longer stuck; a batch past `_GHOSTS_KEPT`,
        of a line not known, frees every line of the puller)."""
        lines = [line for line in self._ghosts if line[0] == puller]
        for line in lines:
            ghosts = self._ghosts[line]
            if ghosts.pop(batch_id, None) is not None:
                if not ghosts:
                    del self._ghosts[line]
                    self._withheld.pop(line, None)
                self._quiet.discard(line)
                self._wedged.pop(line, None)
                return True
        self._quiet.difference_update(lines)
        for line in lines:
            self._wedged.pop(line, None)
        return bool(lines)

    def _failed(self, batch: _Batch, why: str, alone: bool, behind: frozenset[str] | None = None) -> list[Any]:
        """The items of a batch nobody acknowledged, to deal again. The message of a probe,
        or the one message its puller had (``alone``), has one more attempt counted (so a
        message that keeps killing its pullers, or keeps its handler stuck, is
        dead-lettered); the others have none counted (the puller may never have reached
        them) and are dealt alone next, one at a time (`_suspects`). ``behind``: the ids of
        the messages of batches its puller had not answered after they timed out: then it
        may never have reached this one either, and only a message dealt again behind
        itself (its handler still stuck on it) has an attempt counted."""
        if behind is not None:
            own = [item for item in batch.items if type(item) is STORED and item[ID] in behind]
            rest = [item for item in self._named(batch) if not (type(item) is STORED and item[ID] in behind)]
            self._suspects.update(item[ID] for item in rest if type(item) is STORED)
            if not own:
                return rest
            return self._settle(_with_items(batch, own), [Failure(i, None, why) for i in range(len(own))], own) + rest
        if not (batch.probe or (alone and len(batch.items) == 1)):
            self._suspects.update(item[ID] for item in batch.items if type(item) is STORED)
            return self._named(batch)
        if batch.probe:  # (probed again: the messages behind it wait, not dealt beside it)
            self._suspects.update(item[ID] for item in batch.items if type(item) is STORED)
        return self._settle(batch, [Failure(i, None, why) for i in range(len(batch.items))], self._named(batch))

    def _named(self, batch: _Batch) -> list[Any]:
        """The items of ``batch``, each in-memory payload named as its puller named it (from
        the batch id and its place in it), so that a redelivery keeps the message's id."""
        stem = None
        named: list[Any] = []
        for index, item in enumerate(batch.items):
            if type(item) is bytes:
                stem = stem or f"{self.uuid.hex()}/{batch.id.hex()}/"
                item = Headed(item)
                item.id, item.timestamp, item.headers = f"{stem}{index}", batch.sent_wall, b""
            named.append(item)
        return named

    def _settle(self, batch: _Batch, failures: list[Failure], otherwise: list[Any]) -> list[Any]:
        """What of ``batch`` to deal again after its outcome: the durable queues decide for a
        batch with durable items, ``otherwise`` is the answer for the others; a failure to
        settle deals the whole batch again rather than strand it."""
        if self.settle is None or not (batch.stored or any(type(i) is STORED for i in batch.items)):
            return otherwise
        try:
            retry = self.settle(batch.queue, batch.items, failures, batch.stored)
        except Exception:
            log.exception("settling a batch of %r failed", batch.queue)
            return batch.items
        # a batch may mix in-memory items with durable ones: those go by ``otherwise``
        return retry + [i for i in otherwise if type(i) is not STORED]

    def busy_queues(self) -> set[str]:
        """The queues with messages in flight or to deal again (loop only)."""
        return {b.queue for b in self.inflight.values()} | self.redeliver.keys()

    def in_flight(self, queue: str) -> int:
        """Messages of ``queue`` sent and not yet acknowledged."""
        return sum(len(b.items) for b in self.inflight.values() if b.queue == queue)

    def _take_inflight(self, match: Callable[[_Batch], bool]) -> list[_Batch]:
        """Remove the batches in flight that ``match`` (a late acknowledgement of them is
        then ignored), oldest first."""
        taken = [b for b in self.inflight.values() if match(b)]
        for batch in taken:
            del self.inflight[batch.id]
            self.inflight_count[batch.puller] -= len(batch.items)
            self.inflight_bytes[batch.puller] -= batch.size
        for batch in taken:
            self._left_line(batch)
        return taken

    def _left_line(self, batch: _Batch) -> None:
        """``batch`` left the in-flight table: if it headed its puller's line of a queue with
        an ack timeout, the next one heads it from now (one settled behind the head moves
        nothing: a stuck head keeps its clock while later batches are acknowledged)."""
        if self._ack_timeout_s(batch) is None:
            return
        if all(b.id > batch.id for b in self.inflight.values() if b.puller == batch.puller and b.queue == batch.queue):
            self._line_moved[(batch.puller, batch.queue)] = time.monotonic()

    def recall(self, queue: str) -> int:
        """Take back what is in flight on ``queue`` (to be dealt again, e.g. to a keeper);
        a late acknowledgement of it is ignored. How many messages came back."""
        recalled = self._take_inflight(lambda b: b.queue == queue)
        for batch in reversed(recalled):
            self.redeliver.setdefault(queue, deque()).extendleft(reversed(batch.items))
        return sum(len(b.items) for b in recalled)

    def peer_gone(self, puller: str, failed: bool = True) -> None:
        """Put back what a departed puller had not acknowledged, marked as redelivered.
        ``failed``: it vanished (a crash, silence), so its messages failed as `_failed`
        says (one it held alone counts an attempt, the others become suspects); a puller
        that said goodbye (a stop) failed none of them, and its answers that came before
        the goodbye are read first (those of the batches its stop cut short among them)."""
        if not failed and puller in self.sockets:
            self._on_acks(puller)
        lost = self._take_inflight(lambda b: b.puller == puller)
        for batch in reversed(lost):
            self._put_back(batch.queue, self._failed(batch, "the puller left", len(lost) == 1,
                                                     self._behind((puller, batch.queue))) if failed
                           else self._named(batch))
        for line in [line for line in self._line_moved if line[0] == puller]:
            del self._line_moved[line]
        for line in [line for line in self._ghosts if line[0] == puller]:
            del self._ghosts[line]
        self._quiet = {line for line in self._quiet if line[0] != puller}
        self._wedged = {line: until for line, until in self._wedged.items() if line[0] != puller}
        self._withheld = {line: until for line, until in self._withheld.items() if line[0] != puller}
        if lost:
            kept = all(b.service.startswith(KEEP_SERVICE_PREFIX) for b in lost)  # (a stopping pusher's hand-over)
            log.warning("%s %s left with %d unacknowledged message(s): redelivering", "keeper" if kept else "puller",
                        puller[:8], sum(len(b.items) for b in lost))
        self.inflight_count.pop(puller, None)
        self.inflight_bytes.pop(puller, None)
        sock = self.sockets.pop(puller, None)
        if sock is not None:
            close_watched(self.loop, sock)
        self.wake()

    def close(self) -> int:
        """Close every socket; returns how many in-memory messages were still unacknowledged
        (durable ones stay in the store)."""
        left = self.pending_in_memory()
        if self._timeout_check is not None:
            self._timeout_check.cancel()
            self._timeout_check = None
        for puller in list(self.sockets):
            close_watched(self.loop, self.sockets.pop(puller))
        return left
