"""The inbound side of a node, sans threads: decode what the SUB, PULL and service ROUTER
received, hand each message to its handler, and send replies and acknowledgements.

The sockets are drained in bounded bursts; each message is decoded once and handed to its
handler in place (no task and no thread hand-off per message). `Dispatcher` holds every
rule; the drivers (`ThreadInbox` for `Node`, `LoopInbox` for `AsyncNode`) only decide
where and when handlers run:

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

import inspect
import logging
import time
import traceback
import uuid as uuid_module  # "uuid" names the sender's UUID in the decoders
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from .._io.sockets import has_input, recv_frames, send_frames
from .._mesh.directory import Directory
from .._mesh.registry import PullOptions, Registry
from .._stats import Stats
from .._store.sqlite import Store
from .._wire import frames as wire
from .._wire.codec import DURABLE_ITEM_FIELDS, Codec
from ..config import NodeConfig
from ..errors import DecodeError
from ..message import Message, Origin
from .pubsub import GapCounter

__all__ = ["Dispatcher", "Call", "BatchAck", "is_async", "run_sync", "run_async", "run_batch"]

log = logging.getLogger("zmqmesh.inbox")

_BURST = 256
_TRIM_EVERY = 10_000  # remembered ids between trims of a dedupe window
_MAX_GUARDS = 1024
_PATTERN_OF = {"sub": "pubsub", "pull": "pipeline", "req": "service"}


class BatchAck:
    """Acknowledges an at-least-once batch once every message of it has been handled,
    naming the durable items whose handler failed (``failures``)."""

    __slots__ = ("route", "remaining", "queue", "options", "failures")

    def __init__(self, route: tuple[bytes, bytes], remaining: int, queue: str = "",
                 options: PullOptions | None = None) -> None:
        self.route = route
        self.remaining = remaining
        self.queue = queue
        self.options = options or PullOptions(at_least_once=True)
        self.failures: list[list[Any]] = []


class Call:
    """One handler invocation: ``handler(arg)``, and where its reply goes, if anywhere."""

    __slots__ = ("handler", "arg", "route", "pattern", "index")

    def __init__(self, handler: Callable[..., Any], arg: Any, route: tuple[bytes, bytes] | BatchAck | None,
                 pattern: str) -> None:
        self.handler = handler
        self.arg = arg
        self.route = route
        self.pattern = pattern

    def in_batch(self, index: int) -> Call:
        """Note the call's place in its at-least-once batch (set only there: calls are
        made per message on the hot paths)."""
        self.index = index
        return self


_ASYNC: dict[Any, bool] = {}


def is_async(handler: Callable[..., Any]) -> bool:
    """True for ``async def`` handlers (and callables whose ``__call__`` is one); cached."""
    try:
        return _ASYNC[handler]
    except (KeyError, TypeError):
        found = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)
        try:
            _ASYNC[handler] = found
        except TypeError:  # unhashable callable
            pass
        return found


class Dispatcher:
    """Decoding, dispatch and replies, shared by both inbox drivers; owns the three inbound
    sockets. ``describe`` gives the built-in stats service its answer."""

    def __init__(self, *, config: NodeConfig, registry: Registry, directory: Directory, codec: Codec,
                 stats: Stats, describe: Callable[[], dict[str, Any]],
                 sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any],
                 store: Store | None = None,
                 keeper: Callable[[str, list[tuple[str, float, bytes | None, bytes]]], None] | None = None) -> None:
        self.store = store
        self.keeper = keeper
        self._guards: dict[tuple[Callable[..., Any], str], Callable[..., Any]] = {}
        self._remembered: dict[str, int] = {}
        self.config = config
        self.registry = registry
        self.directory = directory
        self.codec = codec
        self.stats = stats
        self.describe = describe
        self.sub = sub
        self.pull = pull
        self.router = router
        self.sockets = ((router, "req"), (pull, "pull"), (sub, "sub"))
        self.events: deque[Call] = deque()
        self.gaps = GapCounter()
        self.subscribed: set[str] = set()
        self._topic_cache: dict[bytes, tuple[str, list[Callable[..., Any]]]] = {}
        self._cache_version = -1
        self.stopping = False
        self._deadline: float | None = None

    def abandoned(self) -> bool:
        """True once a stop's deadline has passed: work still queued is then dropped."""
        return self._deadline is not None and time.monotonic() > self._deadline

    def begin_stop(self, timeout: float) -> None:
        """Take no new work; what has arrived may still be handled for ``timeout`` seconds."""
        self._deadline = time.monotonic() + timeout
        self.stopping = True

    # -- decoding -------------------------------------------------------------------------

    def gather(self, calls: list[Call], active: Any) -> list[tuple[zmq.Socket[Any], str]]:
        """Queue the pending event callbacks, then a burst from each of the ``active``
        ``(socket, kind)`` pairs, into ``calls``; returns the pairs that may hold more."""
        events = self.events
        while events:
            calls.append(events.popleft())
        return [(sock, kind) for sock, kind in active if self.drain(sock, kind, calls)]

    def post(self, calls: list[Call]) -> None:
        """Queue event callbacks (joins, leaves, whispers) to run in order with messages."""
        self.events.extend(calls)
        self.wake()

    def wake(self) -> None:
        """Make the driver look at its queues (the drivers say how)."""
        raise NotImplementedError

    def drain(self, sock: zmq.Socket[Any], kind: str, calls: list[Call]) -> bool:
        """Receive up to a burst from ``sock`` into ``calls``; True if more may be waiting."""
        for i in range(_BURST):
            if i == 1 and not has_input(sock):
                return False  # the common single message: a flag check, not a raised Again
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return False
            except zmq.ZMQError as exc:
                log.debug("receive failed: %s", exc)
                return False
            try:
                if kind == "req":
                    self._decode_request(frames, calls)
                else:
                    self._decode_stream(kind, frames, calls)
            except Exception as exc:  # malformed input from the wire
                self.stats.pattern[_PATTERN_OF[kind]]["errors"] += 1
                self.stats.reject(f"{_PATTERN_OF[kind]}_malformed")
                log.debug("dropping a malformed %s message: %s", kind, exc)
        return True

    def _decode_stream(self, kind: str, frames: list[bytes], calls: list[Call]) -> None:
        stats = self.stats
        pattern = _PATTERN_OF[kind]
        counters = stats.pattern[pattern]
        if len(frames) not in (3, 4):
            raise DecodeError(f"{len(frames)} frames, expected 3 or 4")
        name_b, sender_b, body = frames[:3]
        if len(name_b) > wire.MAX_NAME_BYTES:  # no sender may use one; it would bloat the caches
            raise DecodeError(f"a {len(name_b)}-byte topic or queue name")
        uuid, sequence = wire.parse_sender(sender_b)
        sender_id = uuid.hex() if uuid is not None else None
        items = self.codec.decode_batch(body)
        origin = None
        if len(frames) == 4 or (kind == "sub" and sequence is not None):
            headers, timestamp, first = self._meta_of(frames[3], len(items)) if len(frames) == 4 else (None, None, None)
            if kind == "sub":
                first = sequence
            if first is not None and sender_id is not None:
                stem = f"{sender_id}/{name_b.decode('utf-8', 'replace')}/" if kind == "sub" else f"{sender_id}/"
            else:  # no numbers on the wire: ids made here
                stem, first = f"{uuid_module.uuid4().hex}/", 0
            origin = Origin(stem, first, timestamp, headers)
        counters["received"] += len(items)
        # only members are counted per sender: a stranger could claim any number of ids
        known = sender_id is not None and sender_id in self.directory.alive_ids
        if known:
            stats.peer_received[sender_id] += len(items)  # type: ignore[index]
        if kind == "sub":
            if known and sequence is not None and uuid is not None:
                lost = self.gaps.missed(uuid, name_b, sequence, len(items))
                if lost:
                    counters["dropped"] += lost  # lost at a high-water mark
            topic, handlers = self._topic_handlers(name_b)
        else:
            topic = name_b.decode("utf-8", "replace")
            handler = self.registry.queues.get(topic)
            handlers = [handler] if handler is not None else []
            if not handlers:
                counters["dropped"] += len(items)
                stats.reject("pipeline_no_handler", len(items))
                log.warning("%d message(s) for queue %r which this node no longer pulls", len(items), topic)
                return
        lookup = self.directory.lookup_peer
        if self.runs_in_place(handlers):
            # the hot path: call the handlers right here, no Call objects, no hand-off
            errors = 0
            for index, data in enumerate(items):
                msg = Message(pattern, topic, data, sender_id, lookup, origin, index)
                for handler in handlers:
                    try:
                        handler(msg)
                    except Exception:
                        errors += 1
                        log.exception("handler %s raised", getattr(handler, "__qualname__", handler))
            if errors:
                counters["errors"] += errors
            return
        for index, data in enumerate(items):
            msg = Message(pattern, topic, data, sender_id, lookup, origin, index)
            for handler in handlers:
                calls.append(Call(handler, msg, None, pattern))

    def _meta_of(self, frame: bytes, count: int) -> tuple[list[dict[str, str] | None], float | None, int | None]:
        """``(headers per message, timestamp, first number)`` from the meta frame of a batch
        of ``count`` messages. Raises `DecodeError`."""
        meta = self.codec.decode(frame)
        headers = meta.get("h") if isinstance(meta, dict) else None
        if not isinstance(headers, list) or len(headers) != count:
            raise DecodeError("a meta frame that does not match its messages")
        for entry in headers:
            if entry is not None:
                try:
                    wire.check_headers(entry)
                except (TypeError, ValueError) as exc:
                    raise DecodeError(f"bad headers: {exc}") from None
        stamp, first = meta.get("t"), meta.get("n")
        timestamp = float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else None
        number = first if isinstance(first, int) and not isinstance(first, bool) and first >= 0 else None
        return headers, timestamp, number

    def runs_in_place(self, handlers: list[Callable[..., Any]]) -> bool:
        """Whether these handlers may be called directly while draining (see the drivers)."""
        return False

    def _topic_handlers(self, name_b: bytes) -> tuple[str, list[Callable[..., Any]]]:
        registry = self.registry
        if self._cache_version != registry.version or len(self._topic_cache) > 4096:
            self._topic_cache.clear()
            self._cache_version = registry.version
        hit = self._topic_cache.get(name_b)
        if hit is None:
            topic = name_b.decode("utf-8", "replace")
            handlers = [h for prefix, hs in registry.topics.items() if topic.startswith(prefix) for h in hs]
            hit = self._topic_cache[name_b] = (topic, handlers)
        return hit

    def _decode_request(self, frames: list[bytes], calls: list[Call]) -> None:
        counters = self.stats.pattern["service"]
        request = wire.parse_request(frames)
        if request is None:
            raise DecodeError("malformed request envelope")
        route, service_b, body, meta = request
        service = service_b.decode("utf-8", "replace")
        sender_id = wire.sender_of_requester(route[0])
        if service.startswith(wire.QUEUE_SERVICE_PREFIX):
            self._decode_reliable(service[len(wire.QUEUE_SERVICE_PREFIX):], route, body, sender_id, calls)
            return
        if service.startswith(wire.KEEP_SERVICE_PREFIX):
            self._keep(service[len(wire.KEEP_SERVICE_PREFIX):], route, body)
            return
        if service == wire.STATS_SERVICE:  # built in: every node reports its counters
            try:
                self.send_reply(route, wire.STATUS_OK, self.codec.encode(self.describe()))
            except (TypeError, ValueError) as exc:
                info = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
                self.send_reply(route, wire.STATUS_ERROR, self.codec.encode(info))
            return
        handler = self.registry.services.get(service)
        counters["received"] += 1
        if handler is None:
            self.send_reply(route, wire.STATUS_NO_SERVICE, b"")
            return
        try:
            data = self.codec.decode(body)
        except DecodeError:
            counters["errors"] += 1
            self.stats.reject("service_malformed")
            self.send_reply(route, wire.STATUS_BAD_REQUEST, b"")
            return
        msg = Message("request", service, data, sender_id, self.directory.lookup_peer)
        msg.id = f"{route[0].hex()}/{route[1].hex()}"
        if meta is not None:
            try:
                info = self.codec.decode(meta)
                msg.headers = wire.check_headers(info.get("h") or {})
                stamp = info.get("t")
                msg.timestamp = float(stamp) if isinstance(stamp, (int, float)) else None
            except Exception:
                counters["errors"] += 1
                self.stats.reject("service_malformed")
                self.send_reply(route, wire.STATUS_BAD_REQUEST, b"")
                return
        calls.append(Call(handler, msg, route, "service"))

    def _decode_reliable(self, queue: str, route: tuple[bytes, bytes], body: bytes, sender_id: str | None,
                         calls: list[Call]) -> None:
        handler = self.registry.queues.get(queue)
        if handler is None or queue not in self.registry.ack_queues:
            self.send_reply(route, wire.STATUS_NO_SERVICE, b"")  # the pusher deals them elsewhere
            return
        items = self.codec.decode_batch(body)
        if not all(_valid_item(i) for i in items):
            raise DecodeError("malformed at-least-once batch")
        self.stats.pattern["pipeline"]["received"] += len(items)
        if sender_id is not None:
            self.stats.peer_received[sender_id] += len(items)
        options = self.registry.pull_options.get(queue) or PullOptions(at_least_once=True)
        ack = BatchAck(route, len(items), queue, options)
        seen: set[str] | None = None
        if options.dedupe and self.store is not None:
            seen = self.store.seen(queue, [i[2] for i in items if len(i) == DURABLE_ITEM_FIELDS])
        for index, item in enumerate(items):
            msg = Message("pipeline", queue, item[1], sender_id, self.directory.lookup_peer)
            msg.redelivered = item[0]
            if len(item) == DURABLE_ITEM_FIELDS:
                msg.id, msg.timestamp, msg.headers, msg.attempts = item[2], float(item[3]), item[4] or {}, item[5]
                if seen is not None and msg.id in seen:  # handled before (its ack was lost): effectively once
                    counters = self.stats.pattern["pipeline"]
                    counters["deduplicated"] = counters.get("deduplicated", 0) + 1
                    ack.remaining -= 1
                    continue
                if msg.attempts >= options.max_deliveries:  # e.g. it timed out every time
                    ack.failures.append([index, options.dead_letter_queue(queue),
                                         f"no acknowledgement after {msg.attempts} deliveries"])
                    ack.remaining -= 1
                    continue
            guarded = self._once(handler, queue) if seen is not None and msg.timestamp is not None else handler
            calls.append(Call(guarded, msg, ack, "pipeline").in_batch(index))
        if ack.remaining == 0:
            self._acknowledge(ack)

    def _once(self, handler: Callable[..., Any], queue: str) -> Callable[..., Any]:
        """``handler``, skipped for a message already handled: checked again as it is
        called, since a redelivery may arrive while the first delivery still runs. One
        guard per handler and queue (made once, kept while the registry holds them)."""
        key = (handler, queue)
        guard = self._guards.get(key)
        if guard is None:
            if len(self._guards) >= _MAX_GUARDS:
                self._guards.clear()
            guard = self._guards[key] = self._make_once(handler, queue)
        return guard

    def _make_once(self, handler: Callable[..., Any], queue: str) -> Callable[..., Any]:
        store = self.store
        assert store is not None
        counters = self.stats.pattern["pipeline"]

        def skip(msg: Message) -> bool:
            if store.seen(queue, [msg.id]):
                counters["deduplicated"] = counters.get("deduplicated", 0) + 1
                return True
            return False

        if is_async(handler):
            async def once_async(msg: Message) -> Any:
                return None if skip(msg) else await handler(msg)

            return once_async

        def once(msg: Message) -> Any:
            return None if skip(msg) else handler(msg)

        return once

    def _keep(self, queue: str, route: tuple[bytes, bytes], body: bytes) -> None:
        """A stopping pusher hands over durable messages of a queue this node keeps: store
        them (committed) before acknowledging; they are then this node's to deliver."""
        if queue not in self.registry.keeps or self.keeper is None:
            self.send_reply(route, wire.STATUS_NO_SERVICE, b"")
            return
        items = self.codec.decode_batch(body)
        if not all(_valid_item(i) for i in items):
            raise DecodeError("malformed batch handed to a keeper")
        encode = self.codec.encode
        now = time.time()
        entries = [
            (i[2], float(i[3]), encode(i[4]) if i[4] else None, encode(i[1])) if len(i) == DURABLE_ITEM_FIELDS
            else (uuid_module.uuid4().hex, now, None, encode(i[1]))
            for i in items
        ]
        try:
            self.keeper(queue, entries)
        except Exception as exc:  # full or failing store: the pusher keeps them
            log.error("cannot keep %d message(s) of %r: %s", len(entries), queue, exc)
            self.send_reply(route, wire.STATUS_ERROR, b"")
            return
        counters = self.stats.pattern["pipeline"]
        counters["kept"] = counters.get("kept", 0) + len(entries)
        self.send_reply(route, wire.STATUS_OK, b"")

    # -- replying ---------------------------------------------------------------------------

    def complete(self, call: Call, result: Any, error: BaseException | None) -> None:
        """Account for a finished call and send the reply of a request (owner thread only)."""
        route = call.route
        if error is not None:
            self.stats.pattern[call.pattern]["errors"] += 1
            if not isinstance(route, tuple):
                log.error("handler %s raised", getattr(call.handler, "__qualname__", call.handler), exc_info=error)
        if isinstance(route, BatchAck):
            msg = call.arg
            if msg.timestamp is not None:  # a durable item: its outcome goes back to the pusher
                if error is not None:
                    attempts = msg.attempts + 1
                    dead = route.options.dead_letter_queue(route.queue) if attempts >= route.options.max_deliveries else None
                    route.failures.append([call.index, dead, f"{type(error).__name__}: {error}"])
                elif route.options.dedupe:
                    self._remember(route, msg.id)
            route.remaining -= 1
            if route.remaining == 0:
                self._acknowledge(route)
            return
        if route is None:
            return
        codec = self.codec
        if error is None:
            try:
                body = codec.encode(result)
                status = wire.STATUS_OK
            except Exception as exc:  # an unencodable return value is the handler's failure
                error = exc
        if error is not None:
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            body = codec.encode({"type": type(error).__name__, "message": str(error), "traceback": tb})
            status = wire.STATUS_ERROR
        self.send_reply(route, status, body)
        self.stats.pattern["service"]["sent"] += 1

    def _remember(self, ack: BatchAck, msg_id: str) -> None:
        """Commit that a dedupe puller handled ``msg_id``, as soon as its handler returned
        (a crash after this point cannot make it run again)."""
        assert self.store is not None
        try:
            self.store.remember(ack.queue, [msg_id])
            count = self._remembered[ack.queue] = self._remembered.get(ack.queue, 0) + 1
            if count >= _TRIM_EVERY:
                self._remembered[ack.queue] = 0
                self.store.trim_handled(ack.queue, ack.options.dedupe_window)
        except Exception as exc:
            log.error("cannot record message %s of %r as handled: %s", msg_id[:12], ack.queue, exc)

    def _acknowledge(self, ack: BatchAck) -> None:
        """Tell the pusher the batch is done, naming the items whose handler failed."""
        body = self.codec.encode(ack.failures) if ack.failures else b""
        self.send_reply(ack.route, wire.STATUS_OK, body)

    def send_reply(self, route: tuple[bytes, bytes], status: bytes, body: bytes) -> None:
        """Send a reply to ``route``; an unreachable caller is counted."""
        try:
            send_frames(self.router, wire.reply_frames(route, status, body), copy=len(body) < 65536)
        except zmq.ZMQError:
            self.stats.pattern["service"]["dropped"] += 1

    def drop(self, call: Call) -> None:
        """Count a call abandoned at a stop's deadline."""
        self.stats.pattern[call.pattern]["dropped"] += 1

    def apply_subscriptions(self) -> None:
        """Bring the SUB socket's subscriptions in line with the registry (owner thread only)."""
        wanted = set(self.registry.topics)
        for prefix in wanted - self.subscribed:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        for prefix in self.subscribed - wanted:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, prefix.encode())
        self.subscribed = wanted

    def close_sockets(self) -> None:
        """Close the three sockets (owner thread only)."""
        for sock, _kind in self.sockets:
            sock.close(0)


