"""The inbound side of a node, sans threads: decode what the SUB, PULL and service ROUTER
received, hand each message to its handler, and send replies and acknowledgements.

The sockets are drained in bounded bursts; each message is decoded once and handed to its
handler in place (no task and no thread hand-off per message). `Dispatcher` is what the
drivers talk to: it drains the sockets, keeps the message loops of the streams (decode,
hand to handler), runs and answers requests and holds their replies for batches, and
gives each other job to a collaborator it makes: the requests received and the built-in
services (`service_intake`, `builtin_services`), at-least-once batches and the keeper's
intake (`_patterns.intake`), replaying subscriptions (`_patterns.replay`), the topics subscribed to and their
gaps (`subscriptions`), the event callbacks posted (`events`), large replies
(`large_replies`), the bodies of error replies (`reply_bodies`), which handlers are quick
(`handler_times`) and what a stop leaves unhandled (`left_at_stop`). The drivers
(`ThreadInbox` for `Node`, `LoopInbox` for `AsyncNode`) only decide where and when
handlers run:

* `ThreadInbox`: a dedicated thread owns the sockets and calls ``def`` handlers
  directly; ``async def`` handlers run on an asyncio loop of their own.
* `LoopInbox`: the caller's event loop owns the sockets and awaits ``async def``
  handlers in place; ``def`` handlers run on a worker thread, a burst at a time.

Either way the event loop that answers heartbeats never runs a sync handler (and with
`Node`, no handler at all). With ``handler_concurrency == 1`` handlers run one at a time
in arrival order; above 1, up to that many run at once.

A handler that raises is logged and counted; for a service the exception's type, message
and traceback travel back to the caller. Undecodable input is counted and dropped.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import zmq

from ..._io.sockets import (
    has_input,
    input_probe,
    recv_frames,
    recv_routed,
    send_frames,
    with_input,
)
from ..._mesh.directory import Directory
from ..._mesh.registry import Registry
from ..._observe import tracing
from ..._stats import LogThrottle, Stats
from ..._store.messages import Entry
from ..._wire import frames as wire
from ..._wire.codec import Codec, new_packer
from ...config import NodeConfig
from ...errors import DecodeError, NodeClosedError
from ...message import Message, Origin, frame_deliveries
from ..calls import (
    BatchAck,
    Call,
    CursorMark,
    CutShort,
    PassedOver,
    handler_failure,
    handler_raised,
)
from ..intake import AckedIntake
from ..request_batches import EARLY_ITEMS
from .events import EventCallbacks
from .handler_times import HOLD_LIMIT_S, HandlerTimes
from .large_replies import LargeReplies
from .left_at_stop import LeftAtStop
from .reply_bodies import callers_limit, error_body, within
from .service_intake import ServiceIntake
from .subscriptions import MAX_CACHED_TOPICS, PrefixIndex, Subscriptions

if TYPE_CHECKING:
    import msgpack

    from ..._store.store import Store
    from ..history import History
    from ..replay import Fetch, Replays

__all__ = ["Dispatcher", "HOLD_LIMIT_S", "PrefixIndex"]

log = logging.getLogger("zmqmesh.inbox")


_BURST = 256
_BatchCaller, _REPLY_ITEM_BYTES, _BATCH_BYTES = wire.BatchCaller, wire.REPLY_ITEM_BYTES, wire.BATCH_BYTES  # (per reply)
_HELD_VIEW_MAX = 32 * 1024 * 1024
"""The most bytes of large frames `Dispatcher._hold_newest_views` holds, and so the largest
frame it holds: glibc serves a larger buffer with a mapping of its own, unmapped as it is
freed (its dynamic mmap threshold rises no higher, on 64-bit systems), so holding it keeps
nothing in the heap and only pins its memory (a 48 MiB payload held on after its handler:
48 MiB more resident, for good)."""
_HELD_VIEWS = 4
"""How many of the newest large frames `Dispatcher._hold_newest_views` holds at most (within
`_HELD_VIEW_MAX` bytes in all)."""
_PATTERN_OF = {"sub": "pubsub", "pull": "pipeline", "req": "service"}
_MAX_CALLS = 256
"""Calls one drain gathers before they run, give or take a frame from each socket (a frame
is never cut, and every socket with input gives one at least, so that a stream on one
never starves the others: their calls may take the count past this). Each holds its
message until it runs; an ``async def`` stream handler on an `AsyncNode` took 2.9 us a
message with bursts of 256, 3.4 with 4096."""
_DRAIN_BYTES = 4 * 1024 * 1024
"""Bytes one drain takes from a socket before the calls it gathered run (a frame at least).
Each call holds its message until it runs, and every frame taken out of ZeroMQ's pipe
lets its I/O thread read one more in: an `AsyncNode` pulling messages of 1 MiB held 256
of them in a burst on top of the pipe's (with ``queue_hwm`` 100, 346 MiB resident against
130 MiB with this bound; tests/test_drain_bytes_bound.py, with 50: grew by 291 MiB against
54)."""
_LOST_LOG_S = 10.0  # messages dropped past a bound (own publications, a queue no longer pulled) are logged at most this often
_REPLY_LINGER_MS = 200  # at a stop, for replies the handlers just sent (to a peer that may be gone: bounded)


class _Looks(dict[tuple[str, int], bool]):
    """`Dispatcher.subscribed`'s answers, by topic and handler id, for one ``version`` of the
    registry: one object, so that a thread that found it current stores its answer there,
    never in the table of a later version (where it could be stale)."""

    __slots__ = ("version",)

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version


class _RepliesHeld:
    """`Dispatcher.replies_held`: on entering, replies are held (an empty table); on leaving,
    those held are sent and none are held any more (entered once a drain: it sets the
    fields itself, where calling the dispatcher's methods cost three calls more)."""

    __slots__ = ("_dispatcher",)

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def __enter__(self) -> None:
        self._dispatcher._held = {}

    def __exit__(self, *exc: object) -> None:
        dispatcher = self._dispatcher
        if dispatcher._held:
            dispatcher.release_held()
        dispatcher._held = None


class Dispatcher:
    """Decoding, dispatch and replies, shared by both inbox drivers; owns the three inbound
    sockets and the collaborators named in the module's docstring. ``describe`` gives the
    built-in stats service its answer."""

    # (slots: with its drivers' fields, past the 30 names CPython 3.11 keeps an instance's
    # attributes inline for, every ``self.method()`` looked the method up anew, ~250
    # instructions each, several per request served; a driver's own fields stay in its dict)
    __slots__ = ("_deadline", "_held", "_held_bytes", "_newest_views", "_node_closed", "_own_back_log",
                 "_own_id", "_own_lost_log", "_packer", "_quick_handlers", "_received", "_received_names",
                 "_replays_store", "_replies_held", "_router_has_input", "_router_used", "_send_large", "_service_counters",
                 "_sub_used", "_subscribed", "_topic_handlers", "_unpulled_log", "acked", "codec", "config",
                 "describe", "directory", "event_callbacks", "events", "gaps", "handler_times", "large_replies",
                 "left_at_stop", "local_frames", "pages", "pull", "registry", "replays", "router",
                 "service_intake", "sockets", "stats", "stopping", "streams_changed", "sub", "subscriptions",
                 "watching")

    def __init__(self, *, config: NodeConfig, registry: Registry, directory: Directory, codec: Codec,
                 stats: Stats, describe: Callable[[], dict[str, Any]],
                 sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any],
                 store: Store | None = None,
                 keeper: Callable[[str, list[Entry]], None] | None = None,
                 history: History | None = None, node_closed: Callable[[], bool] | None = None) -> None:
        self._node_closed = node_closed  # whether the node refuses work: its stop has begun
        self.left_at_stop = LeftAtStop(stats, self.abandoned)
        self.acked = AckedIntake(registry=registry, directory=directory, codec=codec, stats=stats, store=store,
                                 keeper=keeper, reply=self.send_reply, in_place=self.runs_in_place,
                                 abandoned=self.abandoned, left_at_stop=self.left_at_stop.count,
                                 refused_by_stop=self.refused_by_stop,
                                 stopping=node_closed if node_closed is not None else lambda: False)
        self.replays: Replays | None = None  # (made by `replaying` for the first subscription that replays)
        self._replays_store = store
        self._own_lost_log = LogThrottle(_LOST_LOG_S)  # (`post_frames`: the loop's thread)
        self._unpulled_log = LogThrottle(_LOST_LOG_S)  # (`_decode_stream`: messages of a queue no longer pulled)
        self._own_back_log = LogThrottle(_LOST_LOG_S)  # (`_decode_stream`: this node's publications come back)
        self._own_id = directory.node_id
        self.local_frames: deque[list[bytes]] = deque()  # this node's own publications, for its subscriptions
        self.pages: deque[tuple[Fetch, Any, BaseException | None]] = deque()
        self.streams_changed = True
        self.config = config
        self.registry = registry
        self.directory = directory
        self.codec = codec
        self._packer: msgpack.Packer = new_packer()
        """Encodes the replies (`answer`, on the owner thread): its own, not a thread's
        (`Codec.thread_packer`), spared that lookup each reply (~400 instructions). Not the
        thread's it begins on either: a loop inbox's loop may go on on another thread, and
        the one it began on then packs with the codec at once (a call from another loop
        refused only once its data was encoded), mixing the two bodies."""
        self.stats = stats
        self._service_counters = stats.pattern["service"]  # (the same dict for the node's life: counted per reply)
        self._received_names = {p: stats.names(p, "received") for p in ("pubsub", "pipeline")}
        self.service_intake = ServiceIntake(registry=registry, directory=directory, codec=codec, stats=stats,
                                            acked=self.acked, describe=describe, history=history, reply=self.send_reply,
                                            driver=self)
        self.describe = describe
        self.sub = sub
        self.pull = pull
        self.router = router
        self.sockets = ((router, "req"), (pull, "pull"), (sub, "sub"))
        self._router_has_input = input_probe(router)  # (`used_with_input`: after every reply sent)
        self._router_used = False  # (since `used_with_input` last looked: replies sent)
        self._received: list[bytes] | None = None  # a message taken from the router, for `drain`
        # (`drain`: the newest large frames, each held until `_HELD_VIEWS` newer ones came)
        self._newest_views: deque[memoryview] = deque()
        self._held_bytes = 0  # (of `_newest_views`)
        self._sub_used = False  # (subscriptions set)
        self.event_callbacks = EventCallbacks(config, stats)
        self.events = self.event_callbacks.events  # (the same deque: looked at in every `gather`)
        self.subscriptions = Subscriptions(registry, directory, stats)
        self.gaps = self.subscriptions.gaps
        # (bound once: looked up per frame of a publication, as a method of this class was)
        self._topic_handlers = self.subscriptions.handlers
        self.stopping = False
        self._deadline: float | None = None
        self.watching = False
        """Set when a stop begins, or when a subscription's handler is removed (on the thread
        that removes it: `Registry.on_topic_removed`), and cleared as the next calls are
        gathered once no stop is on: while it is, each call is looked at before it runs (a
        stop's deadline, `unsubscribed`); read instead of the deadline, it costs nothing
        per message otherwise."""
        self._subscribed = _Looks(-1)  # (`subscribed`)
        registry.on_topic_removed = self._topic_handler_removed
        # caller: [bytes, replies, frame's caller, how many are no handler's answer] (`send_reply`)
        self._held: dict[bytes, list[Any]] | None = None
        self.large_replies = LargeReplies(router, config, codec, stats)
        self._send_large = self.large_replies.send_if_room  # (bound once: `send_reply` calls it per large reply)
        self.handler_times = HandlerTimes()
        self._quick_handlers = self.handler_times.quick  # (the same set: looked at before each handler while held)
        self._replies_held = _RepliesHeld(self)

    def abandoned(self) -> bool:
        """True once a stop's deadline has passed: work still queued is then dropped."""
        return self._deadline is not None and time.monotonic() > self._deadline

    def refused_by_stop(self, error: BaseException) -> bool:
        """Whether a handler's ``error`` is its node refusing it (`NodeClosedError`: a push,
        a request) because the node's stop has begun: the stop's doing, not the handler's
        failure (see `complete`)."""
        return type(error) is NodeClosedError and (self.stopping or (self._node_closed is not None
                                                                      and self._node_closed()))

    def begin_stop(self, timeout: float) -> None:
        """Take no new work; what has arrived may still be handled for ``timeout`` seconds."""
        self._deadline = time.monotonic() + timeout
        self.stopping = True
        self.watching = True

    # -- handlers removed while their calls wait --------------------------------------------

    def _topic_handler_removed(self) -> None:
        """A subscription's handler was removed (any thread, before ``unsubscribe`` returns):
        the calls gathered before are looked at before they run (`watching`)."""
        self.watching = True

    def subscribed(self, topic: str, handler: Callable[..., Any]) -> bool:
        """Whether ``handler`` is still subscribed to a prefix of ``topic`` (any thread);
        looked up once per topic and handler for each version of the registry, for up to
        `MAX_CACHED_TOPICS` of them (past it, looked up afresh: a busy pool keeps `watching`
        on, and a subscriber of ever-new topics grew by one answer per topic)."""
        registry = self.registry
        version = registry.version
        looks = self._subscribed
        if looks.version != version or len(looks) >= MAX_CACHED_TOPICS:
            looks = self._subscribed = _Looks(version)
        key = (topic, id(handler))  # (the calls hold their handlers: an id is not reused meanwhile)
        found = looks.get(key)
        if found is None:
            found = looks[key] = any(
                topic.startswith(prefix) and any(h is handler for h in handlers)
                for prefix, handlers in registry.topics.items())
        return found

    def handling_elsewhere(self) -> bool:
        """Whether calls gathered before may still wait to run elsewhere than in the drain (a
        pool's, tasks of their own): `watching` holds on for them (the drivers say)."""
        return False

    def unsubscribed(self, call: Call) -> bool:
        """Whether ``call`` delivers a publication to a handler no longer subscribed to its
        topic (``unsubscribe`` returned after the call was gathered): it is not to run
        (`pass_over`). Any thread; looked at only while `watching`."""
        return call.pattern == "pubsub" and not self.subscribed(call.arg.topic, call.handler)

    def pass_over(self, call: Call) -> None:
        """Account for ``call``, not run (`unsubscribed`): counted in
        ``stats()["pubsub"]["after_unsubscribe"]``; a durable subscription's place stays
        before it (a subscription that takes its name again gets it, marked redelivered)."""
        self.stats.add("pubsub", "after_unsubscribe")
        if isinstance(call.route, CursorMark):
            self.replaying().passed_over(call.route)

    # -- decoding -------------------------------------------------------------------------

    def gather(self, calls: list[Call], active: Any) -> list[tuple[zmq.Socket[Any], str]]:
        """Queue the pending event callbacks, this node's own publications and the pages of
        history fetched, then a burst from each of the ``active`` ``(socket, kind)`` pairs,
        into ``calls``; returns the pairs that may hold more."""
        if self.watching and not self.stopping and not self.handling_elsewhere():  # (those gathered before all ran)
            self.watching = False
            self._subscribed = _Looks(-1)
        if self.events:
            self.event_callbacks.take(calls)
        if self.streams_changed:
            self.streams_changed = False
            if self.replays is not None:
                self.replays.forget_dropped()
            self.acked.forget_unpulled()
            if self.registry.replays:
                try:
                    self.replaying().sync(calls)
                except Exception:  # e.g. a failing store: the subscriptions stay live, the inbox runs on
                    log.exception("following the publishers' histories failed")
        replays = self.replays
        if replays is not None and replays.waiting():
            try:
                replays.look_again(calls)
            except Exception:
                log.exception("delivering frames that waited for their sender, or reading a history again, failed")
        local = self.local_frames
        if local:
            for _ in range(min(len(local), _BURST)):
                frames = local.popleft()
                try:
                    self._decode_stream("sub", frames, calls, own=True)
                except Exception:
                    log.exception("delivering a publication of this node failed")
        if replays is None:  # (no subscription ever replayed here: no page to deliver)
            return [(sock, kind) for sock, kind in active if self.drain(sock, kind, calls)]
        if replays.delivering():  # (the rest of a page first: in order)
            try:
                replays.deliver_pages(calls)
            except Exception:
                self.stats.add("pubsub", "replay_failed")
                log.exception("delivering a page of history failed")
        pages = self.pages
        while pages:
            try:
                replays.on_page(*pages.popleft(), calls)
            except Exception:
                self.stats.add("pubsub", "replay_failed")
                log.exception("applying a page of history failed")
        return [(sock, kind) for sock, kind in active if self.drain(sock, kind, calls)]

    def has_posted(self) -> bool:
        """Whether events, own publications or history pages wait to be gathered, or the
        rest of a page to be delivered."""
        if self.events or self.local_frames or self.pages:
            return True
        return self.replays is not None and self.replays.delivering()

    def has_waiting(self) -> bool:
        """Whether frames wait for their sender to be known, or a history is to be read
        again (see `Replays.waiting`): the driver looks again now and then (a timer, its
        poll's timeout)."""
        return self.replays is not None and self.replays.waiting()

    def post_frames(self, frames: list[bytes], count: int) -> None:
        """A publication of this node (a frame of ``count`` messages) for its own
        subscriptions (the loop's thread). Past ``recv_hwm`` frames waiting, it is dropped
        and counted, as a SUB socket would, and logged at most every `_LOST_LOG_S`."""
        if len(self.local_frames) >= self.config.recv_hwm:
            self.stats.add("pubsub", "dropped", count)
            said = self._own_lost_log.due(count)
            if said:
                log.warning("%d publication(s) of this node dropped before its own subscriptions took them, since "
                            "the last such line (their handlers fell behind, past recv_hwm=%d frames waiting); "
                            "counted in pubsub.dropped; said again at most every %g s",
                            said, self.config.recv_hwm, _LOST_LOG_S)
            return
        self.local_frames.append(frames)
        self.wake()

    def replaying(self) -> Replays:
        """What moves the replaying subscriptions' cursors (`Replays`), made when the first
        subscription that replays needs it: a node whose subscriptions only take what is
        live never loads the replay package (owner thread only)."""
        replays = self.replays
        if replays is None:
            from ..replay import Replays

            replays = self.replays = Replays(registry=self.registry, directory=self.directory, codec=self.codec,
                                             stats=self.stats, store=self._replays_store, fetch=self.fetch_history)
        return replays

    def wanted(self, fetch: Fetch) -> bool:
        """Whether ``fetch`` is still awaited by a replaying subscription (any thread)."""
        return self.replays is not None and self.replays.wanted(fetch)

    def post_page(self, fetch: Fetch, page: Any, error: BaseException | None) -> None:
        """The outcome of a history fetch (any thread)."""
        self.pages.append((fetch, page, error))
        self.wake()

    def peers_changed(self) -> None:
        """Publishers may have come or gone: replaying subscriptions look again (any thread)."""
        self.streams_changed = True
        self.wake()

    def fetch_history(self, fetch: Fetch) -> None:
        """Get a page of history for a replaying subscription (the drivers say how), then
        `post_page` its outcome."""
        raise NotImplementedError

    def bursts(self, calls: list[Call]) -> list[list[Call]]:
        """``calls`` cut into the bursts handled between two commits of the durable
        subscriptions' places (`before_handling`, then `after_handling`): at most 256 calls
        each while a subscription replays, so that a crash redelivers at most that many
        messages per subscription, even amid a page of history (2048 rows)."""
        if len(calls) <= _BURST or not self.registry.replays:
            return [calls]
        return [calls[i:i + _BURST] for i in range(0, len(calls), _BURST)]

    def before_handling(self, calls: list[Call]) -> None:
        """Called before a burst of calls is handled (durable subscriptions record it, also
        those dropped since the burst was gathered: `Replays.recording`)."""
        replays = self._recording()
        if replays is not None:
            replays.before_handling(calls)

    def after_handling(self) -> None:
        """Called after a burst was handled (durable subscriptions commit where they are,
        also one that its handler or another thread dropped meanwhile)."""
        replays = self._recording()
        if replays is not None:
            replays.flush()

    def _recording(self) -> Replays | None:
        """The `Replays` that record a burst: while subscriptions replay, or while one
        dropped since still has places to write (`Replays.recording`); None otherwise."""
        if self.registry.replays:
            return self.replaying()
        replays = self.replays
        return replays if replays is not None and replays.recording() else None

    def post(self, calls: list[Call]) -> None:
        """Queue event callbacks (joins, leaves, whispers) to run in order with messages;
        WHISPERs and SHOUTs past their bounds are dropped, counted and logged instead
        (`EventCallbacks.post`)."""
        if self.event_callbacks.post(calls):
            self.wake()

    def post_peer_event(self, joined: bool, peer_id: str, calls: list[Call]) -> None:
        """Queue the callbacks of a peer's join or leave (``calls``, none if no handler);
        past a backlog, a leave withdraws the join still waiting (`EventCallbacks.post_peer_event`)."""
        if self.event_callbacks.post_peer_event(joined, peer_id, calls):
            self.wake()

    def wake(self) -> None:
        """Make the driver look at its queues (the drivers say how)."""
        raise NotImplementedError

    def drain(self, sock: zmq.Socket[Any], kind: str, calls: list[Call]) -> bool:
        """Receive up to a burst from ``sock`` into ``calls``; True if more may be waiting."""
        # a large frame of a stream comes as a view of ZeroMQ's buffer: it is decoded, copied
        # into bytes, or (a raw payload of a `zero_copy` pull) handed over as it is
        views_from = wire.LARGE_FRAME if kind != "req" else 0
        first = 0
        if self._received is not None and sock is self.router:  # (received by `serve_lone_request`)
            frames, self._received = self._received, None
            self._take(kind, frames, calls)
            first = 1
        taken = 0
        for i in range(first, _BURST):
            if i == 1 and not has_input(sock):  # the common single message: a flag check, not a raised Again
                self._events_read(sock)
                return False
            if i and (len(calls) >= _MAX_CALLS or taken >= _DRAIN_BYTES):  # (a frame from each socket at least: none waits on another's stream)
                return True  # (the rest waits for the next burst: what one holds is bounded)
            try:
                frames = recv_routed(sock) if kind == "req" else recv_frames(sock, views_from)
                size = sum(map(len, frames))
                taken += size
                if views_from and size >= views_from:  # (a message smaller holds no view)
                    self._hold_newest_views(frames)
            except zmq.Again:
                return False
            except zmq.ZMQError as exc:
                log.debug("receive failed: %s", exc)
                return False
            self._take(kind, frames, calls)
        return True

    def _hold_newest_views(self, frames: list[Any]) -> None:
        """Hold the newest frames received as views of ZeroMQ's buffers (`LARGE_FRAME` bytes
        or more), up to `_HELD_VIEWS` of them and `_HELD_VIEW_MAX` bytes in all, each until
        newer ones push it out, whatever its message became.

        ZeroMQ's I/O thread allocates each such buffer, and glibc hands the top of that
        thread's heap back to the system once more than its trim threshold (twice the
        largest buffer freed) lies free there: the next buffers are then faulted in again,
        page by page, and the thread that frees pays for the ``madvise``. The further the
        handlers fall behind, the more buffers wait at once, and the more is freed at
        the top as they catch up. Held, the newest stay between the freed ones and the
        top, which are then allocated again as they are. Pulling 1 MiB payloads (push_cpu.py,
        3,000 to 10,000 a round): holding the newest alone (as a raw pyzmq reader holds its
        last message), 39 page faults a message against 52 holding none (30 paired runs);
        holding the four newest, 31.5-34.5 against 43-44 holding the newest alone, and the
        puller's CPU 237-246 us a message against 259-265 (two runs of 24 rounds
        alternated; the two newest: no better than one; the eight newest: no better than
        four).
        What is held stays resident until newer frames push it out, however long that
        takes: 4 MiB here, 32 MiB at most (a larger frame never came from that heap)."""
        held = self._newest_views
        for frame in frames:
            if type(frame) is memoryview and len(frame) <= _HELD_VIEW_MAX:
                held.append(frame)
                self._held_bytes += len(frame)
                while len(held) > _HELD_VIEWS or self._held_bytes > _HELD_VIEW_MAX:
                    self._held_bytes -= len(held.popleft())

    def _take(self, kind: str, frames: list[bytes], calls: list[Call]) -> None:
        """Decode a message received from the ``kind`` socket into ``calls`` (a request
        may be served at once: `ServiceIntake`); a malformed one is dropped and counted."""
        try:
            if kind == "req":
                self.service_intake.decode(frames, calls)
            else:
                self._decode_stream(kind, frames, calls)
        except Exception as exc:  # malformed input from the wire
            self._malformed(kind, exc)

    def _malformed(self, kind: str, error: Exception) -> None:
        """Count a message from the ``kind`` socket that ``error`` found malformed (dropped)."""
        self.stats.pattern[_PATTERN_OF[kind]]["errors"] += 1
        self.stats.reject(f"{_PATTERN_OF[kind]}_malformed")
        log.debug("dropping a malformed %s message: %s", kind, error)

    def nothing_else_waits(self, calls: list[Call]) -> bool:
        """Whether nothing but requests may wait to be taken: no event, publication of this
        node or page of history posted, no sender or history to look at again, no stop
        begun, nothing gathered in ``calls``. A driver looks before it sleeps (off a
        caller's wait): what is posted or begun meanwhile wakes it too (`wake`), and it
        then drains as usual (`serve_lone_request`)."""
        return not (self.stopping or calls or self.streams_changed or self.has_posted() or self.has_waiting())

    def serve_lone_request(self, calls: list[Call]) -> bool:
        """When the router alone woke the driver, and nothing else waited as it went to sleep
        (`nothing_else_waits`): receive one message from the router and, if it is a request
        that may be served in place, answer it at once, without a drain (True). False when
        the driver is to drain the router as usual: the message needs the drain, which
        takes it first: a batch (its replies merge with those to the frames after it) or a
        call for a handler (it joins ``calls``). (A lone caller's round trip is this node's
        wake-up, its handler and its reply: a drain's look at every queue first was a tenth
        of it.)"""
        try:
            frames = recv_routed(self.router)
        except zmq.ZMQError:  # (Again: the signal was another's, and the router's events are read)
            self._events_read(self.router)
            return True
        try:  # (what `_take` does, but for a batch: the drain takes it)
            if not self.service_intake.decode_request(frames, calls):
                self._received = frames
                return False
        except Exception as exc:  # malformed input from the wire
            self._malformed("req", exc)
        self._router_used = True  # (more may have come meanwhile: `used_with_input` looks)
        return not calls

    def _came_back(self, topic: bytes, count: int) -> None:
        """A frame of ``count`` of this node's own publications came to its SUB: they reach
        its own subscriptions directly, never through a socket, so a peer announced this
        node's SUB endpoint for its own, and the XPUB connected to it (or a stranger sent it
        under this node's id). Dropped (handled, each would be handled twice), counted
        (``rejected["pubsub_own_uuid"]``) and logged at most every `_LOST_LOG_S`."""
        self.stats.reject("pubsub_own_uuid", count)
        said = self._own_back_log.due(count)
        if said:
            log.warning("%d of this node's own publications came back to its SUB socket since the last such line, "
                        "the last on %r: a peer announces this node's SUB endpoint for its own; dropped (counted in "
                        "rejected.pubsub_own_uuid; said again at most every %g s)",
                        said, topic.decode("utf-8", "replace"), _LOST_LOG_S)

    def _decode_stream(self, kind: str, frames: list[bytes], calls: list[Call], own: bool = False) -> None:
        """Decode a frame of the ``kind`` socket (``own``: one of this node's publications,
        posted for its own subscriptions, `post_frames`) into ``calls``, or handle it in place.
        Raises `DecodeError` for a malformed one."""
        stats = self.stats
        pattern = _PATTERN_OF[kind]
        counters = stats.pattern[pattern]
        if len(frames) == 4:
            name_b, sender_b, body, meta = frames
        elif len(frames) == 3:
            name_b, sender_b, body = frames
            meta = None
        else:
            raise DecodeError(f"{len(frames)} frames, expected 3 or 4")
        if len(name_b) > wire.MAX_NAME_BYTES:  # no sender may use one; it would bloat the caches
            raise DecodeError(f"a {len(name_b)}-byte topic or queue name")
        sender_uuid, sequence = wire.parse_sender(sender_b)
        sender_id = sender_uuid.hex() if sender_uuid is not None else None
        if kind == "sub":
            if name_b[:1] == b"\xff":  # no UTF-8 topic begins so: a replay marker's answer, or nothing
                if not name_b.startswith(wire.MARKER_PREFIX):
                    raise DecodeError("a topic beginning 0xFF that names no replay marker")
                self._marker(frames, sender_id, sequence)
                return
            if sender_id == self._own_id and not own:
                self._came_back(name_b, len(self.codec.decode_batch(body)))
                return
            topic = ""  # (the subscriptions name it, below)
        else:
            topic = name_b.decode("utf-8", "replace")
        if meta is not None and not body and kind == "pull":  # a large payload as it is (protocol 5)
            if len(meta) > self.codec.max_message_bytes:
                raise DecodeError(f"a payload of {len(meta)} bytes exceeds max_message_bytes")
            # (from `LARGE_FRAME` bytes, a view of ZeroMQ's buffer, see `drain`: handed over as it is if zero_copy)
            items: list[Any] = [meta.toreadonly() if isinstance(meta, memoryview)
                                and topic in self.registry.zero_copy_queues else bytes(meta)]
            meta = None  # (no meta frame)
        else:
            items = self.codec.decode_batch(body)
        count = len(items)
        # only members are counted per sender: a stranger could claim any number of ids
        known = sender_id is not None and sender_id in self.directory.alive_ids
        if kind == "sub" and sequence is not None and sender_uuid is not None:
            lost = self.gaps.missed(sender_uuid, name_b, sequence, count, known)
            if lost is None:  # late, behind a newer frame: counted as dropped when that one came
                return
            if lost:
                self.subscriptions.lost(lost, name_b, sender_uuid)
        counters["received"] += count
        if known:
            stats.peer_received[sender_id] += count  # type: ignore[index]
        if kind == "sub":
            topic, handlers, replaying = self._topic_handlers(name_b)
            self._received_names[pattern].add(name_b, count)
            # (the sender said nothing of the frame without a meta frame or a sequence: no call)
            origin = self._origin(kind, meta, sender_id, sequence, topic, count) \
                if meta is not None or sequence is not None else None
            if replaying:
                self.replaying().live(topic, sequence, items, origin, sender_id, replaying, calls, meta,
                                      size=len(body) + (len(meta) if meta is not None else 0))
            if not handlers:  # (only replaying subscriptions: they have the frame)
                return
        else:
            handler = self.registry.queues.get(topic)
            if handler is None:
                counters["dropped"] += count
                stats.reject("pipeline_no_handler", count)
                # (at most a line every few seconds: pushers that have not yet heard of the
                # unpull send at their rate, and a line per frame flooded the log)
                said = self._unpulled_log.due(count)
                if said:
                    log.warning("%d message(s) for a queue this node no longer pulls since the last such line, the "
                                "last for %r; counted in pipeline.dropped (rejected: pipeline_no_handler); said "
                                "again at most every %g s", said, topic, _LOST_LOG_S)
                return
            handlers = [handler]
            self._received_names[pattern].add(topic, count)  # (by name, as at-least-once counts)
            origin = self._origin(kind, meta, sender_id, None, topic, count) if meta is not None else None
        lookup = self.directory.lookup_peer
        if self.runs_in_place(handlers) and tracing.active is None:
            # the hot path: call the handlers right here, no Call objects, no hand-off (and no
            # spans: with traces on, each run goes through serve_as like any other)
            errors = 0
            messages = iter(frame_deliveries(pattern, topic, items, sender_id, lookup, origin))
            if len(handlers) == 1:  # (a queue's one handler, a topic's usual one: no inner loop per message)
                handler = handlers[0]
                for msg in messages:
                    if self.watching and self._still_in_place(pattern, topic, handlers, messages) is None:
                        break
                    try:
                        handler(msg)
                    except BaseException as exc:
                        errors += self._failed_in_place(handler, exc, pattern)
            else:
                for msg in messages:
                    called = self._still_in_place(pattern, topic, handlers, messages) if self.watching else handlers
                    if called is None:
                        break
                    for handler in called:
                        try:
                            handler(msg)
                        except BaseException as exc:
                            errors += self._failed_in_place(handler, exc, pattern)
            if errors:
                counters["errors"] += errors
            return
        calls.extend([Call(handler, msg, None, pattern)
                      for msg in frame_deliveries(pattern, topic, items, sender_id, lookup, origin)
                      for handler in handlers])

    def _still_in_place(self, pattern: str, topic: str, handlers: list[Callable[..., Any]],
                        messages: Iterator[Message]) -> list[Callable[..., Any]] | None:
        """While `watching`, before a message of a frame whose ``handlers`` run in place: those
        to call for it, the others unsubscribed since the frame came (counted as `pass_over`
        counts); or None, the frame's deliveries ending here: the stop's deadline passed
        (the rest of ``messages`` counted as left at the stop), or, for a publication, every
        one of ``handlers`` was unsubscribed (the rest counted as not run)."""
        if self.stopping and self.abandoned():
            self.left_at_stop.count(pattern, None, 1 + sum(1 for _ in messages))
            return None
        if pattern != "pubsub":
            return handlers
        kept = [h for h in handlers if self.subscribed(topic, h)]
        if kept:
            if len(kept) < len(handlers):
                self.stats.add("pubsub", "after_unsubscribe", len(handlers) - len(kept))
            return kept
        self.stats.add("pubsub", "after_unsubscribe", len(handlers) * (1 + sum(1 for _ in messages)))
        return None

    def _marker(self, frames: list[bytes], sender_id: str | None, position: int | None) -> None:
        """A publisher's answer to a replay marker (`MARKER_PREFIX`; ``position``, the
        number of its sender frame): for the replaying subscription that subscribed it, the
        position from which everything the publisher keeps comes live (`Replays.marked`).
        Never a message: no handler sees it and no counter counts it as received; a marker
        of another node's (a subscription to every topic takes them) or of a subscription
        no longer made is let go. Raises `DecodeError` (or `ValueError`) for a malformed
        one (counted by the caller)."""
        followed = self.subscriptions.markers.get(frames[0])
        if followed is None:
            return
        if len(frames) != 3 or frames[2] or sender_id is None or position is None:
            raise DecodeError("a replay marker's answer not of a numbered sender frame and an empty body")
        self.replaying().marked(followed[0], followed[1], sender_id, position)

    def _failed_in_place(self, handler: Callable[..., Any], exc: BaseException, pattern: str) -> int:
        """A handler run in place on a stream raised ``exc`` (call in its ``except``): left
        at the stop if its stopping node refused it (`refused_by_stop`), else logged; the
        errors to count (raises it again if it must end the program: `handler_failure`)."""
        handler_failure(exc)
        if self.refused_by_stop(exc):
            self.left_at_stop.count(pattern, None, 1)
            return 0
        return handler_raised(handler)

    def _origin(self, kind: str, meta: bytes | None, sender_id: str | None, sequence: int | None, topic: str,
                count: int) -> Origin | None:
        """What the sender said of a frame's ``count`` messages: their numbers (pub/sub
        sequence, or the ``meta`` frame's), clock and headers; None when it said nothing."""
        headers = timestamp = first = None
        if meta is not None:
            headers, timestamp, first = wire.parse_meta(self.codec.decode(meta), count)
        if sequence is not None:
            first = sequence
        if headers is None and first is None:
            return None
        stem = None
        if first is not None and sender_id is not None:
            if kind == "sub":  # a kept topic's messages are named by the history's stream, for good
                stem = f"{self.directory.stream_of(sender_id, topic) or sender_id}/{topic}/"
            else:
                stem = f"{sender_id}/"
        return Origin(stem, first or 0, timestamp, headers)

    def runs_in_place(self, handlers: list[Callable[..., Any]]) -> bool:
        """Whether these handlers may be called directly while draining (see the drivers)."""
        return False

    def runs_sync_in_place(self) -> bool:
        """Whether sync handlers may be called directly while draining, now: `runs_in_place`
        for handlers known to be sync (a service's, known once per name: `ServiceIntake`)."""
        return False

    def serve_in_place(self, handler: Callable[..., Any], msg: Message, route: tuple[bytes, bytes]) -> None:
        """Run a request's sync ``handler`` right where it was decoded and answer it: what
        `starting`, `run_sync`, `finished` and `complete` do for its `Call`, without one.
        Only with nothing gathered before it (the order holds), handlers run one at a time,
        no headers (no chain of waiting nodes to serve as) and no tracing."""
        started = self.handler_starting(handler, True) if self._held else time.monotonic()  # (none held: no look)
        error: BaseException | None
        try:
            result, error = handler(msg), None
        except BaseException as exc:
            result, error = None, handler_failure(exc)
            if self.refused_by_stop(error):
                error = CutShort(str(error))
        ended = time.monotonic()
        self.answer(route, result, error)  # (first: the handler's time is kept once its caller has the reply)
        self.handler_times.finished(handler, started, ended)

    # -- replying ---------------------------------------------------------------------------

    def complete(self, call: Call, result: Any, error: BaseException | None) -> None:
        """Account for a finished call and send the reply of a request (owner thread only).
        A handler that used its node once the node's stop began (a push, a request) was
        refused with `NodeClosedError`: its message is left at the stop (`CutShort`), not
        the handler's failure (logged with a traceback, an attempt counted)."""
        if error is not None and self.refused_by_stop(error):
            error = CutShort(str(error))
        route = call.route
        if type(route) is tuple:  # a request (the common case, first; a CursorMark is not a plain tuple)
            self.answer(route, result, error)  # type: ignore[arg-type]
            return
        if error is not None:
            if type(error) is PassedOver:  # (not run: `run_batch`)
                self.pass_over(call)
                return
            if isinstance(error, CutShort):  # (a batch it belongs to is then never acknowledged)
                self.drop(call)
                if isinstance(route, BatchAck):
                    route.cut_short = True
                return
            self.stats.pattern[call.pattern]["errors"] += 1
            log.error("handler %s raised", getattr(call.handler, "__qualname__", call.handler), exc_info=error)
        if isinstance(route, BatchAck):
            self.acked.complete(call, route, error)
            return
        if isinstance(route, CursorMark) and not (error is not None and self.abandoned()):
            self.replaying().handled(route)  # (not one a stop cut short: it comes again after a restart)

    def answer(self, route: tuple[bytes, bytes], result: Any, error: BaseException | None) -> None:
        """Reply to the request of ``route`` with what its handler returned or raised, and
        count it (owner thread only). A result msgpack cannot encode, or larger than the
        ``max_message_bytes`` its caller announced, is the handler's failure: answered ``0x01``."""
        if error is None:
            try:
                body = self.codec.encode(result, None, self._packer)
                if self.directory.narrower:  # (callers that take less than this node sends: rarely any)
                    body = within(body, callers_limit(self.directory, route[0]))
            except Exception as exc:  # unencodable, or too large for its caller: the handler's failure
                self.stats.pattern["service"]["errors"] += 1
                self._reply_error(route, exc)
            else:
                self.send_reply(route, wire.STATUS_OK, body, True)
            return
        if isinstance(error, CutShort):  # (left at the stop, as the requests not begun: its caller is told)
            self.left_at_stop.count("service", route, 1, "requests cut short")
        else:
            self.stats.pattern["service"]["errors"] += 1  # (it goes back to its caller: not logged here)
        self._reply_error(route, error)

    def _reply_error(self, route: tuple[bytes, bytes], error: BaseException) -> None:
        """Send the ``0x01`` reply of a failed handler."""
        try:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        except Exception:  # (a broken exception object: the reply goes all the same)
            text = ""
        body = error_body(self.codec, error, text, callers_limit(self.directory, route[0]))
        self.send_reply(route, wire.STATUS_ERROR, body, True)

    def send_reply(self, route: tuple[bytes, bytes], status: bytes, body: bytes, answer: bool = False) -> None:
        """Send a reply to ``route``, counted in ``service.sent`` if it is a handler's
        ``answer``; one to an unreachable caller is counted as dropped instead. While replies
        are held (`replies_held`), a small one to a caller that sent a batch waits to go
        back in a batch. Held replies go with the first reply to a later frame of that
        caller's, if they are `EARLY_ITEMS` or more (the caller refills its window meanwhile,
        and small frames still merge), or when the batch is full or the burst ends. An
        answer is counted as it goes (a held one, with those held with it: `_send_held`)."""
        held = self._held
        caller, request_id = route  # (caller: one object per frame received, see `ServiceIntake.decode`)
        if held is not None and type(caller) is _BatchCaller and \
                (size := len(body) + len(request_id) + _REPLY_ITEM_BYTES) < _BATCH_BYTES:
            entry = held.get(caller)
            if entry is not None:
                replies = entry[1]
                if (entry[2] is not caller and len(replies) >= EARLY_ITEMS) or \
                        wire.batch_full(entry[0], len(replies), size):
                    del held[caller]
                    self._send_held(caller, replies, len(replies) - entry[3])
                    entry = None
                else:
                    entry[0] += size
                    replies.append((request_id, status, body))
                    entry[2] = caller
                    if not answer:  # (the replies that are no handler's answer are counted: the rare ones)
                        entry[3] += 1
            if entry is None:  # (1: the batch's mark)
                held[caller] = [1 + size, [(request_id, status, body)], caller, int(not answer)]
            return
        counters = self._service_counters
        if answer:  # (counted before it goes, as a caller may have it at once; taken back if it cannot go)
            counters["sent"] += 1
        self._router_used = True
        if len(body) >= wire.LARGE_FRAME:
            if self._send_large(route, status, body, answer):
                return
            status, body = wire.STATUS_ERROR, self.large_replies.refused_body(len(body))  # (the caller hears of it at once)
        try:
            send_frames(self.router, wire.reply_frames(route, status, body))
        except zmq.ZMQError:
            counters["dropped"] += 1
            counters["sent"] -= answer

    def replies_held(self) -> _RepliesHeld:
        """Hold the replies to batches of requests while the drivers run handlers in place,
        one after the other, so that the replies to a batch go back in one frame; send
        them on leaving. Around each handler the driver calls `starting` and `finished`:
        the replies held go out before a handler unless it was quick (under
        `HOLD_LIMIT_S`) on each of its last `QUICK_RUNS` runs; so a reply waits, at most,
        for one such handler that turns slow (the asyncio driver lets them go after
        `HOLD_LIMIT_S` even then: `release_held`). (A context manager made once: one is
        entered for every burst of calls.)"""
        return self._replies_held

    def to_handle(self, calls: list[Call]) -> Generator[Call, None, None]:
        """``calls``, in order, but those reached after the stop's deadline: dropped and
        counted. Closed before its end (the task handling them cancelled by a stop), it
        counts the calls it did not give as dropped: close it explicitly."""
        remaining = iter(calls)
        try:
            for call in remaining:
                if not self.watching:  # (no stop, no handler removed: nothing else is read per call)
                    yield call
                elif self._deadline is not None and self.abandoned():
                    self.drop(call)
                elif self.unsubscribed(call):
                    self.pass_over(call)
                else:
                    yield call
        finally:
            for call in remaining:
                self.drop(call)

    def holding(self) -> bool:
        """Whether replies are held now."""
        return bool(self._held)

    def starting(self, call: Call) -> float:
        """A handler is about to run; when it starts (see `replies_held`). Only services
        are timed: the held replies go out before any other handler."""
        return self.handler_starting(call.handler, call.pattern == "service")

    def handler_starting(self, handler: Callable[..., Any], timed: bool) -> float:
        """`starting`, for ``handler`` (a service's if ``timed``) without its `Call`."""
        if self._held:
            try:
                quick = handler in self._quick_handlers
            except TypeError:  # an unhashable callable: never timed
                quick = False
            if not quick:
                self.release_held()
        return time.monotonic() if timed else 0.0

    def release_held(self) -> None:
        """Send the replies held so far, and go on holding (before handlers that may be slow)."""
        if self._held:
            held, self._held = self._held, {}
            for caller, (_size, replies, _frame, others) in held.items():
                self._send_held(caller, replies, len(replies) - others)

    def finished(self, call: Call, started: float) -> None:
        """The handler of ``call``, started at ``started`` (`starting`), returned."""
        self.handler_times.finished(call.handler, started)

    def _send_held(self, caller: bytes, replies: list[tuple[bytes, bytes, bytes]], answers: int) -> None:
        """Send the ``replies`` held for ``caller``, ``answers`` of them handlers' (counted as
        sent as they go, not while held: a caller gone meanwhile made ``service.sent`` go
        down, which Prometheus takes for a restart; taken back at once, and all counted as
        dropped, if they cannot go)."""
        if len(replies) == 1:
            frame = wire.reply_frames((caller, replies[0][0]), replies[0][1], replies[0][2])[1]
        else:
            frame = wire.reply_batch(replies)
        self.stats.pattern["service"]["sent"] += answers
        self._router_used = True
        try:
            send_frames(self.router, [caller, frame])
        except zmq.ZMQError:
            self.stats.pattern["service"]["dropped"] += len(replies)
            self.stats.pattern["service"]["sent"] -= answers

    def drop(self, call: Call) -> None:
        """Count a call abandoned at a stop's deadline, or cut short by it (owner thread,
        or once the owner is done)."""
        self.left_at_stop.count(call.pattern, call.route, 1)
        if type(call.route) is BatchAck:  # (its pusher is told which items were left: `AckedIntake.answer_left`)
            self.acked.leave(call.route, (call.index,))

    def report_left_at_stop(self, name: str) -> None:
        """Log what the stop left unhandled (counted as dropped where it happened); what a
        handler still running then leaves is logged when the sockets close after it."""
        self.left_at_stop.report(name)

    def apply_subscriptions(self) -> None:
        """Bring the SUB socket's subscriptions in line with the registry (owner thread only)."""
        if self.subscriptions.apply(self.sub):
            self._sub_used = True

    def _events_read(self, sock: zmq.Socket[Any]) -> None:
        """``sock``'s events were just read, after its use so far (replies sent, those sent
        in place included; subscriptions set): `used_with_input` need not look at it."""
        if sock is self.router:
            self._router_used = False
        elif sock is self.sub:
            self._sub_used = False

    def used_with_input(self) -> list[tuple[zmq.Socket[Any], str]]:
        """Of the sockets used since the last call (replies sent on the router, the SUB's
        subscriptions set), those that hold a message now (owner thread only).

        A socket's descriptor signals only once its events were read after its last use,
        and using it may take a signal with it (see `has_input`): a driver that sleeps on
        the descriptors calls this before it sleeps, and drains what it names."""
        if not (self._router_used or self._sub_used):
            return []
        if not self._sub_used:  # (the common case, after a request served: the router alone)
            self._router_used = False
            return [self.sockets[0]] if self._router_has_input() else []
        used = []
        if self._router_used:
            used.append((self.router, "req"))
        if self._sub_used:
            used.append((self.sub, "sub"))
        self._router_used = self._sub_used = False
        return with_input(used)

    def close_sockets(self) -> None:
        """Close the three sockets (owner thread only); the replies not yet gone get
        `_REPLY_LINGER_MS` to go. A stopping node first answers the at-least-once batches
        its stop cut short (`AckedIntake.answer_left`), and counts the messages left unread in
        the PULL and SUB sockets as dropped (a request left in the router is not read: its
        caller hears that its provider left); if the stop already reported, what was left
        since (a handler that outlived it) is reported now."""
        if self.stopping:
            self.acked.answer_left()
            try:
                self.left_at_stop.count_unread(self.pull, self.sub, self.codec,
                                               self.subscriptions.durable_only)
            except zmq.ZMQError:  # (closed already)
                pass
        for sock, _kind in self.sockets:
            sock.close(_REPLY_LINGER_MS if sock is self.router else 0)
        self._newest_views.clear()
        self._held_bytes = 0
        self.left_at_stop.report_late()


