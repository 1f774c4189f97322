"""The thread driver of `Node`: blocking waits, requests from threads, and the inbox thread.

Everything here only waits; the logic it waits for lives below (plans in `_engine.api`
and `_patterns.reqrep`, decoding in `_patterns.dispatch`, the stop plan in
`_engine.stop`). Its asyncio twin is `_drivers.aio`.

* `BlockingRunner` carries out a plan's steps by blocking the calling thread.
* `ThreadRequester`: one per calling thread, each with its own DEALER per provider, so a
  blocking call waits on its own socket with no hand-off to another thread.
* `ThreadInbox`: a dedicated thread owns the inbound sockets and calls ``def`` handlers
  in place; ``async def`` handlers run on a `HandlerLoop` started on first use (so a
  node without them never loads asyncio).
"""

from __future__ import annotations

import itertools
import logging
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING, Any

import zmq

from .._engine.api import OnLoop, Plan, advance, fetch_plan
from .._engine.engine import Engine
from .._engine.stop import AFTER_LOOP, CALLER, INBOX, ON_LOOP, stop_plan
from .._io.reactor import Reactor, run_on
from .._io.sockets import recv_frames, send_frames, with_input
from .._io.waker import Waker
from .._mesh.directory import Provider
from .._mesh.waiters import Room, Until
from .._patterns.calls import Call, CutShort, is_async, run_async, run_sync
from .._patterns.dispatch import Dispatcher
from .._patterns.replay import Fetch
from .._patterns.reqrep import Exchange, QuickRequest
from .._stats import RequestTally
from .._wire import frames as wire
from ..errors import MeshTimeoutError, NodeClosedError, PeerLostError, ZmqMeshError
from .failures import (
    SUBMIT_THREAD_REFUSAL,
    closed_or_failed,
    report_link_dropped,
    send_failure,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .pipelined import Pipelined, Submitter

__all__ = ["BlockingRunner", "ThreadRequester", "ThreadRequesters", "ThreadInbox", "stop_blocking", "wait_until", "wait_for_room"]

log = logging.getLogger("zmqmesh.node")

_POLL_SLICE_S = 0.05
_FREE_WAIT_S = 1.0  # (a thread in a call lets its sockets go within a poll slice of a stop)
_SLOT_WAIT_S = 0.005
_REPLY_FLUSH_S = 0.005
"""While a burst is handed to the handler pool, the replies of the handlers that returned
go out at least this often (held, they are sent a batch per caller)."""
_ROOM_SLICE_S = 0.1
_LATE_LOOP_S = 1.0
_IDLE_LOOK_MS = 500  # (the inbox comes round this often with nothing to wake it: what waits, `has_waiting`)


class BlockingRunner:
    """Runs plans (and requests that go the quick way, `QuickRequest`) on the calling
    thread (never the loop's), blocking where they wait."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, call: Plan | QuickRequest) -> Any:
        """Carry out ``call``, a plan or a request's `QuickRequest` (`advance_call`), and
        return its result; raises what it raises. A raw ZeroMQ error becomes `ZmqMeshError`
        (`NodeClosedError` once the node stopped). The calling thread's requester carries
        out its exchanges and counts what they do in its tally. Interrupted (a signal's
        `KeyboardInterrupt`), it closes the plan, which lets go of what it holds."""
        value: Any = None
        error: BaseException | None = None
        requester = None
        if isinstance(call, QuickRequest):
            # its quick way, as `advance_call` takes it, spared the steps: the exchange, and
            # the result of an OK reply; otherwise the plan goes on from there, with the outcome
            quick, requester = call, self._requester()
            step = quick.begin(requester.tally)
            if step is not None:
                value, error = self._exchange_outcome(requester, step)
                if error is None:
                    finished, result = quick.advance(value, requester.tally)
                    if finished:
                        return result
            call = quick.plan()
        while True:
            finished, step = advance(call, value, error)
            if finished:
                return step
            try:
                if type(step) is not Exchange:
                    value, error = self.carry_out(step)
                    continue
                if requester is None:
                    requester = self._requester()
                value, error = self._exchange_outcome(requester, step)
            except BaseException:  # interrupted (a signal's KeyboardInterrupt): the plan lets go of what it holds
                call.close()
                raise

    def _exchange_outcome(self, requester: ThreadRequester, step: Exchange) -> tuple[Any, BaseException | None]:
        """Carry out an exchange on the calling thread's ``requester``: ``(reply, None)``,
        or ``(None, the error)``."""
        try:
            return requester.exchange(step), None
        except zmq.ZMQError as exc:
            return None, closed_or_failed(self.engine, exc)
        except Exception as exc:
            return None, exc

    def _requester(self) -> ThreadRequester:
        requesters = self.engine.requests
        assert isinstance(requesters, ThreadRequesters), "the node is not started"
        return requesters.current()

    def carry_out(self, step: Any) -> tuple[Any, BaseException | None]:
        """Carry out one step of a plan other than an exchange (`run` does those):
        ``(value, None)``, or ``(None, the error)``."""
        try:
            if isinstance(step, Until):
                wait_until(self.engine, step.predicate, step.deadline, step.what)
            elif isinstance(step, Room):
                return wait_for_room(self.engine, step.full, step.deadline), None
            elif isinstance(step, OnLoop):
                return self.engine.call_on_loop(step.fn, *step.args), None
            else:
                raise TypeError(f"unknown step {step!r}")
            return None, None
        except zmq.ZMQError as exc:
            return None, closed_or_failed(self.engine, exc)
        except Exception as exc:
            return None, exc


def wait_until(engine: Engine, predicate: Callable[[], bool], deadline: float | None, what: str) -> None:
    """Block the calling thread (not the loop's) until ``predicate()`` holds on the loop
    (`Engine.watch`).

    The condition is checked at least once, also when the deadline has passed; None waits
    as long as the node runs. Raises `MeshTimeoutError` at the deadline, `NodeClosedError`
    if the node stops. Interrupted meanwhile (a signal's `KeyboardInterrupt`), it has the
    loop forget the wait (`Engine.forget_watch`) before the interruption goes on.
    """
    engine.ensure_running()
    if engine.on_loop_thread():
        raise ZmqMeshError("a blocking Node call was made on the node's own I/O thread")
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    # (the loop fails the waiter at the deadline; a moment more for a loop that is late. A
    # timeout past what a lock can wait, ~292 years, raised OverflowError: the loop's own
    # deadline alone then ends the wait)
    wait = None if timeout is None or timeout + _LATE_LOOP_S >= threading.TIMEOUT_MAX else timeout + _LATE_LOOP_S
    waiter: futures.Future[None] = futures.Future()  # (made here: an interruption in `watch` forgets it too)
    try:
        engine.watch(predicate, deadline, what, waiter)
        waiter.result(wait)
    except futures.TimeoutError:
        raise engine.timed_out(what, timeout) from None
    except Exception:  # (what the loop failed the wait with: it watches no more)
        raise
    except BaseException:  # interrupted (a signal's KeyboardInterrupt): the loop watches no more either
        engine.forget_watch(waiter)
        raise


def wait_for_room(engine: Engine, full: Callable[[], bool], deadline: float) -> bool:
    """Block while ``full()`` holds (back-pressure): True once there is room, False at
    ``deadline``. Raises `NodeClosedError` if the node stops."""
    space = engine.space
    flushed = False  # (woken by a flush: it just sent what it could; waking the next one at
    # once made each flush start another, 30,000 a second for as long as the queue was full)
    with space.condition:
        space.waiting += 1
        try:
            while full():
                engine.ensure_running()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if not flushed:
                    engine.outbound.wake()  # type: ignore[union-attr]
                flushed = space.condition.wait(min(remaining, _ROOM_SLICE_S))
        finally:
            space.waiting -= 1
    engine.ensure_running()  # (a stop empties the queues: that room is no place for a message)
    return True


class ThreadRequester:
    """Blocking requests from one thread (never shared between threads).

    Its sockets are its thread's alone: the thread holds `in_use` while it uses them, and
    a stop closes them only between two uses (`close`), never under a call (ZeroMQ's
    sockets are not thread-safe; a receive under way aborted the process).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.owner = threading.current_thread()
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self._ids = itertools.count(1)
        self._membership_epoch = -1
        self._slices: dict[str, int] = {}  # provider id: the RCVTIMEO its socket has (see `_wait`)
        self._pipelined: Pipelined | None = None
        self.tally = RequestTally()
        """What this thread's calls count: added to the stats every `TALLY_FOLD_AT` requests
        sent (`Stats.count_sent`), and meanwhile counted by the stats' snapshots."""
        engine.stats.track(self.tally)
        self.in_use = threading.RLock()
        """Held by the thread while it uses the sockets: `exchange` takes it, and so must a
        caller of `pipelined` (`Node.request_many`), then `check_open`, and call
        `after_call` once it let go."""
        self.closed = False

    def check_open(self) -> None:
        """Raises `NodeClosedError` once a stop closed the sockets (call holding `in_use`)."""
        if self.closed:
            raise NodeClosedError("the node stopped")

    def pipelined(self) -> Pipelined:
        """This thread's `Pipelined` (for `Node.request_many`; made on first use). A plan of
        it that must wait for something else than a reply waits right here."""
        if self._pipelined is None:
            # (imported here: a node that never pipelines requests never loads it)
            from .pipelined import Pipelined

            carry_out = BlockingRunner(self.engine).carry_out
            pipelined = self._pipelined = Pipelined(self.engine, lambda job, step: pipelined.resume(job, *carry_out(step)))
        return self._pipelined

    def exchange(self, step: Exchange) -> tuple[bytes, bytes]:
        """Send one request and wait for its reply: ``(status, body)``. Raises
        `MeshTimeoutError`, `PeerLostError`, `NodeClosedError`. What it counts goes into
        `tally`."""
        try:
            with self.in_use:
                self.check_open()
                engine = self.engine
                provider = step.provider
                if engine.directory.epoch != self._membership_epoch:
                    self._prune()
                sock = self.sockets.get(provider.id) or self._connect(provider)
                request_id = next(self._ids).to_bytes(8, "big")
                try:
                    try:
                        send_frames(sock, step.frames(request_id), copy=len(step.body) < wire.LARGE_FRAME)
                    except zmq.Again:
                        # one request of this thread in flight at most: a DEALER that refuses one lost
                        # its connection for good (see `link_dropped`), and a new one takes it
                        report_link_dropped(engine, provider.id)
                        self._slices.pop(provider.id, None)
                        self.sockets.pop(provider.id).close(0)
                        sock = self._connect(provider)
                        send_frames(sock, step.frames(request_id), copy=len(step.body) < wire.LARGE_FRAME)
                except zmq.ZMQError as exc:
                    raise send_failure(exc, provider.id, engine, step.service) from exc
                engine.stats.count_sent(self.tally, 1)
                return self._wait(sock, request_id, provider, step.service, step.deadline)
        finally:
            self.after_call()

    def after_call(self) -> None:
        """Close the sockets to providers that left during a call, once it let go of
        `in_use` (`exchange`, and a caller of `pipelined`): `ThreadRequesters.peer_gone`
        passes over a thread in a call, which would keep them until its next call. (Looked
        at after letting go: a provider that leaves later finds `in_use` free.)"""
        if self.engine.directory.epoch != self._membership_epoch:
            self.prune_if_free(wait=True)

    def prune_if_free(self, wait: bool = False) -> None:
        """Close the sockets to providers that left, unless the thread is in a call (then
        its `after_call` does), or with ``wait``, once it let go of them."""
        if not self.in_use.acquire(blocking=wait):
            return
        try:
            if not self.closed:
                self._prune()
        finally:
            self.in_use.release()

    def _wait(self, sock: zmq.Socket[Any], request_id: bytes, provider: Provider, service: str,
              deadline: float) -> tuple[bytes, bytes]:
        # a receive that waits in slices (the socket's RCVTIMEO): between them, whether the
        # node stopped (its stop closes these sockets once this call lets go of them:
        # `close`) or the provider left
        engine = self.engine
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                engine.stats.add("request", "errors")
                raise MeshTimeoutError(f"request to {service!r} timed out")
            slice_ms = int(min(remaining, _POLL_SLICE_S) * 1000) + 1
            if self._slices.get(provider.id) != slice_ms:  # (set when it changes: a deadline's last slice)
                sock.setsockopt(zmq.RCVTIMEO, slice_ms)
                self._slices[provider.id] = slice_ms
            try:
                frames = recv_frames(sock, wait=True)
            except zmq.Again:  # the slice passed
                if engine.closed:
                    raise NodeClosedError("the node stopped while a request was outstanding") from None
                if provider.id not in engine.directory.alive_ids:
                    engine.stats.add("request", "errors")
                    raise PeerLostError(f"provider {provider.id[:8]} of {service!r} left before replying",
                                        provider.id) from None
                continue
            reply = wire.parse_reply(frames)
            if reply is None or reply[0] != request_id:
                engine.stats.add("request", "dropped")  # a late reply
                continue
            counts = self.tally.counts
            counts["received"] = counts.get("received", 0) + 1
            return reply[1], reply[2]

    def _connect(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self.sockets[provider.id] = self.engine.dealer_to(provider)
        return sock

    def _prune(self) -> None:
        """Close sockets to providers that left (call when membership changed, holding `in_use`)."""
        directory = self.engine.directory
        self._membership_epoch = directory.epoch
        alive = directory.alive_ids
        for pid in [p for p in self.sockets if p not in alive]:
            self._slices.pop(pid, None)
            self.sockets.pop(pid).close(0)
        if self._pipelined is not None:
            self._pipelined.prune()

    def close(self, wait_s: float = 0.0) -> bool:
        """Close every socket of this requester once its thread is not using them, waiting
        up to ``wait_s`` for that (a thread in a call sees a stop within a poll slice and
        lets go); False, leaving them open, if it still was. Any thread may call this."""
        if not self.in_use.acquire(timeout=wait_s):
            return False
        try:
            self.closed = True
            self._slices.clear()
            if self._pipelined is not None:
                self._pipelined.close()
            for sock in self.sockets.values():
                sock.close(0)
            self.sockets.clear()
            self.engine.stats.untrack(self.tally)
        finally:
            self.in_use.release()
        return True


class ThreadRequesters:
    """The requesters of the threads that called `Node.request`, one per live thread: the
    sockets of a thread that ended are closed when the next new thread asks, or a
    provider leaves (so a program that calls from short-lived threads does not run out of
    descriptors)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        self._all: list[ThreadRequester] = []
        self._lock = threading.Lock()
        self._submitter: Submitter | None = None

    def submitter(self) -> Submitter:
        """The thread behind `Node.submit` (started on first use). Raises `NodeClosedError`."""
        with self._lock:
            if self._submitter is None:
                self.engine.ensure_running()
                from .pipelined import Submitter

                self._submitter = Submitter(self.engine, BlockingRunner(self.engine).carry_out)
            return self._submitter

    def on_submit_thread(self) -> bool:
        """Whether the calling thread is the one that completes `Node.submit`'s futures."""
        submitter = self._submitter
        return submitter is not None and threading.current_thread() is submitter.thread

    def current(self) -> ThreadRequester:
        """The calling thread's requester (created on first use). Raises `ZmqMeshError` on
        the thread that completes `Node.submit`'s futures: a request waited for there (from
        a done-callback) would hold up every submitted request."""
        requester: ThreadRequester | None = getattr(self._local, "requester", None)
        if requester is None and self.on_submit_thread():
            raise ZmqMeshError(SUBMIT_THREAD_REFUSAL)
        if requester is None:
            requester = ThreadRequester(self.engine)
            self._local.requester = requester
            with self._lock:
                for ended in [r for r in self._all if not r.owner.is_alive()]:
                    # its thread is gone: only `peer_gone` may hold its sockets a moment (then
                    # they close at the next look)
                    if ended.close():
                        self._all.remove(ended)
                self._all.append(requester)
        return requester

    def __len__(self) -> int:
        return len(self._all)

    def peer_gone(self, peer_id: str) -> None:
        """Close the sockets to providers that left that no thread is using: those of the
        threads that ended, and those of the threads between two calls (a thread in a call
        closes its own once the call is over: `ThreadRequester.after_call`); the submit
        thread is woken to close its own. Left open, each would try to connect to the
        provider's endpoint again, ten times a second, until its thread made another call.
        (On the loop: waits for no lock but a moment's, the waker's and the stats'.)"""
        if self._submitter is not None:
            self._submitter.wake()
        # the table is needed only to drop the threads that ended (a new thread's first call,
        # or a stop, holding it does so itself); each requester's sockets need its `in_use`
        table = self._lock.acquire(blocking=False)
        try:
            for requester in list(self._all):  # (a copy, taken in one C call)
                if table and not requester.owner.is_alive():
                    if requester.close():  # its thread is gone: nobody else uses these sockets
                        self._all.remove(requester)
                else:
                    requester.prune_if_free()
        finally:
            if table:
                self._lock.release()

    def fail_outstanding(self) -> None:
        """Fail what was submitted (`Node.submit`) with `NodeClosedError`; a blocked
        thread sees the node close itself."""
        if self._submitter is not None:
            self._submitter.begin_close()

    def close(self) -> None:
        """Close every thread's sockets, each once its thread is not using them (within
        `_FREE_WAIT_S` in all), and stop the submit thread."""
        with self._lock:
            if self._submitter is not None:
                self._submitter.close()
            deadline = time.monotonic() + _FREE_WAIT_S
            for requester in self._all:
                if not requester.close(max(deadline - time.monotonic(), 0.0)):
                    log.warning("node %s: a thread still uses its request sockets; the context's end closes them",
                                self.engine.name)


class ThreadFetcher:
    """Fetches pages of history for the replaying subscriptions of a `Node`, one at a time,
    on a thread of its own (started when first needed), and posts each outcome back."""

    def __init__(self, engine: Engine, post: Callable[[Fetch, Any, BaseException | None], None],
                 wanted: Callable[[Fetch], bool]) -> None:
        self.engine = engine
        self.post = post
        self.wanted = wanted  # (a fetch no longer wanted when its turn comes is not made)
        self._queue: queue.SimpleQueue[Fetch | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fetch: Fetch) -> None:
        """Queue a fetch (any thread)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"zmqmesh-fetch-{self.engine.name}",
                                                daemon=True)
                self._thread.start()
        self._queue.put(fetch)

    def stop(self) -> None:
        """Let the thread end after the fetch it is in (bounded by its timeout)."""
        self._queue.put(None)

    def _run(self) -> None:
        runner = BlockingRunner(self.engine)
        while True:
            fetch = self._queue.get()
            if fetch is None or self.engine.closed:
                return
            if not self.wanted(fetch):
                continue
            try:
                page = runner.run(fetch_plan(self.engine, fetch))
            except Exception as exc:
                self.post(fetch, None, exc)
            else:
                self.post(fetch, page, None)


class ThreadInbox(Dispatcher):
    """Runs the inbox on its own thread: ``def`` handlers run here, in place."""

    def __init__(self, engine: Engine, sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any]) -> None:
        super().__init__(config=engine.config, registry=engine.registry, directory=engine.directory,
                         codec=engine.codec, stats=engine.stats, describe=engine.describe,
                         sub=sub, pull=pull, router=router, store=engine.store,
                         keeper=engine.durable.submit if engine.durable is not None else None,
                         history=engine.history, node_closed=lambda: engine.closed)
        self.name = engine.name
        self._fetcher = ThreadFetcher(engine, self.post_page, self.replays.wanted)
        self._waker = Waker()
        self._resubscribe = True
        self._done: deque[tuple[Call, Any, BaseException | None]] = deque()
        concurrency = engine.config.handler_concurrency
        self._pool_threads: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None
        if concurrency > 1:
            # (imported here: a node running one handler at a time, the default, never loads it)
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="zmqmesh-handler",
                                            initializer=self._pool_thread_started)
        self._slots = threading.BoundedSemaphore(concurrency * 4) if concurrency > 1 else None
        self._in_pool = 0  # calls handed to the pool whose outcome is not yet in `_done` (under `_exit_lock`)
        self._flushed_at = 0.0  # when the pool's replies were last sent while a burst was handed over (`_submit`)
        self.thread = threading.Thread(target=self._run, name=f"zmqmesh-inbox-{engine.name}", daemon=True)
        self._async_loop: Any = None  # a HandlerLoop, made for the first async def handler
        self._async_lock = threading.Lock()
        self._async_closed = False
        self._exit_lock = threading.Lock()
        self._exited = False  # (the thread has left its loop: a handler that returns now is answered by no one)
        self._ended = False  # (... and closed its sockets)
        self._on_exit: Callable[[], None] | None = None  # (`after_exit`)

    def start(self) -> None:
        """Start the inbox thread."""
        self.thread.start()

    def discard(self) -> None:
        """Let go of what was made for it (the waker's pipe), for a node whose start failed
        before this was started."""
        self._waker.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def runs_handlers_here(self) -> bool:
        """True on a thread that runs this node's handlers (inbox, handler pool, async handler loop)."""
        current = threading.get_ident()
        handler_loop = self._async_loop
        return (current == self.thread.ident or current in self._pool_threads
                or (handler_loop is not None and current == handler_loop.thread.ident))

    def waits_for_caller(self) -> bool:
        """True when the calling thread runs one of this node's handlers and they run one
        at a time: the node then serves nothing until the caller returns."""
        return self._pool is None and self.runs_handlers_here()

    def _pool_thread_started(self) -> None:
        self._pool_threads.add(threading.get_ident())

    def runs_in_place(self, handlers: list[Callable[..., Any]]) -> bool:
        """Sync handlers, one at a time: called on this thread as messages are decoded."""
        if self._pool is not None or self.abandoned():
            return False
        if len(handlers) == 1:  # (a queue's one handler, a topic's usual one: checked per frame)
            return not is_async(handlers[0])
        return not any(is_async(h) for h in handlers)

    def wake(self) -> None:
        """Make the inbox thread look at its queues (any thread)."""
        self._waker.wake()

    def registry_changed(self) -> None:
        """Subscriptions may have changed: re-apply them on the inbox thread."""
        self._resubscribe = True
        self.peers_changed()

    def stop(self, timeout: float) -> None:
        """Handle what has already arrived, then stop the thread (all within ``timeout``)."""
        self.begin_stop(timeout)
        self.wake()
        if threading.get_ident() != self.thread.ident and self.thread.is_alive():
            self.thread.join(timeout + 0.5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._async_lock:
            self._async_closed = True
            if self._async_loop is not None:
                self._async_loop.close()
        self._waker.close_sender()
        self._fetcher.stop()
        self.report_left_at_stop(self.name)

    def fetch_history(self, fetch: Fetch) -> None:
        """Fetch a page of history on the fetcher's thread (never this one)."""
        self._fetcher.submit(fetch)

    def _run(self) -> None:
        # The thread sleeps in a plain poll of the sockets' descriptors and the waker's:
        # a drain ends on a socket found empty, and the sockets used since are looked at
        # before the next sleep (`used_with_input`). (A ZeroMQ poll would read the events
        # of all three sockets before it sleeps and after: two system calls each, every time.)
        poller = select.poll()
        waker = self._waker.fd
        poller.register(waker, select.POLLIN)
        by_fd: dict[int, tuple[zmq.Socket[Any], str]] = {}
        for pair in self.sockets:
            by_fd[pair[0].FD] = pair
            poller.register(pair[0].FD, select.POLLIN)
        calls: list[Call] = []
        router_fd = self.router.FD
        ready: list[tuple[zmq.Socket[Any], str]] = list(self.sockets)  # (each looked at once first)
        try:
            while not self.stopping:
                self._complete_done()
                self._drain_all(calls, ready)  # (it applies a subscription made meanwhile first)
                ready = self.used_with_input()
                while not ready:
                    found = poller.poll(_IDLE_LOOK_MS)
                    # the router alone, with nothing else to do: a lone request, served without a drain
                    if len(found) == 1 and found[0][0] == router_fd and not self._done and not self._resubscribe \
                            and self.serve_lone_request(calls):
                        ready = self.used_with_input()
                        continue
                    for fd, _event in found:
                        if fd == waker:
                            self._waker.clear()
                        else:
                            ready.append(by_fd[fd])
                    break
            self._drain_all(calls, self.sockets)  # stopping: finish what has arrived, within the deadline
            while self._pool_busy() and not self.abandoned():  # ... and what the pool's handlers still run
                self._wait_for_pool(poller, waker)
                self._drain_all(calls, self.sockets)  # (answering them, and taking what came meanwhile)
        except Exception:
            log.exception("inbox thread failed")
        finally:
            with self._exit_lock:
                self._exited = True
            try:
                self._complete_done()  # (the pool's handlers that returned before: answered)
            except Exception:
                log.exception("answering the last handlers failed")
            self.close_sockets()
            self._waker.close()
            with self._exit_lock:
                self._ended = True
                on_exit, self._on_exit = self._on_exit, None
            if on_exit is not None:
                on_exit()

    def _pool_busy(self) -> bool:
        """Whether handlers handed to the pool have not yet all returned."""
        with self._exit_lock:
            return self._in_pool > 0

    def _wait_for_pool(self, poller: select.poll, waker: int) -> None:
        """Sleep until a handler of the pool returns (it wakes this thread), a slice passes,
        or the stop's deadline does, whichever comes first."""
        assert self._deadline is not None
        remaining = self._deadline - time.monotonic()
        if remaining > 0:
            for fd, _event in poller.poll(min(remaining, _POLL_SLICE_S) * 1000):
                if fd == waker:
                    self._waker.clear()

    def after_exit(self, fn: Callable[[], None]) -> bool:
        """Have the inbox thread call ``fn`` once it has closed its sockets (True): for a
        stop that could not wait for a handler that outlived its timeout, whose sockets
        must not be closed under it. False once the thread has ended: call ``fn`` now."""
        with self._exit_lock:
            if self._ended or not self.thread.is_alive():
                return False
            self._on_exit = fn
            return True

    def _drain_all(self, calls: list[Call], active: Any) -> None:
        """Drain the sockets the poller found ready, in bursts, until they run dry.

        No time goes into receive attempts on empty sockets. Between two bursts, a
        subscription made meanwhile is applied, and every socket that holds a message now
        joins in: a stream that never pauses must not hold up requests, publications or a
        new subscription until it does.
        """
        while not self.abandoned():
            if self._resubscribe:
                self._resubscribe = False
                self.apply_subscriptions()
            with self.replies_held():  # (requests are also answered as they are decoded: see `gather`)
                active = self.gather(calls, active)
                if calls:
                    for burst in self.bursts(calls):
                        self.before_handling(burst)
                        self._execute(burst)
                        self.after_handling()
                    calls.clear()
            self._complete_done()
            self.after_handling()
            if not active and not self.has_posted():
                return
            active = with_input(self.sockets)  # (one look at all three: reading it rearms their descriptors)

    def _flush_done(self) -> None:
        """Reply for the calls the pool finished, and send those replies now (a burst being
        handed to the pool otherwise holds them to its end)."""
        self._complete_done()
        self.release_held()
        self._flushed_at = time.monotonic()

    def _complete_done(self) -> None:
        """Reply for the calls the handler pool finished (this thread only)."""
        while self._done:
            self.complete(*self._done.popleft())

    def _execute(self, calls: list[Call]) -> None:
        if self._pool is not None:
            for call in self.to_handle(calls):
                self._submit(call)
            return
        for call in self.to_handle(calls):  # (under `_drain_all`'s `replies_held`)
            started = self.starting(call)
            result, error = self._run_on_loop(call) if is_async(call.handler) else run_sync(call)
            if started:  # (only services are timed)
                self.finished(call, started)
            if call.route is not None or error is not None:  # (a delivery that returned has nothing to account)
                self.complete(call, result, error)

    def _run_on_loop(self, call: Call) -> tuple[Any, BaseException | None]:
        with self._async_lock:
            if self._async_loop is None:
                if self._async_closed:
                    return None, NodeClosedError("the node stopped")
                from .handler_loop import (
                    HandlerLoop,  # asyncio is loaded only by nodes that need it
                )

                self._async_loop = HandlerLoop(f"zmqmesh-async-{self.name}")
            handler_loop = self._async_loop
        try:
            future = handler_loop.submit(run_async(call))
        except RuntimeError as exc:  # the handler loop is closed: the node is stopping
            return None, exc
        while not self.abandoned():
            try:
                # (a slice well within the half second a stop waits past its timeout: a
                # handler cut short at the deadline is then seen to end in that wait)
                return future.result(_POLL_SLICE_S)  # type: ignore[no-any-return]
            except FutureTimeoutError:
                continue
            except Exception as exc:  # the loop went away
                return None, exc
        future.cancel()  # (no result: no OK reply for it, no acknowledgement)
        return None, CutShort("the node stopped before the handler returned")

    def _submit(self, call: Call) -> None:
        assert self._pool is not None and self._slots is not None
        if self._done and time.monotonic() - self._flushed_at >= _REPLY_FLUSH_S:
            self._flush_done()  # (handlers quicker than a slot's wait: their replies waited for the burst's end)
        while not self._slots.acquire(timeout=_SLOT_WAIT_S):
            if self._done:  # the replies of the calls that finished go out meanwhile (not held for a batch)
                self._flush_done()
            if self.abandoned():  # (every slot held by a handler that did not return in time)
                self.drop(call)
                return
        runner = self._run_on_loop if is_async(call.handler) else run_sync

        def finished(fut: Future[tuple[Any, BaseException | None]]) -> None:
            self._slots.release()  # type: ignore[union-attr]
            with self._exit_lock:  # (its outcome is in `_done` as it leaves the count: a stop waits for both)
                self._in_pool -= 1
                if not self._exited and not fut.cancelled():
                    self._done.append((call, *fut.result()))
                    self.wake()
                    return
            if fut.cancelled():  # never run: the stop's timeout passed first
                self.drop(call)
                return
            if call.route is not None:  # returned after the inbox ended: unanswered, unacknowledged, unrecorded
                self.drop(call)
                self.report_left_at_stop(self.name)

        with self._exit_lock:
            self._in_pool += 1
        try:
            self._pool.submit(runner, call).add_done_callback(finished)
        except RuntimeError:  # shutting down
            with self._exit_lock:
                self._in_pool -= 1
            self._slots.release()


def stop_blocking(engine: Engine, inbox: ThreadInbox, loop: Reactor, thread: threading.Thread, timeout: float) -> None:
    """Run the stop plan from a caller's thread, then end the I/O thread (bounded).

    Never raises: a step that fails is logged and the later steps still run, so a half-dead
    node still releases its threads and sockets.
    """
    step_timeout = engine.config.linger_s + 1  # no loop step takes long; this bounds a wedged loop
    plan = stop_plan(engine, timeout)
    value: Any = None
    loop_ended = False
    while True:
        finished, step = advance(plan, value, None)
        if finished:
            break
        value = None
        try:
            if step.where == ON_LOOP:
                value = run_on(loop, step.fn, *step.args, timeout=step_timeout)
            elif step.where == INBOX:
                inbox.stop(*step.args)
            elif step.where == CALLER:
                step.fn()
            elif step.where == AFTER_LOOP:
                loop_ended = True
                _end_loop(loop, thread, timeout)
                if thread.is_alive():  # a wedged loop may still use its sockets: leak them rather than crash
                    log.warning("node %s: the I/O thread did not end; its ZeroMQ context is left open", engine.name)
                    continue
                if engine.store is not None:  # (first: handed over, the inbox thread may close it at once)
                    engine.store.close_later()
                if inbox.after_exit(step.fn):  # a handler outlived the stop: its thread closes up after it
                    log.warning("node %s: a handler did not return within the stop's timeout; the node's inbound "
                                "sockets, ZeroMQ context and store close when it does (what is left is counted then)",
                                engine.name)
                    continue
                step.fn()
            else:
                time.sleep(step.args[0])
        except Exception as exc:
            log.warning("node %s: %s failed while stopping: %s", engine.name, step.what, exc)
    if not loop_ended:
        _end_loop(loop, thread, timeout)


def _end_loop(loop: Reactor, thread: threading.Thread, timeout: float) -> None:
    loop.stop()
    if thread is not threading.current_thread():
        # (a moment at least: with ``timeout`` 0 the thread had seldom ended yet, and its
        # context was left open, as for a wedged loop)
        thread.join(max(timeout, _LATE_LOOP_S))