def _valid_item(item: Any) -> bool:
    """An at-least-once item: ``[redelivered, data]`` or the durable
    ``[redelivered, data, id, timestamp, headers, attempts]``."""
    if not isinstance(item, list) or not item or not isinstance(item[0], bool):
        return False
    if len(item) == 2:
        return True
    if len(item) != DURABLE_ITEM_FIELDS:
        return False
    _flag, _data, msg_id, timestamp, headers, attempts = item
    if not isinstance(msg_id, str) or len(msg_id) > wire.MAX_ID_CHARS:
        return False
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        return False
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        return False
    if headers is not None:
        try:
            wire.check_headers(headers)
        except (TypeError, ValueError):
            return False
    return True


def run_sync(call: Call) -> tuple[Any, BaseException | None]:
    """Call a sync handler, capturing its outcome."""
    try:
        return call.handler(call.arg), None
    except Exception as exc:
        return None, exc


async def run_async(call: Call) -> tuple[Any, BaseException | None]:
    """Await a handler (sync handlers here are only the loop's own callbacks)."""
    try:
        result = call.handler(call.arg)
        if inspect.isawaitable(result):
            result = await result
        return result, None
    except Exception as exc:
        return None, exc


def run_batch(batch: list[Call]) -> list[tuple[Any, BaseException | None]]:
    """Call the sync handlers of a burst in order (on a worker thread), capturing outcomes."""
    return [run_sync(call) for call in batch]
