"""The inbound side of a node: its SUB, PULL and service ROUTER, and the handlers they feed.

The sockets are drained in bounded bursts; each message is decoded once and handed to its
handler in place (no task and no thread hand-off per message). Where handlers run:

* `ThreadInbox` (the sync `Node`): a dedicated thread owns the sockets and calls ``def``
  handlers directly; ``async def`` handlers run on an asyncio loop of their own, on a
  thread started the first time one is called (so a node without them never loads asyncio).
* ``LoopInbox`` (`AsyncNode`, in `aio`): the caller's event loop owns the sockets and
  awaits ``async def`` handlers in place; ``def`` handlers run on a worker thread, a burst
  at a time, so they never block the loop.

Either way the event loop that answers heartbeats never runs a sync handler (and with
`Node`, no handler at all). With
``handler_concurrency == 1`` handlers run one at a time in arrival order; above 1, up
to that many run at once.

A handler that raises is logged and counted; for a service the exception's type, message
and traceback travel back to the caller. Undecodable input is counted and dropped.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING, Any

import zmq

from . import wire
from .errors import DecodeError, NodeClosedError
from .message import Message
from .reliable import QUEUE_SERVICE_PREFIX
from .sockets import has_input, recv_frames, send_frames

STATS_SERVICE = "\x00stats"

if TYPE_CHECKING:
    from .core import MeshCore

__all__ = ["Inbox", "ThreadInbox", "Call", "is_async"]

log = logging.getLogger("zmqmesh.inbox")

_BURST = 256
_MAX_TRACKED_STREAMS = 65_536
_MAX_GAP = 1 << 32  # a larger jump is a restarted or lying sequence, not a count of drops
_PATTERN_OF = {"sub": "pubsub", "pull": "pipeline", "req": "service"}


class BatchAck:
    """Acknowledges an at-least-once batch once every message of it has been handled."""

    __slots__ = ("route", "remaining")

    def __init__(self, route: tuple[bytes, bytes], remaining: int) -> None:
        self.route = route
        self.remaining = remaining


class Call:
    """One handler invocation: ``handler(arg)``, and where its reply goes, if anywhere."""

    __slots__ = ("handler", "arg", "route", "pattern")

    def __init__(self, handler: Callable[..., Any], arg: Any, route: tuple[bytes, bytes] | BatchAck | None, pattern: str) -> None:
        self.handler = handler
        self.arg = arg
        self.route = route
        self.pattern = pattern


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


class Inbox:
    """Decoding and dispatch shared by both drivers; owns the three inbound sockets."""

    def __init__(self, core: MeshCore, sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any]) -> None:
        self.core = core
        self.sub = sub
        self.pull = pull
        self.router = router
        self.sockets = ((router, "req"), (pull, "pull"), (sub, "sub"))
        self.events: deque[Call] = deque()
        self.pub_sequences: dict[tuple[bytes, bytes], int] = {}
        self.subscribed: set[str] = set()
        self._topic_cache: dict[bytes, tuple[str, list[Callable[..., Any]]]] = {}
        self._cache_version = -1
        self._stopping = False
        self._deadline: float | None = None

    def abandoned(self) -> bool:
        """True once a stop's deadline has passed: work still queued is then dropped."""
        return self._deadline is not None and time.monotonic() > self._deadline

    # -- decoding -------------------------------------------------------------------------

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
                self.core.stats.pattern[_PATTERN_OF[kind]]["errors"] += 1
                self.core.stats.reject(f"{_PATTERN_OF[kind]}_malformed")
                log.debug("dropping a malformed %s message: %s", kind, exc)
        return True

    def _decode_stream(self, kind: str, frames: list[bytes], calls: list[Call]) -> None:
        core = self.core
        pattern = _PATTERN_OF[kind]
        counters = core.stats.pattern[pattern]
        if len(frames) != 3:
            raise DecodeError(f"{len(frames)} frames, expected 3")
        name_b, sender_b, body = frames
        if len(name_b) > wire.MAX_NAME_BYTES:  # no sender may use one; it would bloat the caches
            raise DecodeError(f"a {len(name_b)}-byte topic or queue name")
        uuid, sequence = wire.parse_sender(sender_b)
        sender_id = uuid.hex() if uuid is not None else None
        items = core.codec.decode_batch(body)
        counters["received"] += len(items)
        # only members are counted per sender: a stranger could claim any number of ids
        known = sender_id is not None and sender_id in core.alive_ids
        if known:
            core.stats.peer_received[sender_id] += len(items)  # type: ignore[index]
        if kind == "sub":
            if known and sequence is not None and uuid is not None:
                key = (uuid, name_b)
                expected = self.pub_sequences.get(key)
                if expected is not None and expected < sequence <= expected + _MAX_GAP:
                    counters["dropped"] += sequence - expected  # lost at a high-water mark
                elif expected is None and len(self.pub_sequences) >= _MAX_TRACKED_STREAMS:
                    self.pub_sequences.clear()  # bounded memory: gap counting restarts
                self.pub_sequences[key] = sequence + len(items)
            topic, handlers = self._topic_handlers(name_b)
        else:
            topic = name_b.decode("utf-8", "replace")
            handler = core.registry.queues.get(topic)
            handlers = [handler] if handler is not None else []
            if not handlers:
                counters["dropped"] += len(items)
                core.stats.reject("pipeline_no_handler", len(items))
                log.warning("%d message(s) for queue %r which this node no longer pulls", len(items), topic)
                return
        lookup = core.lookup_peer
        if self.runs_in_place(handlers):
            # the hot path: call the handlers right here, no Call objects, no hand-off
            errors = 0
            for data in items:
                msg = Message(pattern, topic, data, sender_id, lookup)
                for handler in handlers:
                    try:
                        handler(msg)
                    except Exception:
                        errors += 1
                        log.exception("handler %s raised", getattr(handler, "__qualname__", handler))
            if errors:
                counters["errors"] += errors
            return
        for data in items:
            msg = Message(pattern, topic, data, sender_id, lookup)
            for handler in handlers:
                calls.append(Call(handler, msg, None, pattern))

    def runs_in_place(self, handlers: list[Callable[..., Any]]) -> bool:
        """Whether these handlers may be called directly while draining (see the drivers)."""
        return False

    def _topic_handlers(self, name_b: bytes) -> tuple[str, list[Callable[..., Any]]]:
        registry = self.core.registry
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
        core = self.core
        counters = core.stats.pattern["service"]
        if len(frames) != 4 or len(frames[2]) > wire.MAX_REQUEST_ID_BYTES:
            raise DecodeError("malformed request envelope")
        routing_id, service_b, request_id, body = frames
        route = (routing_id, request_id)
        service = service_b.decode("utf-8", "replace")
        sender_id = routing_id[: wire.UUID_SIZE].hex() if len(routing_id) == wire.UUID_SIZE + 4 else None
        if service.startswith(QUEUE_SERVICE_PREFIX):
            self._decode_reliable(service[len(QUEUE_SERVICE_PREFIX):], route, body, sender_id, calls)
            return
        if service == STATS_SERVICE:  # built in: every node reports its counters
            snapshot = {"id": core.node_id, "name": core.name, **core.stats.snapshot()}
            try:
                self.send_reply(route, wire.STATUS_OK, core.codec.encode(snapshot))
            except (TypeError, ValueError) as exc:
                info = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
                self.send_reply(route, wire.STATUS_ERROR, core.codec.encode(info))
            return
        handler = core.registry.services.get(service)
        counters["received"] += 1
        if handler is None:
            self.send_reply(route, wire.STATUS_NO_SERVICE, b"")
            return
        try:
            data = core.codec.decode(body)
        except DecodeError:
            counters["errors"] += 1
            core.stats.reject("service_malformed")
            self.send_reply(route, wire.STATUS_BAD_REQUEST, b"")
            return
        calls.append(Call(handler, Message("request", service, data, sender_id, core.lookup_peer), route, "service"))

    def _decode_reliable(self, queue: str, route: tuple[bytes, bytes], body: bytes, sender_id: str | None,
                         calls: list[Call]) -> None:
        core = self.core
        handler = core.registry.queues.get(queue)
        if handler is None or queue not in core.registry.ack_queues:
            self.send_reply(route, wire.STATUS_NO_SERVICE, b"")  # the pusher deals them elsewhere
            return
        items = core.codec.decode_batch(body)
        if not all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], bool) for i in items):
            raise DecodeError("malformed at-least-once batch")
        core.stats.pattern["pipeline"]["received"] += len(items)
        if sender_id is not None:
            core.stats.peer_received[sender_id] += len(items)
        ack = BatchAck(route, len(items))
        for redelivered, data in items:
            msg = Message("pipeline", queue, data, sender_id, core.lookup_peer)
            msg.redelivered = redelivered
            calls.append(Call(handler, msg, ack, "pipeline"))

    # -- running and replying --------------------------------------------------------------

    def complete(self, call: Call, result: Any, error: BaseException | None) -> None:
        """Account for a finished call and send the reply of a request (owner thread only)."""
        route = call.route
        if error is not None:
            self.core.stats.pattern[call.pattern]["errors"] += 1
            if not isinstance(route, tuple):
                log.error("handler %s raised", getattr(call.handler, "__qualname__", call.handler), exc_info=error)
        if isinstance(route, BatchAck):
            route.remaining -= 1
            if route.remaining == 0:
                self.send_reply(route.route, wire.STATUS_OK, b"")
            return
        if route is None:
            return
        codec = self.core.codec
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
        self.core.stats.pattern["service"]["sent"] += 1

    def send_reply(self, route: tuple[bytes, bytes], status: bytes, body: bytes) -> None:
        """Send ``[routing_id, request_id, status, body]``; an unreachable caller is counted."""
        try:
            send_frames(self.router, [route[0], route[1], status, body], copy=len(body) < 65536)
        except zmq.ZMQError:
            self.core.stats.pattern["service"]["dropped"] += 1

    @staticmethod
    def run_sync(call: Call) -> tuple[Any, BaseException | None]:
        """Call a sync handler, capturing its outcome."""
        try:
            return call.handler(call.arg), None
        except Exception as exc:
            return None, exc

    @staticmethod
    async def run_async(call: Call) -> tuple[Any, BaseException | None]:
        """Await a handler (sync handlers here are only the loop's own callbacks)."""
        try:
            result = call.handler(call.arg)
            if inspect.isawaitable(result):
                result = await result
            return result, None
        except Exception as exc:
            return None, exc

    def apply_subscriptions(self) -> None:
        """Bring the SUB socket's subscriptions in line with the registry (owner thread only)."""
        wanted = set(self.core.registry.topics)
        for prefix in wanted - self.subscribed:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        for prefix in self.subscribed - wanted:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, prefix.encode())
        self.subscribed = wanted

    def close_sockets(self) -> None:
        """Close the three sockets (owner thread only)."""
        for sock, _kind in self.sockets:
            sock.close(0)


