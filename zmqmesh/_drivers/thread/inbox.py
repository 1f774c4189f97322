"""The inbox thread of a `Node`: it owns the inbound sockets and calls ``def`` handlers in
place; ``async def`` handlers run on a `HandlerLoop` started on first use (so a node
without them never loads asyncio). Pages of history are fetched on a thread of their own
(`ThreadFetcher`)."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING, Any

import zmq

from ..._engine.api import fetch_plan
from ..._engine.engine import Engine
from ..._io.sockets import with_input
from ..._io.waker import Waker
from ..._patterns.calls import Call, CutShort, PassedOver, is_async, run_async, run_sync
from ..._patterns.inbound import Dispatcher
from ...errors import NodeClosedError

if TYPE_CHECKING:
    import queue
    from concurrent.futures import ThreadPoolExecutor

    from ..._patterns.replay import Fetch


from .runner import BlockingRunner
from .waits import POLL_SLICE_S

__all__ = ["ThreadInbox", "ThreadFetcher"]

log = logging.getLogger("zmqmesh.node")

_SLOT_WAIT_S = 0.005
_REPLY_FLUSH_S = 0.005
"""While a burst is handed to the handler pool, the replies of the handlers that returned
go out at least this often (held, they are sent a batch per caller)."""
_IDLE_LOOK_MS = 500  # (the inbox comes round this often with nothing to wake it: what waits, `has_waiting`)
_RUNNING_GRACE_S = 0.25
"""How long past a stop's deadline the inbox waits for the pool's handlers still running
(within the half second the stop waits for it), so that their batches are answered:
what they handled is acknowledged, and only what was left is dealt again."""


class ThreadFetcher:
    """Fetches pages of history for the replaying subscriptions of a `Node`, one at a time,
    on a thread of its own (started when first needed), and posts each outcome back."""

    def __init__(self, engine: Engine, post: Callable[[Fetch, Any, BaseException | None], None],
                 wanted: Callable[[Fetch], bool]) -> None:
        self.engine = engine
        self.post = post
        self.wanted = wanted  # (a fetch no longer wanted when its turn comes is not made)
        self._queue: queue.SimpleQueue[Fetch | None] | None = None  # (made with the thread)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def submit(self, fetch: Fetch) -> None:
        """Queue a fetch (any thread); none once stopped."""
        with self._lock:
            if self._stopped:
                return
            if self._queue is None:
                import queue  # (here: a node whose subscriptions never replay never loads it)

                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,),
                                                name=f"zmqmesh-fetch-{self.engine.name}", daemon=True)
                self._thread.start()
            self._queue.put(fetch)

    def stop(self) -> None:
        """Let the thread end after the fetch it is in (bounded by its timeout)."""
        with self._lock:
            self._stopped = True
            if self._queue is not None:
                self._queue.put(None)

    def _run(self, fetches: queue.SimpleQueue[Fetch | None]) -> None:
        runner = BlockingRunner(self.engine)
        while True:
            fetch = fetches.get()
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
        super().__init__(sub=sub, pull=pull, router=router, **engine.inbox_options())
        self.name = engine.name
        self._fetcher = ThreadFetcher(engine, self.post_page, self.wanted)
        self._waker = Waker()
        self._resubscribe = True
        self.async_handlers = False  # (an event loop runs ``async def`` handlers: `_run_on_loop`)
        self._done: deque[tuple[Call, Any, BaseException | None]] = deque()
        concurrency = engine.config.handler_concurrency
        self._handler_threads: dict[int, threading.Thread] = {}
        """The threads that run this node's handlers, by ident, each added as it comes: the
        inbox's (as it starts), the pool's (as each starts) and the async handler loop's (as it
        is made). A thread is one of them from its start on, and never becomes one later; once
        they end (the node stopped), a thread started after may get the ident one of them had."""
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
        thread = self._handler_threads.get(threading.get_ident())
        return thread is not None and thread is threading.current_thread()  # (not a later thread of its ident)

    def waits_for_caller(self) -> bool:
        """True when the calling thread runs one of this node's handlers and they run one
        at a time: the node then serves nothing until the caller returns."""
        return self._pool is None and self.runs_handlers_here()

    def service_waits_for_caller(self, service: str) -> bool:
        """True when the calling thread runs this node's ``async def`` handlers and one of
        them serves ``service`` here: they all run on one event loop, which a blocking call
        from one of them holds until it returns, whatever ``handler_concurrency``."""
        handler_loop = self._async_loop
        if handler_loop is None or threading.current_thread() is not handler_loop.thread:  # (not its ident: reused)
            return False
        handler = self.registry.services.get(service)
        return handler is not None and is_async(handler)

    def _pool_thread_started(self) -> None:
        self._handler_threads[threading.get_ident()] = threading.current_thread()

    def runs_sync_in_place(self) -> bool:
        """Sync handlers run one at a time (no pool), and no stop's deadline has passed:
        they are called on this thread as messages are decoded."""
        return self._pool is None and not (self.stopping and self.abandoned())  # (no deadline before a stop)

    def runs_in_place(self, handlers: list[Callable[..., Any]]) -> bool:
        """Sync handlers, one at a time: called on this thread as messages are decoded."""
        if self._pool is not None or (self.stopping and self.abandoned()):  # (`runs_sync_in_place`, inline: per frame)
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
        self._handler_threads[threading.get_ident()] = threading.current_thread()
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
                    lone = self.nothing_else_waits(calls)  # (looked at before the sleep, off a caller's wait)
                    found = poller.poll(_IDLE_LOOK_MS)
                    # the router alone, with nothing else to do: a lone request, served without a drain
                    if lone and len(found) == 1 and found[0][0] == router_fd and not self._done \
                            and not self._resubscribe and self.serve_lone_request(calls):
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
                assert self._deadline is not None  # (set by the stop)
                self._wait_for_pool(poller, waker, self._deadline)
                self._drain_all(calls, self.sockets)  # (answering them, and taking what came meanwhile)
            if self._pool is not None and self._pool_busy():  # the deadline passed: what has not begun is left
                self._pool.shutdown(wait=False, cancel_futures=True)  # (counted here, as left: `_submit`)
                self._let_running_return(poller, waker)
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

    def _run_pooled(self, runner: Callable[[Call], tuple[Any, BaseException | None]],
                    call: Call) -> tuple[Any, BaseException | None]:
        """Run ``call`` with ``runner`` on a thread of the pool, unless its handler was
        unsubscribed while it waited there (its outcome is then a `PassedOver`)."""
        if self.watching and self.unsubscribed(call):
            return None, PassedOver("unsubscribed")
        return runner(call)

    def handling_elsewhere(self) -> bool:
        """Whether calls handed to the pool have not all returned."""
        return self._pool is not None and self._pool_busy()

    def _pool_busy(self) -> bool:
        """Whether handlers handed to the pool have not yet all returned."""
        with self._exit_lock:
            return self._in_pool > 0

    def _wait_for_pool(self, poller: select.poll, waker: int, until: float) -> None:
        """Sleep until a handler of the pool returns (it wakes this thread), a slice passes,
        or ``until`` does (monotonic), whichever comes first."""
        remaining = until - time.monotonic()
        if remaining > 0:
            for fd, _event in poller.poll(min(remaining, POLL_SLICE_S) * 1000):
                if fd == waker:
                    self._waker.clear()

    def _let_running_return(self, poller: select.poll, waker: int) -> None:
        """Wait up to `_RUNNING_GRACE_S` for the pool's handlers still running past the
        stop's deadline (they are answered as the thread ends)."""
        until = time.monotonic() + _RUNNING_GRACE_S
        while self._pool_busy() and time.monotonic() < until:
            self._wait_for_pool(poller, waker, until)

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
                from ..handler_loop import (
                    HandlerLoop,  # asyncio is loaded only by nodes that need it
                )

                self._async_loop = HandlerLoop(f"zmqmesh-async-{self.name}")
                loop_thread = self._async_loop.thread
                self._handler_threads[loop_thread.ident] = loop_thread  # (started: it has its ident)
                self.async_handlers = True
            handler_loop = self._async_loop
        try:
            future = handler_loop.submit(run_async(call))
        except RuntimeError as exc:  # the handler loop is closed: the node is stopping
            return None, exc
        while not self.abandoned():
            try:
                # (a slice well within the half second a stop waits past its timeout: a
                # handler cut short at the deadline is then seen to end in that wait)
                return future.result(POLL_SLICE_S)  # type: ignore[no-any-return]
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
                if fut.cancelled():  # never run: the stop's timeout passed first
                    self.drop(call)
                    return
                if not self._exited:
                    self._done.append((call, *fut.result()))
                    self.wake()
                    return
                if call.route is None:
                    return
                self.drop(call)  # returned after the inbox ended: unanswered, unacknowledged, unrecorded
                last = self._in_pool == 0  # (under the lock: the last to leave the pool reports all before it)
            self.left_at_stop.report_late(last)

        with self._exit_lock:
            self._in_pool += 1
        try:
            self._pool.submit(self._run_pooled, runner, call).add_done_callback(finished)
        except RuntimeError:  # shutting down
            with self._exit_lock:
                self._in_pool -= 1
            self._slots.release()
