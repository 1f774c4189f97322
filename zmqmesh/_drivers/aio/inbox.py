"""The inbox of an `AsyncNode`, on the caller's event loop: ``async def`` handlers awaited
in place, ``def`` handlers run on a worker thread a burst at a time, so they never block
the loop (`LoopInbox`)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from ..._engine.api import fetch_plan
from ..._engine.engine import Engine
from ..._io.sockets import with_input
from ..._observe import tracing
from ..._patterns.calls import (
    Call,
    handler_failure,
    is_async,
    run_async,
    run_batch,
    serve_as,
    served,
)
from ..._patterns.inbound import HOLD_LIMIT_S, Dispatcher
from .runner import AsyncRunner

if TYPE_CHECKING:
    from ..._patterns.replay import Fetch

__all__ = ["LoopInbox"]

log = logging.getLogger("zmqmesh.aio")

_WAITING_LOOK_S = 0.5
_EVENTS = int(zmq.EVENTS)  # (`_readable`: read once a wake-up, a plain int rather than the enum's attribute)
_CANCELLED_WAIT_S = 0.1  # at a stop, for the handler tasks its timeout cancelled to end
_SYNC_SLICE_S = 0.005
"""How long the worker runs a burst's sync handlers before the replies of those that
returned go (`LoopInbox._run_sync_batch`): a hand-over to the worker costs some 70 us,
so quick handlers still run a burst at a time."""
_HANDLING: contextvars.ContextVar[Any] = contextvars.ContextVar("zmqmesh_handling", default=None)
"""The `LoopInbox` whose handlers run in this context: a drain's task, a task of
``handler_concurrency``, and the tasks they make (``asyncio.wait_for``'s among them)."""


class LoopInbox(Dispatcher):
    """Runs the inbox on the caller's event loop: ``async def`` handlers are awaited in place."""

    def __init__(self, engine: Engine, sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any]) -> None:
        super().__init__(sub=sub, pull=pull, router=router, **engine.inbox_options())
        self.engine = engine
        self.loop = engine.loop
        concurrency = engine.config.handler_concurrency
        self._worker_threads: set[int] = set()
        # (the initializer stays with each worker thread for its life: given the set alone,
        # not the inbox, so that a node never stopped whose loop ended can be collected)
        self._worker = ThreadPoolExecutor(concurrency, thread_name_prefix="zmqmesh-handler",
                                          initializer=_note_thread, initargs=(self._worker_threads,))
        self._concurrency = asyncio.Semaphore(concurrency) if concurrency > 1 else None
        self._task: asyncio.Task[None] | None = None
        self._in_turn = False  # (the drain runs handlers itself, one at a time: `_execute_in_turn`)
        self._again = False
        self._look: asyncio.TimerHandle | None = None  # the one pending look at what waits (`has_waiting`)
        self._hold_timer: asyncio.TimerHandle | None = None  # (`_held_since`)
        self._handler_began: float | None = None  # the loop's time the handler running in turn began, replies held
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False  # (the sockets: a drain woken later finds nothing to read)
        # the sockets to look at in the next drain: those whose descriptor signalled, and
        # those used since that hold a message (`used_with_input`)
        self._fired: list[tuple[zmq.Socket[Any], str]] = list(self.sockets)

    def discard(self) -> None:
        """Let go of what was made for it (its worker), for a node whose start failed before
        this was started."""
        self._worker.shutdown(wait=False)

    def start(self) -> None:
        """Watch the sockets' descriptors."""
        self.apply_subscriptions()
        for pair in self.sockets:
            self.loop.add_reader(pair[0].FD, self._readable, pair)
        self.wake()

    def _readable(self, pair: tuple[zmq.Socket[Any], str]) -> None:
        """A socket's descriptor signalled. Reading ``ZMQ_EVENTS`` rearms it at once: while
        a handler awaits, or a ``def`` one runs on the worker, the drain reads nothing, and
        a descriptor left readable would call this back on every pass of the loop (one
        message arriving meanwhile spun the loop at a full CPU until the handler returned).
        The socket is looked at by the drain all the same (`_fired`)."""
        try:
            pair[0].getsockopt(_EVENTS)
        except zmq.ZMQError:  # (closed meanwhile: nothing to rearm)
            pass
        self._signalled(pair)

    def _signalled(self, pair: tuple[zmq.Socket[Any], str]) -> None:
        if pair not in self._fired:
            self._fired.append(pair)
        self.wake()

    def runs_handlers_here(self) -> bool:
        """Always False: stopping from a handler is awaited, never blocked on."""
        return False

    def runs_caller(self) -> bool:
        """Whether the calling task is one of this node's handlers (or a task one made):
        a stop awaited there would wait for the handler itself."""
        return _HANDLING.get() is self

    def waits_for_caller(self) -> bool:
        """True when the caller is one of this node's handlers and they run one at a time
        (an ``async def`` one awaited in the drain, a ``def`` one on the worker thread)."""
        if self._concurrency is not None:
            return False
        if self._worker_threads and threading.get_ident() in self._worker_threads:
            return True
        if not self._in_turn:  # (the drain runs no handler: the caller is none of them)
            return False
        task = self._task
        if task is None or task.done():  # (no drain runs: the caller is none of its handlers)
            return False
        try:
            return asyncio.current_task() is task
        except RuntimeError:  # no running loop on this thread
            return False

    async_handlers = False  # (they run on the node's own loop, where calls are awaited)

    def service_waits_for_caller(self, service: str) -> bool:
        """Always False: a handler of an `AsyncNode` awaits its calls, never blocks its loop."""
        return False

    def wake(self) -> None:
        """Start a drain unless one is running (then it goes round once more)."""
        if self.abandoned() or self._closed:
            return
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._drain())
        else:
            self._again = True

    def registry_changed(self) -> None:
        """Re-apply subscriptions (loop thread only)."""
        self.apply_subscriptions()
        self.peers_changed()

    def fetch_history(self, fetch: Fetch) -> None:
        """Fetch a page of history in a task of the loop."""
        task = self.loop.create_task(self._fetch(fetch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, fetch: Fetch) -> None:
        if not self.wanted(fetch):  # (a subscription dropped meanwhile)
            return
        try:
            page = await AsyncRunner(self.engine).run(fetch_plan(self.engine, fetch))
        except Exception as exc:
            self.post_page(fetch, None, exc)
        else:
            self.post_page(fetch, page, None)

    async def _drain(self) -> None:
        _HANDLING.set(self)  # (this task's context, and that of the tasks its handlers make)
        calls: list[Call] = []
        active: list[tuple[zmq.Socket[Any], str]] = []
        try:
            while not self.abandoned() and not self._closed:
                self._again = False
                if self._fired:
                    active += [pair for pair in self._fired if pair not in active]
                    self._fired.clear()
                active = self.gather(calls, active)
                if calls:
                    for burst in self.bursts(calls):
                        self.before_handling(burst)
                        await self._execute(burst)
                        self.after_handling()
                    calls.clear()
                else:
                    self.after_handling()
                if self._closed:
                    return
                for pair in self.used_with_input():
                    self._signalled(pair)
                if not (active or self._again or self._fired or self.has_posted()):
                    if self.has_waiting() and self._look is None:  # look again in a moment (once)
                        self._look = self.loop.call_later(_WAITING_LOOK_S, self._look_again)
                    return
                # every socket that holds a message now takes its turn in the next burst: a
                # stream that never pauses must not hold up requests or publications (a
                # socket's descriptor does not signal again while it holds messages unread)
                active = with_input(self.sockets)
                await asyncio.sleep(0)  # let the loop breathe between bursts
        except BaseException as exc:
            if not (self.stopping or self._closed):
                self._drain_again()
            if not isinstance(exc, Exception):  # (a cancellation: see `_drain_again`)
                raise
            if not self.abandoned():
                log.exception("inbox drain failed")

    def _drain_again(self) -> None:
        """A drain ended half-way, not by a stop: a handler it awaited cancelled its task
        (the drain's own), or it failed. The sockets it was reading may hold more, and a
        socket that holds messages unread does not signal again: every socket is looked at
        in a drain a moment later (`_WAITING_LOOK_S`: a failure that comes back each time
        is logged that often at most, not in a loop)."""
        self._fired[:] = self.sockets
        if self._look is None:
            self._look = self.loop.call_later(_WAITING_LOOK_S, self._look_again)

    def _look_again(self) -> None:
        self._look = None
        self.wake()

    async def _execute(self, calls: list[Call]) -> None:
        handling = self.to_handle(calls)
        try:
            if self._concurrency is not None:
                for call in handling:
                    try:
                        await self._concurrency.acquire()
                    except asyncio.CancelledError:  # (a stop's: this one and those after it are left)
                        self.drop(call)
                        raise
                    begun: list[bool] = []
                    task = self.loop.create_task(self._run_one(call, begun))
                    self._tasks.add(task)
                    task.add_done_callback(functools.partial(self._one_ended, call, begun))
            else:
                self._in_turn = True
                try:
                    await self._execute_in_turn(handling)
                finally:
                    self._in_turn = False
                    self._handler_began = None
                    if self._hold_timer is not None:
                        self._hold_timer.cancel()
                        self._hold_timer = None
        finally:
            handling.close()  # (cancelled by a stop: the calls not reached are counted as dropped)

    def _held_since(self, began: float) -> None:
        """A handler that began at ``began`` (loop time) runs while replies are held: they
        go once it has run `HOLD_LIMIT_S`. One timer serves the handlers of a burst in
        turn (`_hold_expired`): one per handler cost a timer made, pushed on the loop's heap
        and cancelled for each request."""
        self._handler_began = began
        if self._hold_timer is None:
            self._hold_timer = self.loop.call_at(began + HOLD_LIMIT_S, self._hold_expired)

    def _hold_expired(self) -> None:
        """The hold timer is due: the replies held go if the handler running now began
        `HOLD_LIMIT_S` ago; for a handler that began later, it waits until that one's time."""
        self._hold_timer = None
        began = self._handler_began
        if began is None:  # (no handler runs: the next one arms it again)
            return
        due = began + HOLD_LIMIT_S
        if self.loop.time() >= due:
            self.release_held()
        else:
            self._hold_timer = self.loop.call_at(due, self._hold_expired)

    async def _execute_in_turn(self, handling: Generator[Call, None, None]) -> None:
        batch: list[Call] = []  # sync handlers in a row: run together, on the worker
        with self.replies_held():
            for call in handling:
                if not is_async(call.handler):
                    batch.append(call)
                    continue
                if batch:
                    try:
                        await self._run_sync_batch(batch)
                    except asyncio.CancelledError:  # cut short by a stop: the call taken meanwhile is left too
                        self.drop(call)
                        raise
                    batch = []
                if call.route is None and tracing.active is None and not self.holding():
                    # a message of a stream, with nothing to reply, time, trace or hold for
                    try:
                        await call.handler(call.arg)
                    except Exception as exc:
                        self.complete(call, None, exc)
                    except asyncio.CancelledError as exc:
                        if _cut_short():
                            self.drop(call)
                            raise
                        self.complete(call, None, exc)
                    except BaseException as exc:  # (GeneratorExit, say: see `handler_failure`)
                        self.complete(call, None, handler_failure(exc))
                    continue
                started = self.starting(call)
                token = serve_as(call)
                error: BaseException | None = None
                if self.holding():  # held replies wait for a quick handler, yet never past HOLD_LIMIT_S
                    self._held_since(self.loop.time())
                try:
                    result, error = await call.handler(call.arg), None
                except Exception as exc:
                    result, error = None, exc
                except asyncio.CancelledError as exc:
                    if _cut_short():
                        self.drop(call)
                        raise
                    result, error = None, exc
                except BaseException as exc:  # (GeneratorExit, say: see `handler_failure`)
                    result, error = None, handler_failure(exc)
                finally:
                    served(token, error)
                    self._handler_began = None
                self.finished(call, started)
                if call.route is None and error is None:
                    continue  # nothing to reply or count
                self.complete(call, result, error)
            if batch:
                await self._run_sync_batch(batch)

    async def _run_sync_batch(self, batch: list[Call]) -> None:
        """Run the sync handlers of ``batch`` in order on the worker, and answer them: those
        that returned within `_SYNC_SLICE_S` of a hand-over at a time, so that a reply
        waits for slow handlers after it no longer than that (the whole burst, up to 256
        handlers, had to be served first)."""
        self.release_held()  # (sync handlers run on a worker, untimed)
        while batch:
            started: list[Call] = []
            outcomes: list[tuple[Any, BaseException | None]] = []  # (the worker's, as each call returns)
            try:
                await self.loop.run_in_executor(self._worker, run_batch, batch, self, started, outcomes,
                                                _SYNC_SLICE_S)
            except asyncio.CancelledError:  # a stop's: the worker begins no call past its deadline
                begun, done = len(started), len(outcomes)  # (in this order: done <= begun)
                for call, (result, error) in zip(batch, outcomes[:done]):
                    self.complete(call, result, error)
                for call in batch[done:begun]:  # still running: it ends unanswered, unacknowledged, unrecorded
                    if call.route is not None:
                        self.drop(call)
                for call in batch[begun:]:
                    self.drop(call)
                raise
            for call, (result, error) in zip(batch, outcomes):
                self.complete(call, result, error)
            batch = batch[len(outcomes):]
            if batch:
                if self.abandoned():
                    for call in batch:  # reached after the stop's deadline
                        self.drop(call)
                    return
                self.release_held()  # (the replies of this slice go before the rest runs)

    def handling_elsewhere(self) -> bool:
        """Whether tasks of this inbox run (handlers of ``handler_concurrency``, reads of histories)."""
        return bool(self._tasks)

    def _one_ended(self, call: Call, begun: list[bool], task: asyncio.Task[None]) -> None:
        """A task of `_run_one` ended. One cancelled before its first step (a stop's
        cancellation, in the pass the drain made it) never ran its body: its call is
        counted as dropped here, and its slot freed (the call was in no counter, and the
        slot was held for good)."""
        self._tasks.discard(task)
        if not begun:
            self.drop(call)
            assert self._concurrency is not None
            self._concurrency.release()

    async def _run_one(self, call: Call, begun: list[bool]) -> None:
        begun.append(True)
        _HANDLING.set(self)
        try:
            if self.watching and self.unsubscribed(call):  # (its handler unsubscribed since the task was made)
                self.pass_over(call)
            elif is_async(call.handler):
                try:
                    result, error = await run_async(call)
                except asyncio.CancelledError as exc:
                    if _cut_short():
                        self.drop(call)
                        raise
                    result, error = None, exc
                self.complete(call, result, error)
            else:
                await self._run_sync_batch([call])
            # replied outside a drain: a request that came meanwhile may wait for no edge
            if not self._closed:
                for pair in self.used_with_input():
                    self._signalled(pair)
        finally:
            assert self._concurrency is not None
            self._concurrency.release()

    async def stop(self, timeout: float) -> None:
        """Handle what has already arrived (bounded by ``timeout``), then close the sockets.

        Cancelled meanwhile (the stop's task: see `stop_async`), it cuts the handlers short
        at once and still closes the sockets, then raises `CancelledError`."""
        self.begin_stop(timeout)
        for sock, _kind in self.sockets:
            try:
                self.loop.remove_reader(sock.FD)
            except Exception:
                pass
        cancelled = False
        if not self.loop.is_closed():  # (closed: its loop ended with the node running, nothing runs there)
            self._fired[:] = self.sockets
            self.wake()  # one last pass over what is already in the sockets
            ends = self.loop.time() + timeout
            pending: list[asyncio.Task[None]] = []
            try:
                while True:  # (looked at again: a drain starts handler tasks while it runs)
                    pending = [t for t in (self._task, *self._tasks) if t is not None and not t.done()]
                    if not pending or self.loop.time() >= ends:
                        break
                    await asyncio.wait(pending, timeout=ends - self.loop.time())
            except asyncio.CancelledError:
                cancelled = True  # (the drain may have started handler tasks meanwhile: all are cut short)
                pending = [t for t in (self._task, *self._tasks) if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            if pending:  # (they count what they leave as they take the cancellation in)
                try:
                    await asyncio.wait(pending, timeout=_CANCELLED_WAIT_S)
                except asyncio.CancelledError:
                    cancelled = True
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._closed = True  # (an event posted from now on wakes no drain)
        if self._look is not None:
            self._look.cancel()
        self.close_sockets()
        self.report_left_at_stop(self.engine.name)
        if cancelled:
            raise asyncio.CancelledError


def _note_thread(threads: set[int]) -> None:
    """Add the calling thread to ``threads`` (a worker of `LoopInbox`, as it starts)."""
    threads.add(threading.get_ident())


def _cut_short() -> bool:
    """Whether the `CancelledError` an ``async def`` handler let out cancels the task
    running it (a stop cut it short, or the loop ends), rather than being the handler's
    own failure: one it raised, or took from something it awaited that was cancelled
    elsewhere. That one is the handler's error, as any other (logged and counted, or
    the caller's `RemoteError`): taken for a cancellation, it ended the drain, and the
    rest of the burst (up to thousands of messages) was dropped with it, and a caller
    waited out its timeout. Python 3.10 cannot tell them apart (no ``Task.cancelling``):
    there it is taken for a cancellation."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0