class ThreadInbox(Inbox):
    """Runs the inbox on its own thread: ``def`` handlers run here, in place."""

    def __init__(self, core: MeshCore, sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any]) -> None:
        super().__init__(core, sub, pull, router)
        self._wake_recv = core.ctx.socket(zmq.PAIR)
        self._wake_address = f"inproc://zmqmesh-inbox-{core.node_id}"
        self._wake_recv.bind(self._wake_address)
        self._wake_send = core.ctx.socket(zmq.PAIR)
        self._wake_send.connect(self._wake_address)
        self._wake_lock = threading.Lock()
        self._woken = False
        self._stopping = False
        self._resubscribe = True
        self._done: deque[tuple[Call, Any, BaseException | None]] = deque()
        concurrency = core.config.handler_concurrency
        self._pool_threads: set[int] = set()
        self._pool = ThreadPoolExecutor(
            concurrency, thread_name_prefix="zmqmesh-handler", initializer=self._pool_thread_started,
        ) if concurrency > 1 else None
        self._slots = threading.BoundedSemaphore(concurrency * 4) if concurrency > 1 else None
        self.thread = threading.Thread(target=self._run, name=f"zmqmesh-inbox-{core.name}", daemon=True)
        self._async_loop: Any = None  # an aio.HandlerLoop, made for the first async def handler
        self._async_lock = threading.Lock()
        self._async_closed = False

    def start(self) -> None:
        """Start the inbox thread."""
        self.thread.start()

    def runs_handlers_here(self) -> bool:
        """True on a thread that runs this node's handlers (inbox, handler pool, async handler loop)."""
        current = threading.current_thread()
        handler_loop = self._async_loop
        return (current is self.thread or current.ident in self._pool_threads
                or (handler_loop is not None and current is handler_loop.thread))

    def _pool_thread_started(self) -> None:
        self._pool_threads.add(threading.get_ident())

    def runs_in_place(self, handlers: list[Callable[..., Any]]) -> bool:
        """Sync handlers, one at a time: called on this thread as messages are decoded."""
        return self._pool is None and not self.abandoned() and not any(is_async(h) for h in handlers)

    def wake(self) -> None:
        """Make the inbox thread look at its queues (any thread)."""
        with self._wake_lock:
            if self._woken or self._wake_send.closed:
                return
            self._woken = True
            try:
                self._wake_send.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def post(self, calls: list[Call]) -> None:
        """Queue event callbacks (joins, leaves, whispers) to run in order with messages."""
        self.events.extend(calls)
        self.wake()

    def registry_changed(self) -> None:
        """Subscriptions may have changed: re-apply them on the inbox thread."""
        self._resubscribe = True
        self.wake()

    def stop(self, timeout: float) -> None:
        """Handle what has already arrived, then stop the thread (all within ``timeout``)."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self.wake()
        if threading.get_ident() != self.thread.ident and self.thread.is_alive():
            self.thread.join(timeout + 0.5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._async_lock:
            self._async_closed = True
            if self._async_loop is not None:
                self._async_loop.close()
        with self._wake_lock:
            self._wake_send.close(0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_recv, zmq.POLLIN)
        for sock, _kind in self.sockets:
            poller.register(sock, zmq.POLLIN)
        calls: list[Call] = []
        try:
            while not self._stopping:
                ready = dict(poller.poll(500))
                if self._wake_recv in ready:
                    with self._wake_lock:
                        self._woken = False
                        while True:
                            try:
                                self._wake_recv.recv(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                if self._resubscribe:
                    self._resubscribe = False
                    self.apply_subscriptions()
                while self._done:
                    self.complete(*self._done.popleft())
                self._drain_all(calls, [(s, k) for s, k in self.sockets if s in ready])
            self._drain_all(calls, self.sockets)  # stopping: finish what has arrived, within the deadline
        except Exception:
            log.exception("inbox thread failed")
        finally:
            self.close_sockets()
            self._wake_recv.close(0)

    def _drain_all(self, calls: list[Call], active: Any) -> None:
        """Drain the sockets the poller found ready, in bursts, until they run dry.

        Sockets that fill up meanwhile are found by the next poll (it is level-triggered),
        so no time goes into receive attempts on empty sockets.
        """
        while self.events:
            calls.append(self.events.popleft())
        while (active or calls) and not self.abandoned():
            active = [(sock, kind) for sock, kind in active if self.drain(sock, kind, calls)]
            if calls:
                self._execute(calls)
                calls.clear()
            while self._done:
                self.complete(*self._done.popleft())

    def _execute(self, calls: list[Call]) -> None:
        for call in calls:
            if self.abandoned():
                self.core.stats.pattern[call.pattern]["dropped"] += 1
                continue
            if self._pool is not None:
                self._submit(call)
                continue
            if is_async(call.handler):
                result, error = self._run_on_loop(call)
            else:
                result, error = self.run_sync(call)
            self.complete(call, result, error)

    def _run_on_loop(self, call: Call) -> tuple[Any, BaseException | None]:
        with self._async_lock:
            if self._async_loop is None:
                if self._async_closed:
                    return None, NodeClosedError("the node stopped")
                from .aio import (
                    HandlerLoop,  # asyncio is loaded only by nodes that need it
                )

                self._async_loop = HandlerLoop(f"zmqmesh-async-{self.core.name}")
            handler_loop = self._async_loop
        try:
            future = handler_loop.submit(self.run_async(call))
        except RuntimeError as exc:  # the handler loop is closed: the node is stopping
            return None, exc
        while not self.abandoned():
            try:
                return future.result(0.5)
            except FutureTimeoutError:
                continue
            except Exception as exc:  # the loop went away
                return None, exc
        future.cancel()
        return None, None

    def _submit(self, call: Call) -> None:
        assert self._pool is not None and self._slots is not None
        self._slots.acquire()
        runner = self._run_on_loop if is_async(call.handler) else self.run_sync

        def finished(fut: Future[tuple[Any, BaseException | None]]) -> None:
            self._slots.release()  # type: ignore[union-attr]
            if not fut.cancelled():
                self._done.append((call, *fut.result()))
                self.wake()

        try:
            self._pool.submit(runner, call).add_done_callback(finished)
        except RuntimeError:  # shutting down
            self._slots.release()
