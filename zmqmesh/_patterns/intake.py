"""The puller's side of at-least-once and durable queues, and the keeper's intake.

A batch dealt to this node becomes one call per message (or, for a sync handler the
driver runs in place, a call of the handler as each is decoded), with a `BatchAck` that
answers the pusher once every message of the batch was handled, naming the durable
items whose handler failed (and the dead-letter queue of those that used up their
deliveries); a batch a stop cut short is answered, as the sockets close, naming the items
left unhandled (`AckedIntake.answer_left`). A dedupe puller skips what it already handled and commits each id as its
handler returns. A keeper stores what a stopping pusher hands over before acknowledging
it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .._ids import uuid4_hex
from .._mesh.directory import Directory
from .._mesh.registry import MAX_OFFERS, PullOptions, Registry
from .._observe import tracing
from .._stats import LogThrottle, Stats
from .._store.messages import INTEGER_MAX, Entry, joins
from .._wire import frames as wire
from .._wire.codec import DURABLE_ITEM_FIELDS, Codec
from ..errors import DecodeError
from ..message import Message, Origin, durable_deliveries, durable_delivery
from .calls import BatchAck, Call, handler_raised, is_async

if TYPE_CHECKING:
    from .._store.store import Store

__all__ = ["AckedIntake"]

log = logging.getLogger("zmqmesh.inbox")

_TRIM_EVERY = 10_000  # remembered ids between trims of a dedupe window
UNRECORDED_LOG_S = 10.0
"""At most one log line per this many seconds for the handled ids the store could not
record (a full store refuses every one: a line per message flooded the log)."""
_MAX_GUARDS = MAX_OFFERS  # (more than the queues a registry holds: past it, only guards of pulls gone are)
_DEFAULT_WINDOW = PullOptions().dedupe_window  # (of a queue whose pull was dropped meanwhile)


class AckedIntake:
    """At-least-once batches in, acknowledgements out (on the inbox's owner thread)."""

    def __init__(self, *, registry: Registry, directory: Directory, codec: Codec, stats: Stats,
                 store: Store | None, keeper: Callable[[str, list[Entry]], None] | None,
                 reply: Callable[[tuple[bytes, bytes], bytes, bytes], None],
                 in_place: Callable[[list[Callable[..., Any]]], bool] = lambda handlers: False,
                 left_at_stop: Callable[[str, Any, int], None],
                 abandoned: Callable[[], bool] = lambda: False,
                 refused_by_stop: Callable[[BaseException], bool] = lambda error: False,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.registry = registry
        self.stopping = stopping  # whether the node's stop has begun: it keeps nothing more (`keep`)
        self.refused_by_stop = refused_by_stop  # whether a handler's error is its stopping node refusing it
        self.in_place = in_place  # whether the driver lets these handlers run as they are decoded
        self.abandoned = abandoned  # whether a stop's deadline passed (what is left is not handled)
        # counts ``(pattern, route, count)`` left unhandled at a stop, for its warning
        self.left_at_stop = left_at_stop
        self.directory = directory
        self.codec = codec
        self.stats = stats
        self._received_names = stats.names("pipeline", "received")  # (the dispatcher's thread, as it)
        self.store = store
        self.keeper = keeper
        self.reply = reply
        self._guards: dict[tuple[Callable[..., Any], str], Callable[..., Any]] = {}
        self._remembered: dict[str, int] = {}
        self._remember_lock = threading.Lock()
        # ids remembered this run, oldest first, per queue (an OrderedDict drops its oldest in
        # constant time; a dict's first key is found past every slot deleted before it)
        self._handled: dict[str, OrderedDict[str, None]] = {}
        self._unrecorded_log = LogThrottle(UNRECORDED_LOG_S)  # (`_unrecorded`)
        self._trim_failed_log = LogThrottle(UNRECORDED_LOG_S)  # (`_remember`)
        self._cut: list[BatchAck] = []  # batches a stop cut short, to answer as the sockets close (`leave`)

    def forget_unpulled(self) -> None:
        """Forget the ids this run remembered for the queues no longer pulled (call when
        the pulls may have changed): pulled again, their batches are checked against the
        store as any are (up to `dedupe_window` ids a queue otherwise stayed in memory)."""
        queues = self.registry.queues
        for queue in [queue for queue in self._handled if queue not in queues]:
            del self._handled[queue]
            self._remembered.pop(queue, None)

    def decode(self, queue: str, route: tuple[bytes, bytes], body: bytes, sender_id: str | None,
               calls: list[Call]) -> None:
        """Turn a batch dealt to this node into calls, answering at once what needs no handler."""
        handler = self.registry.queues.get(queue)
        if handler is None or queue not in self.registry.ack_queues:
            self.reply(route, wire.STATUS_NO_SERVICE, b"")  # the pusher deals them elsewhere
            return
        items = self.codec.decode_batch(body)
        checked = _durable_columns(items) if len(items) >= _COLUMNS_FROM else None
        if checked is None and not all(map(_valid_item, items)):
            raise DecodeError("malformed at-least-once batch")
        columns, float_stamps = checked if checked is not None else (None, False)
        self.stats.pattern["pipeline"]["received"] += len(items)
        self._received_names.add(queue, len(items))
        if sender_id in self.directory.alive_ids:  # (members only: a stranger could claim any number of ids)
            self.stats.peer_received[sender_id] += len(items)
        options = self.registry.pull_options.get(queue) or PullOptions(at_least_once=True)
        ack = BatchAck(route, len(items), queue, options)
        ack.sender = sender_id
        seen: set[str] | None = None
        if options.dedupe and self.store is not None:
            seen = self.store.handled.seen(queue, [i[2] for i in items if len(i) == DURABLE_ITEM_FIELDS])
        # a bare item is named by its batch and place, as the pusher names it on a redelivery
        origin = Origin(f"{sender_id}/{route[1].hex()}/", 0, None) if sender_id is not None else None
        lookup = self.directory.lookup_peer
        # sync handlers the driver runs as messages are decoded: called here, without a call
        # object each (a durable batch's receiver went from 4.8-6.1 to 3.3-4.2 us a message);
        # the batch is acknowledged as it would be once its calls ran, and not at all if a
        # stop's deadline cuts it short
        in_place = seen is None and tracing.active is None and self.in_place([handler])
        # (looked up once a batch, not once a message)
        sent_at, abandoned, max_deliveries = wire.sent_at, self.abandoned, options.max_deliveries
        if in_place and columns is not None and float_stamps and _finite(columns[3]) and max(columns[5]) < max_deliveries:
            # (the common durable batch: every item as `sent_at` and the checks below would
            # leave it, so its messages are made in one call)
            flags, datas, ids, stamps, headers, attempts = columns
            self._handle_in_place(ack, handler, durable_deliveries(queue, datas, sender_id, lookup, ids, stamps,
                                                                   headers, attempts, flags))
            return
        for index, item in enumerate(items):
            durable = len(item) == DURABLE_ITEM_FIELDS
            if durable:
                stamp = sent_at(item[3])
                msg = durable_delivery(queue, item[1], sender_id, lookup, item[2], stamp, item[4], item[5],
                                       item[0])
                if stamp is None:  # (a stranger's clock: durable all the same, see `_settle`)
                    if ack.unstamped is None:
                        ack.unstamped = set()
                    ack.unstamped.add(index)
                if seen is not None and item[2] in seen:  # (its id) handled before (its ack was lost): effectively once
                    counters = self.stats.pattern["pipeline"]
                    counters["deduplicated"] = counters.get("deduplicated", 0) + 1
                    ack.remaining -= 1
                    continue
                if item[5] >= max_deliveries:  # (its `attempts`) e.g. it timed out every time
                    ack.failures.append([index, options.dead_letter_queue(queue),
                                         f"no acknowledgement after {item[5]} deliveries"])
                    ack.remaining -= 1
                    continue
            else:
                msg = Message("pipeline", queue, item[1], sender_id, lookup, origin, index)
                msg.redelivered = item[0]
            if in_place:
                if abandoned():  # (as the driver drops the calls reached after the deadline)
                    self._cut_at(ack, index, len(items))
                    return
                try:
                    handler(msg)
                except Exception as exc:
                    if self._failed_in_place(ack, handler, msg, index, len(items), exc):
                        return
                else:
                    ack.remaining -= 1
                continue
            guarded = self._once(handler, queue) if seen is not None and durable else handler
            calls.append(Call(guarded, msg, ack, "pipeline").in_batch(index))
        if ack.remaining == 0:
            self._acknowledge(ack)

    def _handle_in_place(self, ack: BatchAck, handler: Callable[..., Any], messages: list[Message]) -> None:
        """Call ``handler`` for each of ``messages``, the whole batch of ``ack``, in place (as
        `decode` does, a message at a time), and acknowledge the batch once all were."""
        abandoned, count = self.abandoned, len(messages)
        for index, msg in enumerate(messages):
            if abandoned():  # (as the driver drops the calls reached after the deadline)
                self._cut_at(ack, index, count)
                return
            try:
                handler(msg)
            except Exception as exc:
                if self._failed_in_place(ack, handler, msg, index, count, exc):
                    return
            else:
                ack.remaining -= 1
        if ack.remaining == 0:
            self._acknowledge(ack)

    def _failed_in_place(self, ack: BatchAck, handler: Callable[..., Any], msg: Message, index: int, count: int,
                         exc: Exception) -> bool:
        """``handler``, run in place for the item ``index`` of ``ack``'s batch of ``count``,
        raised ``exc``: its failure is settled; or, the stop's doing, the rest of the batch
        is left (dealt again) and True says to go no further."""
        if self.refused_by_stop(exc):
            self._cut_at(ack, index, count)
            return True
        self.stats.pattern["pipeline"]["errors"] += handler_raised(handler)
        self._settle(ack, msg, index, exc)
        return False

    def _once(self, handler: Callable[..., Any], queue: str) -> Callable[..., Any]:
        """``handler``, skipped for a message already handled: checked again as it is
        called, since a redelivery may arrive while the first delivery still runs. One
        guard per handler and queue (made once, kept while the registry holds them)."""
        key = (handler, queue)
        guard = self._guards.get(key)
        if guard is None:
            if len(self._guards) >= _MAX_GUARDS:  # those of pulls dropped or replaced go; never one of a
                # pull there (a delivery may run under it: a new guard would let its redelivery run beside it)
                queues = self.registry.queues
                self._guards = {k: g for k, g in self._guards.items() if queues.get(k[1]) is k[0]}
            guard = self._guards[key] = self._make_once(handler, queue)
        return guard

    def _make_once(self, handler: Callable[..., Any], queue: str) -> Callable[..., Any]:
        """The guard `_once` makes. With ``handler_concurrency`` above 1, a redelivery (an
        ack timeout, a pusher restarted) may be called while the first delivery of its
        message still runs on this node: it waits for that one to end (holding its place
        among the handlers running at once; the pusher deals a message at most
        ``max_deliveries`` times), and is then skipped if it succeeded, handled if it
        failed: never run beside it. A delivery that succeeds is remembered as handled, and
        committed, at once, on the handler's own thread (not later, by the inbox's thread,
        behind the completions of the other handlers: a kill then made many handled ids run
        again)."""
        counters = self.stats.pattern["pipeline"]
        running: dict[str, Any] = {}  # id -> the event (or future) set when its delivery under way ends
        lock = threading.Lock()

        def skip(msg: Message) -> bool:
            # the batch's ids were checked against the store as it was decoded; what may
            # have been handled since is what this run remembered: no store read per message
            if msg.id in self._handled.get(queue, ()):
                counters["deduplicated"] = counters.get("deduplicated", 0) + 1
                return True
            return False

        def handled(msg: Message) -> None:
            options = self.registry.pull_options.get(queue)
            self._remember(queue, options.dedupe_window if options is not None else _DEFAULT_WINDOW, msg.id)

        if is_async(handler):
            import asyncio  # (here: a node with no async handler never loads it)

            async def once_async(msg: Message) -> Any:
                while not skip(msg):
                    first = running.get(msg.id)
                    if first is None:
                        break
                    await asyncio.shield(first)
                else:
                    return None
                ours = running[msg.id] = asyncio.get_running_loop().create_future()
                try:
                    result = await handler(msg)
                    handled(msg)
                    return result
                finally:
                    del running[msg.id]
                    ours.set_result(None)

            return once_async

        def once(msg: Message) -> Any:
            while not skip(msg):
                with lock:
                    first = running.get(msg.id)
                    if first is None:
                        ours = running[msg.id] = threading.Event()
                        break
                first.wait()
            else:
                return None
            try:
                result = handler(msg)
                handled(msg)
                return result
            finally:
                with lock:
                    del running[msg.id]
                ours.set()

        return once

    def keep(self, queue: str, route: tuple[bytes, bytes], body: bytes) -> None:
        """A stopping pusher hands over durable messages of a queue this node keeps: store
        them (committed) before acknowledging; they are then this node's to deliver (those
        handed over marked redelivered stay so marked). A keeper whose own stop has begun
        takes none (the pusher keeps them, or hands them to another keeper): it would hand
        them on in turn, and two keepers stopping at once passed them back and forth."""
        if queue not in self.registry.keeps or self.keeper is None or self.stopping():
            self.reply(route, wire.STATUS_NO_SERVICE, b"")
            return
        items = self.codec.decode_batch(body)
        if not all(map(_valid_item, items)):
            raise DecodeError("malformed batch handed to a keeper")
        encode = self.codec.encode
        now = time.time()
        entries = [
            (i[2], _storable_clock(i[3]), encode(i[4]) if i[4] else None, encode(i[1]), i[5], i[0])
            if len(i) == DURABLE_ITEM_FIELDS else (uuid4_hex(), now, None, encode(i[1]), 0, i[0])
            for i in items
        ]
        try:
            self.keeper(queue, entries)
        except Exception as exc:  # full or failing store: the pusher keeps them
            log.error("cannot keep %d message(s) of %r: %s", len(entries), queue, exc)
            self.reply(route, wire.STATUS_ERROR, b"")
            return
        counters = self.stats.pattern["pipeline"]
        counters["kept"] = counters.get("kept", 0) + len(entries)
        self.reply(route, wire.STATUS_OK, b"")

    def _remember(self, queue: str, window: int, msg_id: str) -> None:
        """Commit that a dedupe puller handled ``msg_id`` of ``queue`` (``window``: its
        ``dedupe_window``), as soon as its handler returned, on the handler's thread (a
        crash after this point cannot make it run again)."""
        assert self.store is not None
        with self._remember_lock:  # (handlers' threads: the ids in memory and the trim's count)
            handled = self._handled.setdefault(queue, OrderedDict())
            handled[msg_id] = None
            if len(handled) > window:  # bounded as the store's window is
                handled.popitem(last=False)
        try:
            self.store.handled.remember(queue, [msg_id])
        except Exception as exc:
            self._unrecorded(queue, msg_id, exc)
            return
        with self._remember_lock:  # (one handler's thread trims: the count starts again as it does)
            count = self._remembered[queue] = self._remembered.get(queue, 0) + 1
            if count >= _TRIM_EVERY:
                self._remembered[queue] = 0
        if count < _TRIM_EVERY:
            return
        try:
            self.store.handled.trim(queue, window)
        except Exception as exc:  # (the id is recorded all the same: the trim is tried again with the next)
            with self._remember_lock:
                self._remembered[queue] = max(self._remembered.get(queue, 0), _TRIM_EVERY - 1)
            said = self._trim_failed_log.due()
            if said:
                log.error("cannot trim the ids remembered of %r to its dedupe_window (%d time(s) since the last "
                          "such line; tried again with each id remembered, said again at most every %g s): %s",
                          queue, said, UNRECORDED_LOG_S, exc)

    def _unrecorded(self, queue: str, msg_id: str, exc: Exception) -> None:
        """Count a handled id the store could not record (this run still skips it; after a
        restart a redelivery of it is handled again) in ``pipeline.dedupe_unrecorded``, and
        log it, at most once per `UNRECORDED_LOG_S` with how many went unlogged meanwhile."""
        self.stats.add("pipeline", "dedupe_unrecorded", 1)
        said = self._unrecorded_log.due()
        if said:
            log.error("cannot record message %r of %r as handled (%d id(s) unrecorded since the last such line, "
                      "counted in pipeline.dedupe_unrecorded; said again at most every %g s): %s",
                      msg_id[:12], queue, said, UNRECORDED_LOG_S, exc)

    def _acknowledge(self, ack: BatchAck) -> None:
        """Tell the pusher the batch is done, naming the items whose handler failed."""
        body = self.codec.encode(ack.failures) if ack.failures else b""
        self.reply(ack.route, wire.STATUS_OK, body)

    def complete(self, call: Call, ack: BatchAck, error: BaseException | None) -> None:
        """Account for one handled message of a batch; acknowledge once all are. A handler
        that failed once a stop's deadline passed was cut short by it: its batch is never
        acknowledged, and so dealt again."""
        if error is not None and self.abandoned():
            self.leave(ack, (call.index,))
            return
        self._settle(ack, call.arg, call.index, error)
        if ack.remaining == 0 and not ack.cut_short:
            self._acknowledge(ack)

    def _cut_at(self, ack: BatchAck, index: int, count: int) -> None:
        """The stop left the items of ``ack``'s batch of ``count`` from ``index`` on
        unhandled (handlers run in place): counted as left at the stop, and named to the
        pusher (`leave`)."""
        self.left_at_stop("pipeline", ack, count - index)
        self.leave(ack, range(index, count))

    def leave(self, ack: BatchAck, positions: Iterable[int]) -> None:
        """Note the items of ``ack``'s batch at ``positions`` as left unhandled by the stop
        (never acknowledged as handled: `answer_left` names them to the pusher)."""
        left = list(positions)
        ack.cut_short = True  # (the items still running, answered later, acknowledge nothing)
        if ack.left is None:
            ack.left = []
            self._cut.append(ack)
        ack.left += left
        ack.remaining -= len(left)

    def answer_left(self) -> None:
        """Answer the batches a stop cut short (call on the inbox's owner thread, as the stop
        closes the sockets): one whose other items were all handled goes back
        `STATUS_PARTLY_HANDLED`, naming the items left (its pusher deals only those again, no
        attempt counted) and the failures of those handled, to a pusher that reads it
        (`PARTIAL_ACK_PROTOCOL`). A batch with a handler still running (past the stop's
        timeout), or of an older pusher, stays unanswered: it is dealt again whole."""
        cut, self._cut = self._cut, []
        for ack in cut:
            if ack.remaining == 0 and ack.left and ack.sender is not None \
                    and self.directory.speaks(ack.sender, wire.PARTIAL_ACK_PROTOCOL):
                self.reply(ack.route, wire.STATUS_PARTLY_HANDLED, self.codec.encode([sorted(ack.left), ack.failures]))

    def _settle(self, ack: BatchAck, msg: Message, index: int, error: BaseException | None) -> None:
        """Account for the handled message ``index`` of a batch (``error``: its handler's)."""
        # a durable item (it has a timestamp, or is noted among those whose clock was none):
        # a failure goes back to the pusher (a success of a dedupe puller was remembered by
        # its guard, `_once`, as the handler returned)
        if error is not None and (msg.timestamp is not None or (ack.unstamped is not None and index in ack.unstamped)):
            attempts = msg.attempts + 1
            dead = ack.options.dead_letter_queue(ack.queue) if attempts >= ack.options.max_deliveries else None
            ack.failures.append([index, dead, f"{type(error).__name__}: {error}"])
        ack.remaining -= 1


_STAMP_TYPES = {float, int}
_COLUMNS_FROM = 16
"""The fewest items of a batch `AckedIntake.decode` checks and makes into messages as
columns (`_durable_columns`, `durable_deliveries`): below, item by item is quicker (the
check and the messages of one item 3.2 us as columns against 0.8 us item by item, 8: 5.3
against 4.1, 16: 7.3 against 7.4, 256: 69 against 103), and a durable push a commit, one
item a batch, paid the difference on every message."""


def _durable_columns(items: list[Any]) -> tuple[tuple[tuple[Any, ...], ...], bool] | None:
    """The fields of ``items`` as columns, ``(redelivered, data, id, timestamp, headers,
    attempts)``, and whether every timestamp is a float, if each is a valid durable item
    without headers (as `_valid_item` checks it), found with no Python step per item; else
    None (the batch is then checked item by item: in-memory items, headers, or a malformed
    one)."""
    first = items[0] if items else None
    if type(first) is not list or len(first) != DURABLE_ITEM_FIELDS:  # (an in-memory batch: no look at all of it)
        return None
    if set(map(type, items)) != {list} or max(map(len, items)) != DURABLE_ITEM_FIELDS:
        return None
    columns = tuple(zip(*items))
    if len(columns) != DURABLE_ITEM_FIELDS:  # (zip stops at the shortest item)
        return None
    flags, _data, ids, stamps, headers, attempts = columns
    stamp_types = set(map(type, stamps))
    # (msgpack decodes no str subclass: ids that join are all of type str)
    if set(map(type, flags)) != {bool} or not joins("", ids) or max(map(len, ids)) > wire.MAX_ID_CHARS \
            or not stamp_types <= _STAMP_TYPES or set(map(type, attempts)) != {int} or min(attempts) < 0 \
            or headers.count(None) != len(headers):
        return None
    return columns, stamp_types == {float}


def _finite(stamps: tuple[float, ...]) -> bool:
    """Whether every one of the floats ``stamps`` is finite (so `wire.sent_at` gives each
    back as it is), told without a Python step per stamp (a sum that overflows says no too)."""
    total: float = sum(stamps)
    return total - total == 0.0  # (NaN and the infinities give NaN)


def _valid_item(item: Any) -> bool:
    """An at-least-once item: ``[redelivered, data]`` or the durable
    ``[redelivered, data, id, timestamp, headers, attempts]``, its attempts a count a store
    holds (0 to `INTEGER_MAX`). (Exact types, as msgpack decodes them: a bool is no
    number here.)"""
    if type(item) is not list or not item or type(item[0]) is not bool:
        return False
    if len(item) != DURABLE_ITEM_FIELDS:
        return len(item) == 2
    _flag, _data, msg_id, timestamp, headers, attempts = item
    if type(msg_id) is not str or len(msg_id) > wire.MAX_ID_CHARS or type(timestamp) not in (float, int) \
            or type(attempts) is not int or not 0 <= attempts <= INTEGER_MAX:
        return False
    if headers is not None:
        try:
            wire.check_headers(headers)
        except (TypeError, ValueError):
            return False
    return True


def _storable_clock(stamp: float) -> float:
    """A durable item's timestamp as a keeper stores it: NaN, which SQLite would store as
    NULL (refused: the hand-over failed as if the store had), is kept as an infinity; its
    handler gets None for either, as for any clock that is no finite number (`sent_at`)."""
    stamp = float(stamp)
    return math.inf if stamp != stamp else stamp
