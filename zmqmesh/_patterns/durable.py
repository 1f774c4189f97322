"""Durable queues: the pusher's side. A durable push is committed to the node's store
before it returns; the loop deals stored messages to at-least-once pullers (through
`ReliableSender`) as they have room, oldest first, and forgets each one once a puller
acknowledged it. Messages still stored when the node starts (it was killed or stopped
before they were acknowledged) are dealt again, marked as redelivered.

A freshly committed message also goes straight into its queue's buffer in memory, so
the loop reads the store only for what does not fit there: a backlog past `BUFFER`
messages or `BUFFER_BYTES`, or past what all buffers may hold together
(``durable_buffer_max_bytes``), the messages of an earlier run, dead letters. What does
not fit stays in the store only (counted in ``pipeline.durable_spilled``), and is read
back as the buffers empty, for queues that have a puller (or keeper) to take it.

A queue nobody pulls, with nothing in its buffer, is parked: the node forgets it, and the
store notes where its rows begin (`Store.park`), so that pushes to ever new queue names
nobody pulls cost the node no memory per name. It is read back from there once a puller
of it appears (a change of the offers, `refill`), or a keeper at a stop (`unpark`).

The store keeps what one commit stored for a queue as one segment (a row), so the loop
counts the messages of each segment still unsettled, and forgets the segment once all of
them are: acknowledged, or moved to a dead-letter queue. Acknowledgements inside segments
still stored are marked in the store too, as ranges, so a restart delivers again only
what was never acknowledged.

A message whose handler failed comes back with one more attempt counted; the puller
names a dead-letter queue when it used up its deliveries, and the message moves there
(to the end of that durable queue) with headers saying why.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from itertools import chain, compress, repeat
from typing import TYPE_CHECKING, Any

import msgpack

from .._stats import Stats
from .._store.messages import (
    ATTEMPTS,
    BODY,
    HEADERS,
    ID,
    SEGMENT,
    SEQ,
    STORED,
    WIRE,
    Entries,
    Entry,
    StoredMessage,
    as_recovered,
    segment_of,
    seq_of,
    stored_messages,
    unreadable,
    wire_of,
    with_attempt,
)
from .._wire import frames as wire
from .._wire.codec import Codec
from .reliable import Failure

if TYPE_CHECKING:
    from .._store.segments import StoredSegment
    from .._store.store import Store

__all__ = ["DurableQueues", "Buffer", "BUFFER", "BUFFER_BYTES", "Held", "Ticket", "held_halves", "held_bytes",
           "handled_by_segment"]

log = logging.getLogger("zmqmesh.durable")

BUFFER = 16_384
"""Stored messages of one queue held in memory at most, ready to deal."""
BUFFER_BYTES = 8 << 20
"""...and the bytes they hold at most (a larger message is held alone)."""
_REFILL_BELOW = BUFFER // 4
_REFILL_CHUNK = 1024  # messages a read back asks for (whole segments: up to one less than SEGMENT_MAX more)
_REFILL_BELOW_BYTES = BUFFER_BYTES // 4
_HELD_OVERHEAD = 200  # what a message held costs besides its payload and headers (its tuple, id, numbers)
_MAX_ERROR_CHARS = 1000
_SIZES_KEPT = 4096  # sizes reckoned up that a buffer keeps before it drops them
_ACK_BATCH = 16_384  # (a bound, not a cadence: the timer writes first at any rate below 300 k msg/s)
_COALESCE_S = 0.001
_ACK_DELAY_S = 0.05
_RETRY_FIRST_S = 0.5  # a store write that failed (e.g. a full disk) is tried again after this,
_RETRY_MOST_S = 30.0  # ... then twice as long each time, up to this (`_retry_delay`)
_FEW_SEGMENTS = 8  # a settled batch of more segments is sorted out message by message


def _retry_delay(failures: int) -> float:
    """How long to wait before trying a failed store write again, after ``failures`` in a row."""
    return min(_RETRY_MOST_S, _RETRY_FIRST_S * float(2 ** min(failures - 1, 16)))  # (capped: 2 ** 1,100 is no float)


def handled_by_segment(items: list[Any], failed: Container[int], stored: bool = False,
                       ) -> dict[int, list[StoredMessage]]:
    """The durable messages among ``items`` that are not at a position in ``failed``, by
    segment, in order. A batch all durable and all handled, of a few segments (mostly one
    or two), is sorted out with no Python step per message (``stored``: ``items`` are
    known to be all durable, `StoredMessage`: not looked at); their sequence numbers are
    looked up only for a segment that stays open (`DurableQueues._settle_in`)."""
    if not failed and items and (stored or set(map(type, items)) == {STORED}):
        segments = list(map(segment_of, items))
        n = len(segments)
        # the runs of one segment each, as a batch dealt in order holds them (its segments
        # ascending): found by bisection, not by hashing each message's segment, then checked
        # (whatever the order): each run holds its segment's messages only. (A run found so
        # ends where a greater segment begins: runs that each hold one segment hold ascending
        # ones, so each holds all of its segment's.)
        starts = [0]
        while starts[-1] < n and len(starts) <= _FEW_SEGMENTS:
            starts.append(bisect_right(segments, segments[starts[-1]], starts[-1]))
        if starts[-1] == n and all(segments[start:end].count(segments[start]) == end - start
                                   for start, end in zip(starts, starts[1:])):
            if len(starts) == 2:
                return {segments[0]: items}
            return {segments[start]: items[start:end] for start, end in zip(starts, starts[1:])}
        distinct = dict.fromkeys(segments)
        if len(distinct) <= _FEW_SEGMENTS:
            return {segment: list(compress(items, map(segment.__eq__, segments))) for segment in distinct}
    handled: dict[int, list[StoredMessage]] = {}
    for i, item in enumerate(items):
        if type(item) is STORED and i not in failed:
            of_segment = handled.get(item[SEGMENT])
            if of_segment is None:
                handled[item[SEGMENT]] = [item]
            else:
                of_segment.append(item)
    return handled


class Ticket:
    """One `DurableQueues.submit` call waiting for its group commit: its messages as `Entries`."""

    __slots__ = ("queue", "entries", "done", "error")

    def __init__(self, queue: str, entries: Entries) -> None:
        self.queue = queue
        self.entries = entries
        self.done = False
        self.error: BaseException | None = None

    @classmethod
    def of_call(cls, queue: str, ids: Sequence[str], stamp: float, headers: bytes | None,
                bodies: Sequence[bytes]) -> Ticket:
        """The ticket of one push call's fresh messages (`Entries.of_call`)."""
        return cls(queue, Entries.of_call(ids, stamp, headers, bodies))


def held_halves(messages: list[StoredMessage], wire_sizes: list[int] | None = None) -> list[int]:
    """Half of what each of ``messages`` costs held in memory past `_HELD_OVERHEAD` (its
    tuple, id, numbers), about (`held_bytes` adds them up): the length of its wire form,
    which holds its payload and headers a second time; for one without a wire form, half
    its payload and headers, rounded up. As they are committed and read back, each has a
    wire form: then no Python step per message, and no look at any with ``wire_sizes``,
    the lengths of those forms as `stored_messages` made them."""
    if wire_sizes is not None:
        return wire_sizes
    wires = list(map(wire_of, messages))
    if all(wires):  # (a wire form is never empty: `all` finds a missing one)
        return list(map(len, wires))
    return [len(form) if (form := m[WIRE]) else (len(m[BODY]) + len(m[HEADERS] or b"") + 1) // 2 for m in messages]


def held_bytes(halves: Sequence[int]) -> int:
    """What messages whose `held_halves` are ``halves`` cost held in memory, about."""
    return 2 * sum(halves) + _HELD_OVERHEAD * len(halves)


class Held:
    """The bytes every buffer of a node holds together, about (as `Buffer.held_at_most`
    for one): ``added`` is written under the `DurableQueues` lock, ``reckoned`` by the
    loop alone, so neither needs a lock of its own."""

    __slots__ = ("added", "reckoned")

    def __init__(self) -> None:
        self.added = 0
        self.reckoned = 0

    @property
    def at_most(self) -> int:
        """The bytes held as last reckoned: never less than what is held (any thread)."""
        return self.added - self.reckoned


class Buffer(deque[StoredMessage]):
    """A durable queue's messages held in memory, and the bytes they hold (`reckon`).

    Filled by `DurableQueues` (``extend``, always under its lock: by committing threads
    and the loop's refill, one at a time); the loop's sender takes the oldest with deque's
    own ``popleft``, at no cost per message: what was taken is reckoned up on the loop
    (`reckon`), from the sizes noted as messages came. Without a lock of its own: the
    counters of what was added are written under that lock, those of what was reckoned by
    the loop alone, and a committing thread reads `held_at_most`, which never reckons.
    """

    def __init__(self, held: Held | None = None) -> None:
        super().__init__()
        self._held = Held() if held is None else held  # (what every buffer of the node holds)
        self._sizes: list[int] = []  # `held_halves` of the messages added, oldest first, from `_sizes_from` not yet
        # reckoned up
        self._sizes_from = 0  # (the loop's alone: only the loop drops what it reckoned up, all at once)
        self._added = 0  # messages ever added (counted after their sizes are noted)
        self._added_bytes = 0
        self._reckoned = 0  # messages taken and reckoned up (the loop's alone)
        self._reckoned_bytes = 0

    def extend(self, messages: Iterable[StoredMessage], halves: list[int] | None = None) -> None:
        """Hold ``messages`` too, after the others (``halves``: their `held_halves`, if known).
        Only under the `DurableQueues` lock: one writer at a time."""
        messages = messages if isinstance(messages, list) else list(messages)
        if halves is None:
            halves = held_halves(messages)
        super().extend(messages)
        self._sizes += halves
        added = held_bytes(halves)
        self._added_bytes += added
        self._held.added += added
        self._added += len(halves)

    def reckon(self) -> int:
        """Reckon up the sizes of the messages taken since the last call; the bytes the
        messages still held take, about (payload, headers and overhead). Loop only."""
        # (`_added` before `len`: messages an extend adds meanwhile count as held, not taken)
        taken = self._added - len(self) - self._reckoned
        if taken > 0:
            start = self._sizes_from
            end = start + taken
            reckoned = held_bytes(self._sizes[start:end])
            self._reckoned_bytes += reckoned
            self._held.reckoned += reckoned
            self._reckoned += taken
            if end >= _SIZES_KEPT:
                del self._sizes[:end]
                end = 0
            self._sizes_from = end
        return self.held_at_most

    @property
    def held_at_most(self) -> int:
        """The held bytes as last reckoned (`reckon`): never less than what is held (any thread)."""
        return self._added_bytes - self._reckoned_bytes


class _Queue:
    """One durable queue's buffer, and whether the store holds more than the buffer."""

    __slots__ = ("buffer", "loaded", "overflow", "committed", "too_large")

    def __init__(self, held: Held, loaded: int = 0) -> None:
        self.buffer = Buffer(held)
        self.loaded = loaded  # the highest sequence number ever put in the buffer
        self.overflow = False  # the store holds messages after `loaded` not in the buffer
        self.committed = 0  # the highest sequence number stored for the queue (as far as known)
        self.too_large = False  # the next stored segment fits only in an empty buffer


class DurableQueues:
    """The durable queues of one node: `submit` from any thread, everything else on the loop."""

    def __init__(self, store: Store, codec: Codec, stats: Stats,
                 later: Callable[[float, Callable[[], None]], Any], wake_soon: Callable[[float], None],
                 max_buffered_bytes: int = 8 * BUFFER_BYTES,
                 offered: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.store = store
        self.max_buffered_bytes = max_buffered_bytes
        """What the buffers of every queue hold together at most (bytes, as `held_bytes`
        counts them; a message read back alone into an empty buffer may pass it)."""
        self.offered = offered
        """The queues pullers offer now, as a table replaced whole when it changes (any
        thread): a queue parked (`Store.park`) is read back once it appears there. None:
        every queue is taken for pulled."""
        self.taken: Callable[[str], bool] | None = None if offered is None else \
            (lambda queue: bool(offered().get(queue)))
        """Whether a queue has pullers now (`offered`); a commit to one that has none stays
        in the store only, so that queues nobody pulls take no share of
        `max_buffered_bytes` from those that are pulled. None: every queue is."""
        self._offered_seen: Mapping[str, Any] = {}
        # the store may have parked queues (`Store.parked`): a commit to a queue this node
        # holds nothing of looks there (written under `_lock`)
        self._parked = False
        self._parking = True  # (off for the run if the store's parked queues could not be made anew: `recover`)
        # queues a commit parked that pullers offered at the last `refill`: their offer may have
        # gone and come back since, unseen by it (written under `_lock`)
        self._recheck: set[str] = set()
        self.held = Held()
        self.codec = codec
        self._pack = msgpack.Packer().pack  # (a Packer keeps a buffer: used under `_lock` only)
        self.stats = stats
        self.later = later
        self.wake_soon = wake_soon
        self._wake_pending = False
        self._ack_timer: Any = None
        # segment first seq -> [count, messages not settled]: registered when committed
        # (under the lock) or read back; then the loop's alone
        self._segments: dict[int, list[int]] = {}
        self._done: list[tuple[int, int]] = []  # segments all settled, to forget
        self._settled: dict[int, list[int]] = {}  # messages settled in segments still open, by segment
        self._unflushed = 0
        self._forget_failures = 0  # in a row (`flush_acknowledged`)
        # messages given up on whose move to their dead-letter queue failed: tried again later
        # (`_retry_dead_letters`), never dealt again meanwhile (their puller would give up at once)
        self._dead_letters: list[tuple[str, StoredMessage, Failure]] = []
        self._dead_letter_failures = 0  # in a row
        self._dead_letter_timer: Any = None
        self.queues: dict[str, _Queue] = {}
        # the queues with messages to deal or to read back: a pass of the loop looks at
        # these only, not at every queue ever used (written under `_lock`; the loop reads
        # it in one C call, and removes an idle one under the lock: `reckon`)
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._gathered: deque[Ticket] = deque()  # calls waiting for their turn (see commit_in_turn)
        self._recovered_upto = 0

    def _queue(self, name: str, first: int = 0) -> _Queue:
        """The queue ``name`` (under the lock), made if this node holds nothing of it:
        ``first`` is the sequence number of the first of its messages stored since (what
        the store holds before it was read before the queue was forgotten, `reckon`, or
        there is none; 0 at recovery, which reads them all)."""
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue(self.held, max(0, first - 1))
        return queue

    def _overflowed(self, name: str, upto: int) -> None:
        """The store holds messages of ``name`` up to ``upto`` not in its buffer."""
        with self._lock:
            self._overflowed_locked(name, upto)

    def _overflowed_locked(self, name: str, upto: int, first: int = 0) -> None:
        """`_overflowed`, under the lock; ``first`` as `_queue` takes it."""
        queue = self._queue(name, first)
        queue.overflow = True
        queue.committed = max(queue.committed, upto)
        self._active.add(name)

    def _unparked(self, name: str, parked: tuple[int, int]) -> _Queue:
        """Make the queue ``name`` that was parked with ``parked`` (`Store.parked`): what
        the store holds of it is read back from there (under the lock)."""
        first, last = parked
        queue = self.queues[name] = _Queue(self.held, first - 1)
        queue.overflow = True
        queue.committed = last
        self._active.add(name)
        return queue

    def unpark(self, names: Iterable[str]) -> None:
        """Read back, from now on, the queues among ``names`` that are parked (loop only):
        a puller or a keeper of them appeared. A store that fails leaves them parked, and
        the next `refill` looks at every queue pullers offer again."""
        with self._lock:
            if not self._parked:
                return
            found = False
            for name in names:
                if name in self.queues:
                    continue
                try:
                    parked = self.store.unpark(name)
                except Exception as exc:
                    log.error("cannot read back the durable queue %r nobody pulled until now: %s", name, exc)
                    self._offered_seen = {}  # (the next `refill` tries every offered queue again)
                    self.wake_soon(1.0)
                    continue
                if parked is not None:
                    self._unparked(name, parked)
                    found = True
            if found:
                try:
                    self._parked = self.store.any_parked()
                except Exception as exc:  # (taken for yes: looked at again at the next one)
                    log.debug("cannot tell whether durable queues are still parked: %s", exc)
                self.wake_soon(0.0)

    def recover(self) -> int:
        """Note the messages left in the store by an earlier run; how many there are."""
        stored = self.store.queues()
        self._recovered_upto = self.store.last_seq()
        parked = False
        if self.taken is not None and self.store.parks:
            try:  # none in memory: each is read back once a puller of it appears (`unpark`)
                self._parked = self.store.park_all() > 0
                parked = True
            except Exception as exc:  # (its rows are left as they were: none is parked this run)
                self._parking = False
                log.warning("cannot park the durable queues of %s (%s): they are held in memory",
                            self.store.directory, exc)
        if not parked:
            # every queue with a row, whatever its count says, up to its own last message: a
            # queue reads the store until then, and never again once it has it all
            for name, last in self.store.queue_tails().items():
                self._overflowed(name, last)
        total: int = sum(q["messages"] for q in stored.values())
        if total:
            log.info("%d durable message(s) in %d queue(s) left from an earlier run", total, len(stored))
        return total

    def submit(self, name: str, entries: list[Entry]) -> None:
        """Commit ``(id, timestamp, headers, body, attempts, redelivered)`` messages to the store (any
        thread; on the loop's, the loop waits for the commit); the loop deals them. Raises
        `StoreFullError`, `StoreError`: then none of them is stored."""
        self.commit_in_turn(Ticket(name, Entries.of_rows(entries)))

    @staticmethod
    def ticket(queue: str, ids: Sequence[str], stamp: float, headers: bytes | None, bodies: Sequence[bytes]) -> Ticket:
        """The `Ticket` of one push call's fresh messages, to commit (`commit_in_turn`,
        `submit`). (Asked of the node's queues: a function-level import of `Ticket` cost a
        durable push 0.56 us, an AttributeError raised and caught by Python 3.11's import
        of a name from a module.) Raises nothing."""
        return Ticket.of_call(queue, ids, stamp, headers, bodies)

    def commit_in_turn(self, ticket: Ticket) -> None:
        """Commit ``ticket``'s messages, blocking the calling thread until they are stored;
        raises what kept them out (`StoreFullError`, `StoreError`).

        Group commit: while one thread commits, the calls of other threads gather, and the
        next thread to take the turn commits all of them in one transaction (the others
        find theirs done). A lone caller commits at once, as without grouping.
        """
        self._gathered.append(ticket)
        with self._lock:
            if not ticket.done:
                gathered, group = self._gathered, []
                while gathered:  # only the turn's holder takes from it
                    group.append(gathered.popleft())
                if ticket not in group:  # (taken by a turn that a Ctrl-C cut short before its commit)
                    group.append(ticket)
                self._commit_group(group)
        if ticket.error is not None:
            raise ticket.error

    def commit_group(self, group: list[Ticket]) -> None:
        """Commit the tickets' messages in one transaction and buffer them for the loop;
        each ticket ends done, with the error that kept it out of the store if any. When
        the group's transaction fails, each ticket is tried alone, so one call's error (a
        full store) is never another's."""
        with self._lock:
            self._commit_group(group)

    def _commit_group(self, group: list[Ticket]) -> None:
        # the lock is held around the commit and the buffer: the order of sequence numbers
        # and the buffer (and the loop's refill) can then never disagree
        given = self.store.last_seq()  # (the group's numbers come after it)
        interrupted: BaseException | None = None
        try:
            self._commit([(t.queue, t.entries) for t in group])
            commits = 1
        except BaseException as exc:
            commits = 0
            if not isinstance(exc, Exception):  # a Ctrl-C's KeyboardInterrupt, anywhere in the commit
                interrupted = exc
                commits = self._after_interrupted_commit(group, given)
            if not commits:  # (none of it stored)
                commits = self._commit_each_alone(group, exc)
        for ticket in group:
            ticket.done = True
        if commits:
            self.stats.add("pipeline", "durable_commits", commits)
            self.stats.add("pipeline", "durable_stored", sum(len(t.entries) for t in group if t.error is None))
        if not self._wake_pending:
            # the loop deals durable messages a moment later, several to a batch: a
            # producer that commits one at a time would otherwise get batches of one
            self._wake_pending = True
            self.wake_soon(_COALESCE_S)
        if interrupted is not None:
            raise interrupted

    def _commit_each_alone(self, group: list[Ticket], exc: BaseException) -> int:
        """After ``group``'s commit failed with ``exc``, each ticket tried alone: one call's
        error is never another's; how many commits stored (under the lock)."""
        if len(group) == 1:
            group[0].error = exc
            return 0
        log.debug("a group commit of %d calls failed (%s); committing them one by one", len(group), exc)
        commits = 0
        for ticket in group:
            try:
                self._commit([(ticket.queue, ticket.entries)])
                commits += 1
            except BaseException as alone:
                ticket.error = alone
        return commits

    def _after_interrupted_commit(self, group: list[Ticket], given: int) -> int:
        """After a commit of ``group`` interrupted (its numbers come after ``given``):
        what its transaction stored, if it committed, the loop reads back from the store
        (it may not have reached the buffers: left there, it would wait for a restart);
        1 if it committed, else 0 (under the lock)."""
        try:
            upto = self.store.last_seq()
            stored = self.store.next_segment_bytes(group[0].queue, given) is not None
        except Exception as exc:  # (the store failed: what it holds is read back at the next refill)
            log.warning("after an interrupted durable commit, the store cannot be read: %s", exc)
            return 0
        if not stored:  # (nothing to read back: a queue marked overflowed would stay so, its next push spilled)
            return 0
        for name in {t.queue for t in group}:
            self._overflowed_locked(name, upto, given + 1)
            self._loaded_as_buffered(self.queues[name])
        return 1

    @staticmethod
    def _loaded_as_buffered(queue: _Queue) -> None:
        """Bring ``queue.loaded`` up to the last message its buffer holds: a commit
        interrupted between its buffer's ``extend`` and noting it leaves ``loaded`` short,
        and the loop would read those messages back and deal them twice (under the lock)."""
        try:
            last = queue.buffer[-1][SEQ]
        except IndexError:  # (empty, or emptied by the loop's sender meanwhile)
            return
        queue.loaded = max(queue.loaded, last)

    def _commit(self, calls: list[tuple[str, Entries]]) -> None:
        """One transaction for the messages of ``calls``, then into their buffers. Calls
        for the same queue are stored together, in order: one segment, not one each."""
        merged: dict[str, list[Entries]] = {}
        for name, entries in calls:
            merged.setdefault(name, []).append(entries)
        order = [(name, Entries.joined(parts)) for name, parts in merged.items()]
        known, taken = self.queues, self.taken
        park: set[str] = set()  # queues this node holds nothing of that nobody pulls: parked
        unpark: dict[str, tuple[int, int]] = {}  # parked queues that are pulled now
        if taken is not None and self._parking and self.store.parks:
            for name, _ in order:
                if name not in known:
                    if not taken(name):
                        park.add(name)
                        if name in self._offered_seen:
                            self._recheck.add(name)
                    elif self._parked:
                        parked = self.store.parked(name)
                        if parked is not None:
                            unpark[name] = parked
        segments = iter(self.store.append(order, park, list(unpark)))
        if park:
            self._parked = True
        spilled = 0  # messages that stay in the store only, for now
        for name, entries in order:
            parts: list[tuple[int, int]] = []
            stored_count = 0
            while stored_count < len(entries):
                first, count = next(segments)
                parts.append((first, count))
                stored_count += count
            if name in park:
                spilled += len(entries)
                continue
            parked = unpark.get(name)
            queue = self._queue(name, parts[0][0]) if parked is None else self._unparked(name, parked)
            queue.committed = parts[-1][0] + parts[-1][1] - 1  # (a commit stores one message at least)
            self._active.add(name)
            buffer = queue.buffer
            if queue.overflow or len(buffer) + len(entries) > BUFFER or (taken is not None and not taken(name)):
                queue.overflow = True  # (the loop reads them back as the buffer empties, once pulled)
                spilled += len(entries)
                continue
            stored, wire_sizes = self._held(name, entries, parts)
            halves = held_halves(stored, wire_sizes)
            size = held_bytes(halves)
            if buffer.held_at_most + size > BUFFER_BYTES or self.held.at_most + size > self.max_buffered_bytes:
                queue.overflow = True  # (past its own bound, or what every buffer may hold together)
                spilled += len(entries)
            else:
                # (a segment is noted once it is to deal: one the store only holds, when read back)
                for first, count in parts:
                    self._segments[first] = [count, count]
                buffer.extend(stored, halves)
                queue.loaded = stored[-1][SEQ]
        if spilled:
            self.stats.add("pipeline", "durable_spilled", spilled)

    def _held(self, name: str, entries: Entries, parts: list[tuple[int, int]],
              ) -> tuple[list[StoredMessage], list[int] | None]:
        """The messages ``entries`` of queue ``name``, just stored as the segments ``parts``,
        as the buffer holds them: with their wire form made here, off the loop; and the
        lengths of those forms (`stored_messages`). (Under the lock: `_pack` is one thread's
        at a time.)"""
        ids, stamps, headers, bodies, attempts, marked = entries.columns()
        segments = chain.from_iterable(repeat(first, size) for first, size in parts)
        return stored_messages(name, parts[0][0], segments, ids, stamps, headers, bodies, attempts, marked, self._pack)

    def refill(self, also: Iterable[str] = (), every: bool = False) -> dict[str, Buffer]:
        """Top up from the store the buffers of queues it holds more of; the buffers of the
        queues with messages to deal (and of those named in ``also`` that are durable
        queues, e.g. with messages to deal again), or of ``every`` queue (loop only). Only
        the queues `taken` says someone pulls now are read back (but with ``every``: a
        stop hands them all to keepers): what the store holds for the others stays there,
        out of memory, until then. Parked queues that pullers offer since the last call
        are brought back first (`unpark`)."""
        taken = None if every else self.taken
        self._wake_pending = False
        if self.offered is not None:
            offered = self.offered()
            if offered is not self._offered_seen:  # (pullers came or went)
                fresh = offered.keys() - self._offered_seen.keys()
                self._offered_seen = offered
                if fresh:
                    # (looked at under the lock: a commit that parked one of them, having seen
                    # the offers before they changed, did so before this looks)
                    self.unpark(fresh)
        if self._recheck and self.taken is not None:
            with self._lock:
                recheck, self._recheck = self._recheck, set()
            pulled = [name for name in recheck if self.taken(name)]
            if pulled:
                self.unpark(pulled)
        if not self.queues:  # the common case on a node with a store: nothing durable yet
            return {}
        known = self.queues
        names = set(known if every else self._active)  # (one C call: a committing thread may add one)
        names.update(name for name in also if name in known)
        queues = [(name, known[name]) for name in names]  # (only the loop forgets a queue: `reckon`)
        if not any(q.overflow for _, q in queues):
            # nothing to read, so no lock either (a committing thread holds it); a queue
            # that overflows after this look wakes the loop for another refill
            return {name: q.buffer for name, q in queues}
        for name, queue in queues:
            if not self._wants_reading(queue) or (taken is not None and not taken(name)):
                continue
            # a read that brought little to deal (its segments mostly settled, or damaged)
            # reads on: a few deliveries, each waited for, would bring the rest at a crawl
            while self._read_back(name, queue) and self._wants_reading(queue) and len(queue.buffer) < _REFILL_CHUNK:
                pass
        return {name: q.buffer for name, q in queues}

    def reckon(self, buffers: Mapping[str, Buffer], busy: Callable[[], Container[str]] = frozenset) -> None:
        """Reckon up what the loop dealt from ``buffers`` (those `refill` gave), so that
        committers' estimates (`Buffer.held_at_most`) stay near; a queue left with nothing
        to deal, nor any in flight or to deal again (``busy()`` names those: looked at again
        until then), is forgotten (loop only, after dealing): a node that pushed to many
        queue names keeps no state for those it has nothing of (if the queue is made again,
        it reads back only what is stored after: `_queue`). One with messages still to read
        back is forgotten too while nobody pulls it: parked (`Store.park`)."""
        idle = []
        for name, buffer in buffers.items():
            buffer.reckon()
            if not buffer:
                idle.append(name)
        if idle:
            kept = busy()
            taken, parks = self.taken, self._parking and self.store.parks
            with self._lock:  # (a commit that refills one meanwhile makes it active again)
                for name in idle:
                    queue = self.queues.get(name)
                    if queue is None or queue.buffer or name in kept:
                        continue
                    if queue.overflow:
                        if taken is None or not parks or taken(name):
                            continue
                        try:
                            self.store.park(name, queue.loaded + 1, queue.committed)
                        except Exception as exc:  # (kept in memory: parked at a later pass)
                            log.debug("cannot park the durable queue %r: %s", name, exc)
                            continue
                        self._parked = True
                    self._active.discard(name)
                    del self.queues[name]

    def _wants_reading(self, queue: _Queue) -> bool:
        """Whether to read ``queue``'s next segments back now: it has some in the store only,
        its buffer runs low, and the buffers together have room (an empty buffer reads one
        segment whatever they hold: a queue with a puller is never held up by the others)."""
        buffer = queue.buffer
        return queue.overflow and len(buffer) < _REFILL_BELOW and buffer.reckon() < _REFILL_BELOW_BYTES \
            and not (queue.too_large and buffer) and (not buffer or self.held.at_most < self.max_buffered_bytes)

    def _read_back(self, name: str, queue: _Queue) -> bool:
        """Read the next segments of ``name`` into its buffer; False when there was nothing
        to read now."""
        buffer = queue.buffer
        room = min(BUFFER - len(buffer), _REFILL_CHUNK)
        # read without the lock (committers wait for it): while a queue overflows they
        # leave its buffer alone, and only note how far they stored
        # (reckoned by `_wants_reading`, just before; halved: a message read back holds its
        # wire form too, twice its stored bytes, as `held_bytes` counts it); within what the
        # buffers may hold together
        own = (BUFFER_BYTES - buffer.held_at_most) // 2
        budget = max(1, min(own, (self.max_buffered_bytes - self.held.at_most) // 2))  # (0 would read nothing,
        # not even the one segment an empty buffer takes whatever the budget)
        segments = self.store.pending(name, after=queue.loaded, limit=room, max_bytes=budget,
                                      at_least_one=not buffer, upto=queue.committed)
        if not segments and buffer and budget == own:  # the next segment is larger than the room
            # left (it then waits for an empty buffer, not read again meanwhile), or none is stored yet
            queue.too_large = (self.store.next_segment_bytes(name, queue.loaded) or 0) > budget
        recovered = self._recovered_upto
        with self._lock:
            for segment in segments:
                damaged = segment.damaged or self._unreadable(segment)
                if damaged:  # left in the store for an operator, never forgotten
                    log.error("store %s, queue %r: %s; skipped", self.store.directory, name, damaged)
                    self.stats.reject("store_damaged", segment.size)
                else:
                    if segment.first not in self._segments:  # (noted once read: `_commit`)
                        self._segments[segment.first] = [segment.size, len(segment.messages)]
                        if not segment.messages:  # all settled, only not yet forgotten
                            self._forget_segment(segment.first)
                    if segment.first > recovered:  # (the common case: stored by this run)
                        buffer.extend(segment.messages, held_halves(segment.messages, segment.wire_sizes))
                    else:
                        buffer.extend(as_recovered(m) if m[SEQ] <= recovered else m for m in segment.messages)
                queue.loaded = segment.first + segment.size - 1
                queue.too_large = False
            if queue.committed <= queue.loaded:
                queue.overflow = False  # everything stored is in the buffer now
        return bool(segments)

    def _unreadable(self, segment: StoredSegment) -> str | None:
        """Why a puller would refuse the messages of ``segment``, read back from the store
        (`unreadable`), or None; a segment this run committed is not looked at (its
        messages came from the codec), whether it went to the buffer at once or stayed in
        the store while the queue overflowed."""
        if segment.first > self._recovered_upto or segment.first in self._segments:
            return None
        why = unreadable(segment.messages)
        return None if why is None else f"damaged segment {segment.first} ({segment.size} messages): {why}"

    def settle(self, queue: str, items: list[Any], failures: list[Failure], stored: bool = False) -> list[Any]:
        """A puller answered for a batch: forget what it handled, dead-letter what it gave
        up on, count an attempt on the rest and return them to be dealt again (``stored``:
        its items are all durable, `StoredMessage`)."""
        failed = {f.position: f for f in failures}
        retry: list[Any] = []
        attempted: list[int] = []
        for segment, messages in handled_by_segment(items, failed, stored).items():
            self._settle_in(segment, messages)
        for index, failure in failed.items():
            item = items[index]
            if type(item) is not STORED:
                continue
            if failure.dead_letter:
                if self._dead_letters:  # (the store failed the last move: this one waits its turn)
                    self._dead_letters.append((queue, item, failure))
                    continue
                try:
                    self._dead_letter(queue, item, failure)  # (the move marks it settled in the store)
                    self._settle_in(item[SEGMENT], [item], marked=True)
                except Exception as exc:  # e.g. a full store: the move is tried again later
                    self._dead_letters.append((queue, item, failure))
                    self._dead_letter_failed(exc)
                continue
            attempted.append(item[SEQ])
            retry.append(with_attempt(item))
        if attempted:
            try:
                self.store.count_attempt(attempted)
            except Exception as exc:  # the count is lost, the messages are not
                log.error("cannot count failed deliveries of %r: %s", queue, exc)
        if self._unflushed >= _ACK_BATCH and not self._forget_failures:  # (after a failure: its timer)
            self.flush_acknowledged()
        elif self._unflushed and self._ack_timer is None:
            self._ack_timer = self.later(_ACK_DELAY_S, self.flush_acknowledged)
        return retry

    def _settle_in(self, first: int, messages: list[StoredMessage], marked: bool = False) -> None:
        """The ``messages`` of the segment ``first`` are settled (``marked``: the store
        already says so)."""
        segment = self._segments.get(first)
        if segment is None:  # settled before (a late answer)
            return
        segment[1] -= len(messages)
        self._unflushed += len(messages)
        if segment[1] <= 0:
            self._forget_segment(first)
        elif not marked:  # (their numbers, to mark in the store: only for a segment still open)
            self._settled.setdefault(first, []).extend(map(seq_of, messages))

    def _dead_letter_failed(self, exc: Exception) -> None:
        """A move to a dead-letter queue failed: the messages given up on wait in
        `_dead_letters` (still stored, not settled: after a restart they are dealt again,
        and given up on again), and the moves are tried again after a delay that doubles
        with each failure in a row."""
        self._dead_letter_failures += 1
        delay = _retry_delay(self._dead_letter_failures)
        counters = self.stats.pattern["pipeline"]
        counters["dead_letter_failed"] = counters.get("dead_letter_failed", 0) + 1
        log.error("cannot dead-letter %d message(s) given up on: %s; trying again in %.1f s",
                  len(self._dead_letters), exc, delay)
        if self._dead_letter_timer is None:
            self._dead_letter_timer = self.later(delay, self._retry_dead_letters)

    def _retry_dead_letters(self) -> None:
        """Try the moves to dead-letter queues that failed again, oldest first."""
        self._dead_letter_timer = None
        waiting, self._dead_letters = self._dead_letters, []
        for at, (queue, item, failure) in enumerate(waiting):
            try:
                self._dead_letter(queue, item, failure)
            except Exception as exc:
                self._dead_letters = waiting[at:] + self._dead_letters
                self._dead_letter_failed(exc)
                return
            self._settle_in(item[SEGMENT], [item], marked=True)
        self._dead_letter_failures = 0
        self.wake_soon(0.0)  # (the dead letters are to deal: nothing else wakes the loop's sender now)
        if self._unflushed and self._ack_timer is None:
            self._ack_timer = self.later(_ACK_DELAY_S, self.flush_acknowledged)

    def _forget_segment(self, first: int) -> None:
        count = self._segments.pop(first)[0]
        self._settled.pop(first, None)
        self._done.append((first, count))

    def flush_acknowledged(self) -> None:
        """Forget the segments whose messages are all settled, and mark the messages
        settled in the others, in one transaction.

        Settlements are gathered for up to `_ACK_DELAY_S` (or `_ACK_BATCH` of them): a write
        per acknowledgement would halve the rate of durable pushes, and one per 2,048 still
        cost a tenth of it (the write is on the way from the acknowledgements to the next
        deal, and waits for any commit under way). A crash before the write only means
        those messages are delivered again (marked redelivered). A write that fails (a
        full disk) is tried again, after a delay that doubles with each failure in a row.
        """
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if not self._unflushed:
            return
        done, self._done = self._done, []
        settled, self._settled = self._settled, {}
        ranges: list[tuple[int, int]] = []
        for seqs in settled.values():
            start = len(ranges)  # each segment's ranges stay within it (they go with it)
            for seq in sorted(seqs):
                if len(ranges) > start and seq == ranges[-1][1] + 1:
                    ranges[-1] = (ranges[-1][0], seq)
                else:
                    ranges.append((seq, seq))
        unflushed, self._unflushed = self._unflushed, 0
        try:
            self.store.forget(done, ranges)
        except Exception as exc:  # they stay in the store, still to forget: tried again
            self._done[:0] = done
            for first, seqs in settled.items():
                if seqs:
                    self._settled.setdefault(first, []).extend(seqs)
            self._unflushed += unflushed
            self._forget_failures += 1
            delay = _retry_delay(self._forget_failures)
            log.error("cannot forget %d settled segment(s) and %d settled message(s): %s; trying again in %.1f s",
                      len(done), sum(len(seqs) for seqs in settled.values()), exc, delay)
            self._ack_timer = self.later(delay, self.flush_acknowledged)
            return
        self._forget_failures = 0

    def _bring_in(self, name: str) -> None:
        """Hold the queue ``name`` in memory before a message is moved to its end: if it
        was parked, it reads back from where its parked messages begin; if not, from the
        message moved on (`reckon` parks it again if nobody pulls it). Raises what the
        store raised: then nothing is moved (under the lock)."""
        if name in self.queues:
            return
        parked = self.store.unpark(name) if self._parked else None
        if parked is None:
            self._queue(name, self.store.last_seq() + 1)
        else:
            self._unparked(name, parked)

    def _dead_letter(self, queue: str, item: StoredMessage, failure: Failure) -> None:
        headers: dict[str, str] = {}
        msg_id, attempts = item[ID], item[ATTEMPTS]
        if item[HEADERS]:
            try:
                decoded = self.codec.decode(item[HEADERS])
                headers = decoded if isinstance(decoded, dict) else {}
            except Exception:
                headers = {}
        headers = _dead_letter_headers(msg_id, headers, {
            "x-original-queue": queue,
            "x-attempts": str(attempts + 1),
            "x-last-error": failure.error[:_MAX_ERROR_CHARS],
        })
        dead = wire.dead_letter_queue(queue, failure.dead_letter)
        encoded = self.codec.encode(headers)
        # the move and its note in one hold of the lock: a commit to ``dead`` in between would
        # buffer messages numbered after the moved one, and `_read_back` reads only past them
        with self._lock:
            self._bring_in(dead)
            self._overflowed_locked(dead, self.store.move(item, dead, encoded))
        counters = self.stats.pattern["pipeline"]
        counters["dead_lettered"] = counters.get("dead_lettered", 0) + 1
        log.warning("message %r of %r dead-lettered to %r after %d attempt(s): %r",
                    msg_id[:12], queue, dead, attempts + 1, failure.error[:200])


def _dead_letter_headers(msg_id: str, headers: dict[str, str], reasons: dict[str, str]) -> dict[str, str]:
    """The headers of a dead letter: ``reasons`` (the ``x-`` headers saying why), and of the
    message's own ``headers`` as many as fit beside them within `wire.MAX_HEADERS` and
    `wire.MAX_HEADER_BYTES`, in order (a puller refuses a batch with more, so a dead letter
    past them would never be delivered, nor the others dealt with it); those left out are
    logged. Raises nothing."""
    kept: dict[str, str] = {}
    room = wire.MAX_HEADER_BYTES - sum(len(k.encode()) + len(v.encode()) for k, v in reasons.items())
    dropped = 0
    for key, value in headers.items():
        if key in reasons:
            continue
        if not isinstance(key, str) or not isinstance(value, str):  # (a damaged row's)
            dropped += 1
            continue
        size = len(key.encode()) + len(value.encode())
        if len(kept) + len(reasons) < wire.MAX_HEADERS and size <= room:
            kept[key] = value
            room -= size
        else:
            dropped += 1
    if dropped:
        log.warning("dead letter %r: %d of its headers left out (at most %d headers, %d bytes, with the x- ones)",
                    msg_id[:12], dropped, wire.MAX_HEADERS, wire.MAX_HEADER_BYTES)
    return kept | reasons
