"""The asyncio driver of `AsyncNode`: awaited waits, requests from coroutines, the inbox on
the caller's loop.

The twin of `_drivers.thread`, and like it only a way of waiting: the logic lives below.
Kept apart so that a process using only the sync `Node` never imports asyncio.

* `AsyncRunner` carries out a plan's steps by awaiting them, and a request the quick way
  while all goes well (`request`, `send_quick`).
* `LoopRequester`: DEALERs owned by the event loop, a future per request.
* `LoopInbox`: ``async def`` handlers awaited in place; ``def`` handlers run on a worker
  thread, a burst at a time, so they never block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import zmq

from .._engine.api import OnLoop, Plan, advance, fetch_plan
from .._engine.engine import Engine
from .._engine.stop import AFTER_LOOP, CALLER, INBOX, ON_LOOP, stop_plan
from .._io.sockets import close_watched, has_input, recv_frames, with_input
from .._mesh.directory import Provider
from .._mesh.waiters import Room, Until
from .._observe import tracing
from .._patterns.calls import (
    Call,
    handler_failure,
    is_async,
    run_async,
    run_batch,
    serve_as,
    served,
)
from .._patterns.dispatch import HOLD_LIMIT_S, Dispatcher
from .._patterns.durable import Ticket
from .._patterns.in_order import InOrder
from .._patterns.outstanding import Outstanding
from .._patterns.replay import Fetch
from .._patterns.reqrep import Exchange, QuickRequest
from .._patterns.request_batches import EARLY_ITEMS, RequestBatches
from .._stats import RequestTally
from ..errors import MeshTimeoutError, NodeClosedError, PeerLostError, ZmqMeshError
from .pipelined import send_batches, send_request

__all__ = ["AsyncRunner", "check_loop", "LoopCommits", "LoopInbox", "LoopRequester", "wait_until", "wait_for_room", "stop_async"]

log = logging.getLogger("zmqmesh.aio")

_ROOM_SLICE_S = 0.1
_READ_BURST = 1024
_LONE_PASSES = 16
_WAITING_LOOK_S = 0.5
_SWEEP_SHARE = 16  # abandoned requests are swept at once when they are this share of those in flight
_SWEEP_S = 0.05  # ... and otherwise within this long
_CANCELLED_WAIT_S = 0.1  # at a stop, for the handler tasks its timeout cancelled to end
_SYNC_SLICE_S = 0.005
"""How long the worker runs a burst's sync handlers before the replies of those that
returned go (`LoopInbox._run_sync_batch`): a hand-over to the worker costs some 70 us,
so quick handlers still run a burst at a time."""
_HANDLING: contextvars.ContextVar[Any] = contextvars.ContextVar("zmqmesh_handling", default=None)
"""The `LoopInbox` whose handlers run in this context: a drain's task, a task of
``handler_concurrency``, and the tasks they make (``asyncio.wait_for``'s among them)."""


def check_loop(engine: Engine) -> None:
    """Raises `ZmqMeshError` when called from another event loop than the node's: its
    sockets and futures belong to that one loop."""
    # (asked of asyncio every call, though on Python 3.11 its answer costs a getpid() system
    # call, some 0.3 us of a request's 7 in flight: no cheaper check is exact, since a
    # node's loop may be run again on another thread, or set aside by a bridge that runs
    # another loop on its thread)
    if engine.started and asyncio.get_running_loop() is not engine.loop:
        raise ZmqMeshError("this AsyncNode runs on another event loop; use it from the loop that "
                           "started it (or start a node per loop)")


class AsyncRunner:
    """Runs plans on the node's event loop, awaiting where they wait, and requests the quick
    way while all goes well (`request`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.commits = LoopCommits(engine)

    async def run(self, plan: Plan | QuickRequest, *, value: Any = None, error: BaseException | None = None) -> Any:
        """Carry out ``plan`` and return its result; raises what it raises. A raw ZeroMQ
        error becomes `ZmqMeshError`, and so does a call from another event loop. A plan
        begun elsewhere goes on with the outcome of its last step: ``value`` or ``error``;
        a request whose quick way ended (`send_quick`), as its plan, from where that left it."""
        try:
            check_loop(self.engine)
        except ZmqMeshError:
            plan.close()
            raise
        if isinstance(plan, QuickRequest):  # (its quick way ended: `send_quick`)
            plan = plan.plan()
        while True:
            finished, step = advance(plan, value, error)
            if finished:
                return step
            value, error = None, None
            try:
                if isinstance(step, Exchange):
                    requester = self.engine.requests
                    assert isinstance(requester, LoopRequester), "the node is not started"
                    future = requester.exchange(step)  # a future: no coroutine per request
                    try:
                        value = await future
                    except asyncio.CancelledError:
                        requester.abandon(future)
                        raise
                elif isinstance(step, Until):
                    await wait_until(self.engine, step.predicate, step.deadline, step.what)
                elif isinstance(step, Room):
                    value = await wait_for_room(self.engine, step.full, step.deadline)
                elif isinstance(step, OnLoop):
                    value = step.fn(*step.args)
                else:
                    raise TypeError(f"unknown step {step!r}")
            except asyncio.CancelledError:  # the plan gets to release what it holds (`GeneratorExit`)
                plan.close()
                raise
            except Exception as exc:
                error = exc

    async def request(self, call: Plan | QuickRequest) -> Any:
        """Carry out a request (`NodeBase._request_call`) and return its result; raises what
        `run` raises. One that may go the quick way (`QuickRequest`) does while all goes
        well (`send_quick`), its reply's future awaited here, and otherwise goes on as its
        plan from where the quick way left it."""
        if not isinstance(call, QuickRequest):
            return await self.run(call)
        future = self.send_quick(call)
        if future is None:  # (the quick way ended before the request went)
            return await self.run(call)
        requester = self.engine.requests
        assert isinstance(requester, LoopRequester), "the node is not started"
        try:
            reply = await future
        except asyncio.CancelledError:
            requester.abandon(future)
            raise
        except Exception as exc:
            error = exc  # (the plan goes on outside this handler: what it raises is not chained to this)
        else:
            finished, result = call.advance(reply, requester.tally)
            return result if finished else await self.run(call, value=reply)
        return await self.run(call, error=error)

    def send_quick(self, quick: QuickRequest) -> asyncio.Future[tuple[bytes, bytes]] | None:
        """Send a request the quick way (`QuickRequest.pick`): alone and at once to a
        provider that has none of this loop's requests in flight (`LoopRequester.exchange`),
        otherwise gathered into its batch (`LoopRequester.gathered`). The future of its
        reply ``(status, body)``, failed if the request could not be sent; None when the
        quick way ends before it (`request` goes on). Raises `ZmqMeshError` on another
        event loop."""
        check_loop(self.engine)
        requester = self.engine.requests
        assert isinstance(requester, LoopRequester), "the node is not started"
        provider = quick.pick(requester.tally)
        if provider is None:
            return None
        if requester.outstanding.busy(provider.id):
            return requester.gathered(provider, quick)
        try:
            return requester.exchange(quick.exchange(provider))
        except Exception as exc:
            failed: asyncio.Future[tuple[bytes, bytes]] = self.engine.loop.create_future()
            failed.set_exception(exc)
            return failed

    async def run_many(self, calls: Iterable[Plan | QuickRequest], window: int) -> list[Any]:
        """Carry out ``calls`` (made one by one as there is room) with at most ``window`` in
        flight, and return their results in order; the rules of `_drivers.pipelined.run_many`
        (`InOrder`): raises the error of the first call, in order, that failed, and what
        making a call raises. The requests still in flight when it raises, or when it is
        cancelled, are forgotten.

        A request that goes the quick way waits in the requester's table as a `_WindowSlot`,
        not a future: its reply is taken where it is read, the window is refilled right
        there, a batch's worth at a time (so a full batch goes at once), and this one
        coroutine wakes only when all is done. A request that needs more than its quick
        way goes on as its plan, in a task."""
        requester = self.engine.requests
        assert isinstance(requester, LoopRequester), "the node is not started"
        check_loop(self.engine)
        window_ = _Window(self, requester, InOrder(window), iter(calls), min(EARLY_ITEMS, window))
        try:
            window_.fill()
            while not window_.finished():
                await window_.changed()
            if window_.error is not None:
                raise window_.error
        finally:
            window_.forget()
        return window_.calls.outcome()


class _WindowSlot:
    """A request of `AsyncRunner.run_many`'s window that goes the quick way, as the
    requester's table holds it: what a future would be told (`set_result`,
    `set_exception`) goes straight to the window."""

    __slots__ = ("window", "index", "quick", "finished")

    def __init__(self, window: _Window, index: int, quick: QuickRequest) -> None:
        self.window = window
        self.index = index
        self.quick = quick
        self.finished = False

    def done(self) -> bool:
        """Whether its outcome is known (or the window gave it up): a reply now is late."""
        return self.finished

    def set_result(self, reply: tuple[bytes, bytes]) -> None:
        """The reply ``(status, body)`` came: the item's result, or its plan goes on."""
        self.finished = True
        window = self.window
        try:
            finished, result = self.quick.advance(reply, window.requester.tally)
        except Exception as exc:
            window.end(self.index, None, exc)
            return
        if finished:
            window.end(self.index, result, None)
        else:
            window.carry_on(self.index, self.quick, reply, None)

    def set_exception(self, error: BaseException) -> None:
        """The request failed (timed out, its provider left, the node stopped...): its plan
        decides what that means."""
        self.finished = True
        self.window.carry_on(self.index, self.quick, None, error)


class _Window:
    """The calls of one `AsyncRunner.run_many`: making them as there is room, and what
    they came to."""

    def __init__(self, runner: AsyncRunner, requester: LoopRequester, calls: InOrder[Any],
                 made: Iterator[Plan | QuickRequest], refill: int) -> None:
        self.runner = runner
        self.requester = requester
        self.calls = calls
        self.loop = runner.engine.loop
        self.error: Exception | None = None  # what making a call raised
        self._made = made
        self._more = True
        self._refill = refill
        self._waiter: asyncio.Future[None] | None = None

    def fill(self) -> None:
        """Make calls for the next items while the window has room for `refill` of them
        (and no call failed); what making one raises ends the window (`error`)."""
        calls = self.calls
        free = calls.free()
        if not self._more or free < self._refill or calls.failures or self.error is not None:
            return
        started = 0
        try:
            for call in islice(self._made, free):
                self.start(call)
                started += 1
        except Exception as exc:
            self.error, self._more = exc, False
            return
        self._more = started == free

    def finished(self) -> bool:
        """Whether nothing is left to wait for: every call ended (or one failed, and
        those before it ended), and no more are to be made."""
        calls = self.calls
        return self.error is not None or (not calls.waiting() and (not self._more or bool(calls.failures)))

    def start(self, call: Plan | QuickRequest) -> None:
        """Begin ``call``, for the next item."""
        calls = self.calls
        if isinstance(call, QuickRequest):
            provider = call.pick(self.requester.tally)
            if provider is not None:
                slot = _WindowSlot(self, len(calls.results), call)
                calls.begin(slot)
                try:
                    self.requester.gather(provider, call, slot)
                except Exception as exc:  # (no socket to the provider: the plan decides)
                    slot.set_exception(exc)
                return
            call = call.plan()
        index = calls.begin(None)
        self._follow(index, self.loop.create_task(self.runner.run(call)))

    def carry_on(self, index: int, quick: QuickRequest, value: Any, error: BaseException | None) -> None:
        """The quick way of item ``index`` ended: its plan goes on, in a task, with the outcome."""
        self._follow(index, self.loop.create_task(self.runner.run(quick.plan(), value=value, error=error)))

    def _follow(self, index: int, task: asyncio.Task[Any]) -> None:
        self.calls.running[index] = task
        task.add_done_callback(lambda done: self._task_done(index, done))

    def _task_done(self, index: int, task: asyncio.Task[Any]) -> None:
        if index not in self.calls.running:  # (given up: `forget`)
            return
        if task.cancelled():  # (by someone else than this window: a failure, not a hang)
            self.end(index, None, ZmqMeshError("the call's task was cancelled"))
            return
        error = task.exception()
        self.end(index, None if error is not None else task.result(), error)

    def end(self, index: int, value: Any, error: BaseException | None) -> None:
        """Item ``index`` returned ``value`` or failed with ``error``: the window is refilled,
        and the coroutine woken once all is done."""
        self.calls.end(index, value, error)
        self.fill()
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self.finished():
            waiter.set_result(None)

    async def changed(self) -> None:
        """Wait until a call's `end` finds all done (`finished`)."""
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def forget(self) -> None:
        """Give up the calls still running: tasks cancelled, requests forgotten (their
        late replies are counted as dropped); no more are made."""
        self._more = False
        running = self.calls.running
        slots = False
        for waiting in running.values():
            if isinstance(waiting, _WindowSlot):
                waiting.finished = True
                slots = True
            elif isinstance(waiting, asyncio.Task):
                waiting.cancel()
        running.clear()
        if slots:
            self.requester.abandon(None)


class LoopCommits:
    """Group commit for tasks (the twin of the threads' turns in
    `DurableQueues.commit_in_turn`).

    The durable pushes of the tasks that push during one pass of the loop gather, and are
    committed together, in one transaction, at its end. A lone producer (a single task
    pushing, `_LONE_PASSES` passes in a row) commits at once instead, and gives up the loop
    only every `_LONE_PASSES` pushes (so that other tasks run: one that pushes too ends the
    lone mode). A push cancelled while it waits for its group may still be stored.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._gathered: list[tuple[Ticket, asyncio.Future[None], asyncio.Task[Any] | None]] = []
        self._lone_passes = 0
        self._lone_task: asyncio.Task[Any] | None = None
        self._lone_pushes = 0

    async def commit(self, ticket: Ticket) -> None:
        """Store ``ticket``'s messages; raises what kept them out (`StoreFullError`,
        `StoreError`)."""
        task = asyncio.current_task()
        if task is self._lone_task and task is not None:
            self.engine.durable.commit_group([ticket])  # type: ignore[union-attr]
            self._lone_pushes += 1
            if self._lone_pushes % _LONE_PASSES == 0:
                await asyncio.sleep(0)
        else:
            self._lone_task = None
            loop = self.engine.loop
            stored: asyncio.Future[None] = loop.create_future()
            if not self._gathered:
                loop.call_soon(self._end_pass)
            self._gathered.append((ticket, stored, task))
            await stored
        if ticket.error is not None:
            raise ticket.error

    def _end_pass(self) -> None:
        gathered, self._gathered = self._gathered, []
        if len(gathered) == 1:
            self._lone_passes += 1
            if self._lone_passes >= _LONE_PASSES:
                self._lone_task, self._lone_passes = gathered[0][2], 0
        else:
            self._lone_passes = 0
        try:
            self.engine.durable.commit_group([ticket for ticket, _, _ in gathered])  # type: ignore[union-attr]
        finally:
            for _, stored, _ in gathered:
                if not stored.done():  # cancelled meanwhile
                    stored.set_result(None)


async def wait_until(engine: Engine, predicate: Callable[[], bool], deadline: float | None, what: str) -> None:
    """Return once ``predicate()`` holds (re-checked on every change); raises `MeshTimeoutError`
    at ``deadline``, `NodeClosedError` if the node stops."""
    engine.ensure_running()
    if predicate():
        return
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
    future: asyncio.Future[None] = engine.loop.create_future()
    engine.waiters.add(predicate, future)
    # a timer that fails the future, awaited directly: ``asyncio.wait_for`` around it
    # returned normally when the condition was met in the pass the task was cancelled in
    # (Python < 3.12), and the cancelled task went on
    timer = None if timeout is None else engine.loop.call_later(timeout, _time_out, future, engine, what, timeout)
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()
        engine.waiters.remove(future)


def _time_out(future: asyncio.Future[None], engine: Engine, what: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(engine.timed_out(what, timeout))


class _RoomSignal:
    """`Space.event` of an asyncio node: the loop's `set` (it sent something) wakes every
    task waiting for room (`wait_for_room`), each through a future of its own.

    A future of its own, awaited directly, so that cancelling the waiting task always ends
    its wait: ``asyncio.wait_for`` around a shared ``asyncio.Event`` (as it was) returns
    normally, swallowing the cancellation, when the event was set at that moment (before
    Python 3.12), which, with a flush after every wake-up, was nearly always."""

    def __init__(self) -> None:
        # (insertion-ordered: the waiters wake in the order they began to wait, as on an
        # asyncio.Event; tasks pushing in turn then go on pushing in that turn)
        self._waiting: dict[asyncio.Future[bool], None] = {}

    def set(self) -> None:
        """Wake every waiter, in the order they began to wait, with True: a flush just ran
        (loop thread)."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting:
            if not future.done():
                future.set_result(True)

    async def wait(self, loop: asyncio.AbstractEventLoop, seconds: float) -> bool:
        """Wait for the next `set` (True) or ``seconds`` (False)."""
        woken: asyncio.Future[bool] = loop.create_future()
        self._waiting[woken] = None
        timer = loop.call_later(seconds, _resolve, woken, False)
        try:
            return await woken
        finally:
            timer.cancel()
            self._waiting.pop(woken, None)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


async def wait_for_room(engine: Engine, full: Callable[[], bool], deadline: float) -> bool:
    """Await while ``full()`` holds (back-pressure): True once there is room, False at
    ``deadline``. Raises `NodeClosedError` if the node stops, and `CancelledError` at once
    when the awaiting task is cancelled.

    It wakes the loop's flush at first, and again after each `_ROOM_SLICE_S` with no
    flush: not after a flush woke it (that one just sent what it could, and a queue it
    could not empty is tried again by its own retry), or each flush would start the next
    and spin the loop for as long as the queue stays full."""
    space = engine.space
    if not isinstance(space.event, _RoomSignal):
        space.event = _RoomSignal()
    signal: _RoomSignal = space.event
    loop = engine.loop
    assert isinstance(loop, asyncio.AbstractEventLoop)
    flushed = False
    while full():
        engine.ensure_running()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if not flushed:
            engine.outbound.wake()  # type: ignore[union-attr]
        flushed = await signal.wait(loop, min(remaining, _ROOM_SLICE_S))
    engine.ensure_running()  # (a stop empties the queues: that room is no place for a message)
    return True


class LoopInbox(Dispatcher):
    """Runs the inbox on the caller's event loop: ``async def`` handlers are awaited in place."""

    def __init__(self, engine: Engine, sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any]) -> None:
        super().__init__(config=engine.config, registry=engine.registry, directory=engine.directory,
                         codec=engine.codec, stats=engine.stats, describe=engine.describe,
                         sub=sub, pull=pull, router=router, store=engine.store,
                         keeper=engine.durable.submit if engine.durable is not None else None,
                         history=engine.history, node_closed=lambda: engine.closed)
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
        with contextlib.suppress(zmq.ZMQError):  # (closed meanwhile: nothing to rearm)
            pair[0].getsockopt(zmq.EVENTS)
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
        if not self.replays.wanted(fetch):  # (a subscription dropped meanwhile)
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
        finally:
            handling.close()  # (cancelled by a stop: the calls not reached are counted as dropped)

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
                # held replies wait for a quick handler, yet never past HOLD_LIMIT_S
                release = self.loop.call_later(HOLD_LIMIT_S, self.release_held) if self.holding() else None
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
                    if release is not None:
                        release.cancel()
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
                await self.loop.run_in_executor(self._worker, run_batch, batch, self.abandoned, started, outcomes,
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
            if is_async(call.handler):
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


_done = operator.methodcaller("done")  # (a future's, or a `_WindowSlot`'s)


def _fail_future(future: Any, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class LoopRequester:
    """Requests from coroutines: DEALERs owned by the event loop, one future per request
    (the table of what waits for what is `Outstanding`'s).

    One timer on the loop, set for the earliest deadline, fails overdue requests; whichever
    comes first, the reply, the deadline, the provider's departure, or the caller's
    cancellation (`abandon`), completes the future and forgets the request.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self._known: dict[str, Provider] = {}  # (to connect again: `_renew`)
        self.outstanding: Outstanding[Any] = Outstanding()  # (futures, and `_WindowSlot`s)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._unchecked: set[str] = set()
        self._sweep_soon = False
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._abandoned = 0  # requests abandoned since the last sweep (`abandon`)
        self._batches: RequestBatches[str, Any] = RequestBatches()
        self.tally = RequestTally()
        """What the loop's coroutines' requests count: added to the stats every
        `TALLY_FOLD_AT` requests sent (`Stats.count_sent`), and meanwhile counted by
        the stats' snapshots."""
        engine.stats.track(self.tally)

    def exchange(self, step: Exchange) -> asyncio.Future[tuple[bytes, bytes]]:
        """Send one request (or gather it, to go at the end of this pass of the loop, or
        with a batch that fills up: `RequestBatches`); the future of its reply ``(status,
        body)``. The future fails with `MeshTimeoutError` (also when the provider takes no
        more requests, for one that was gathered), `PeerLostError` or `NodeClosedError`; a
        send made at once raises `MeshTimeoutError` when the provider takes no more requests."""
        future: asyncio.Future[tuple[bytes, bytes]] = self.engine.loop.create_future()
        sock = self._socket(step.provider)
        try:
            sent = send_request(self.outstanding, future, sock, step, self.engine, self._batches, self._renew)
        except Exception:  # a send that failed may have taken the signal of a reply with it, too
            with contextlib.suppress(zmq.ZMQError):  # (a stop under way: what failed is said as it is)
                if not sock.closed and has_input(sock):
                    self.engine.loop.call_soon(self._on_readable, step.provider.id)
            raise
        if step.deadline < self._timer_at:
            self._arm(step.deadline)
        if sent:  # sent alone: whether that swallowed the signal of a reply, looked at now
            self.engine.stats.count_sent(self.tally, 1)
            sock = self.sockets.get(step.provider.id, sock)  # (renewed, if its connection was dropped)
            if has_input(sock):
                self._on_readable(step.provider.id)
            return future
        self._gathered(step.provider.id)
        return future

    def gather(self, provider: Provider, quick: QuickRequest, waiter: _WindowSlot | asyncio.Future[Any]) -> None:
        """Gather the request of a quick way to ``provider`` (`QuickRequest.pick`: one a
        batch can carry) into its batch, whether or not the provider is busy, as one of
        many at hand; ``waiter`` is told its outcome as a future would be. It goes with the
        batches of this pass of the loop, or at once with a batch that fills up."""
        provider_id, calling, deadline = provider.id, quick.calling, quick.deadline
        self._socket(provider)
        request_id = self.outstanding.add(waiter, provider_id, calling.service, deadline)
        self._batches.gather(provider_id, request_id, waiter, calling.service_b, quick.body)
        if deadline < self._timer_at:
            self._arm(deadline)
        self._gathered(provider_id)

    def gathered(self, provider: Provider, quick: QuickRequest) -> asyncio.Future[tuple[bytes, bytes]]:
        """`gather` the request of a quick way with a future to wait for its reply, as
        `exchange`'s; it fails as theirs do."""
        future: asyncio.Future[tuple[bytes, bytes]] = self.engine.loop.create_future()
        self.gather(provider, quick, future)
        return future

    def _gathered(self, provider_id: str) -> None:
        if self._batches.ready:  # a full batch goes now (its waiters fail if it cannot)
            self._send_batches(full_only=True)
        if not self._unchecked:
            self.engine.loop.call_soon(self._check_sent)
        self._unchecked.add(provider_id)

    def abandon(self, future: Any) -> None:
        """Forget the request of ``future`` (cancelled with its caller; None: the slots of a
        window), soon, in one sweep of the requests in flight: at the end of this pass of
        the loop once the requests abandoned since the last sweep are a
        `_SWEEP_SHARE`-th of those in flight or more (cancelling a gather of n requests
        must not cost n sweeps), or with a window's; otherwise within `_SWEEP_S` (a sweep
        for each of the cancellations that come one by one would cost a look at every
        request in flight each). Until then a reply to one finds its future done. A future
        already answered is in flight no more: if its reply came in the pass its caller was
        cancelled, that reply reached no one, and counts as dropped, not received."""
        if future is not None and future.done() and not future.cancelled():
            if future.exception() is None:
                counters = self.engine.stats.pattern["request"]
                counters["received"] -= 1
                counters["dropped"] += 1
            return
        self._abandoned += 1
        if future is None or self._abandoned * _SWEEP_SHARE >= len(self.outstanding):
            if not self._sweep_soon:
                self._sweep_soon = True
                self.engine.loop.call_soon(self._forget_abandoned)
        elif self._sweep_timer is None:
            self._sweep_timer = self.engine.loop.call_later(_SWEEP_S, self._forget_abandoned)

    def _forget_abandoned(self) -> None:
        self._sweep_soon = False
        self._abandoned = 0
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        self.outstanding.forget_where(_done)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self.engine.loop
        self._timer_at = deadline
        self._timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0), self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        errors = 0
        for future, service in self.outstanding.expired(time.monotonic()):
            if not future.done():
                errors += 1
                future.set_exception(MeshTimeoutError(f"request to {service!r} timed out"))
        self.engine.stats.pattern["request"]["errors"] += errors
        deadline = self.outstanding.next_deadline()
        if deadline is not None:
            self._arm(deadline)

    def _socket(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self.sockets.get(provider.id)
        if sock is None:
            sock = self.sockets[provider.id] = self.engine.dealer_to(provider)
            self._known[provider.id] = provider
            self.engine.loop.add_reader(sock.FD, self._on_readable, provider.id)
            self.engine.loop.call_soon(self._on_readable, provider.id)
        return sock

    def _renew(self, provider_id: str) -> zmq.Socket[Any]:
        """A new socket to ``provider_id`` in place of one whose connection was dropped."""
        close_watched(self.engine.loop, self.sockets.pop(provider_id))
        return self._socket(self._known[provider_id])

    def _check_sent(self) -> None:
        """At the end of a pass of the loop that gathered requests: send the batches
        (`RequestBatches`), then read the sockets sent on that hold replies: sending may
        have swallowed the descriptor's signal (once per pass, not per request; a request
        sent alone is looked after by `exchange`, at once). The requests gathered while it
        reads (a window refilled as its replies come: `_Window`) schedule the next one."""
        unchecked, self._unchecked = self._unchecked, set()
        self._send_batches()
        for provider_id in unchecked:
            sock = self.sockets.get(provider_id)
            if sock is not None and has_input(sock):
                self._on_readable(provider_id)

    def _send_batches(self, full_only: bool = False) -> None:
        sent = send_batches(self._batches, self.sockets, self.outstanding, self.engine, _fail_future,
                            _done, full_only=full_only, renew=self._renew, tally=self.tally)
        if sent:
            self.engine.stats.count_sent(self.tally, sent)

    def _on_readable(self, provider_id: str) -> None:
        sock = self.sockets.get(provider_id)
        if sock is not None and self._read(sock, provider_id, _READ_BURST):
            self.engine.loop.call_soon(self._on_readable, provider_id)

    def _read(self, sock: zmq.Socket[Any], provider_id: str, burst: int) -> bool:
        # True if it read the whole burst (more may wait)
        counters = self.engine.stats.pattern["request"]
        outstanding = self.outstanding
        answer_all = outstanding.answer_all
        for i in range(burst):
            # a lone reply (nothing else waited for): a check, not a raised Again; with requests
            # in flight, replies tend to queue, and a check would be spent on most frames
            if i == 1 and not outstanding and not has_input(sock):
                return False
            try:
                frames = recv_frames(sock)
            except zmq.ZMQError:
                return False
            answered, unanswered = answer_all(frames, provider_id)
            counters["dropped"] += unanswered  # late replies, or ones nobody asked for
            for future, status, body in answered:
                if future.done():
                    counters["dropped"] += 1  # its caller gave up
                else:
                    counters["received"] += 1
                    future.set_result((status, body))
        return True

    def peer_gone(self, peer_id: str) -> None:
        """Take the replies a departed provider sent before it left (a stopping node answers,
        then says goodbye), fail the requests still waiting on it at once, and close its
        socket."""
        sock = self.sockets.get(peer_id)
        if sock is not None:  # (a frame answers one request or more: bounded by those waiting)
            self._read(sock, peer_id, len(self.outstanding) + 1)
        errors = 0
        for future, _service in self.outstanding.lost(peer_id):
            if not future.done():
                errors += 1  # (counted as the threads' requesters count theirs)
                future.set_exception(PeerLostError(f"provider {peer_id[:8]} left before replying", peer_id))
        self.engine.stats.pattern["request"]["errors"] += errors
        sock = self.sockets.pop(peer_id, None)
        self._known.pop(peer_id, None)
        if sock is not None:
            close_watched(self.engine.loop, sock)

    def fail_outstanding(self) -> None:
        """Fail every waiting request with `NodeClosedError` and close every socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for future in self.outstanding.take_all():
            if not future.done():
                future.set_exception(NodeClosedError("the node stopped while a request was outstanding"))
        for pid in list(self.sockets):
            close_watched(self.engine.loop, self.sockets.pop(pid))

    def close(self) -> None:
        """Add up what the tally still holds (`fail_outstanding` closed the sockets)."""
        self.engine.stats.untrack(self.tally)


async def stop_async(engine: Engine, inbox: LoopInbox, timeout: float) -> None:
    """Run the stop plan on the node's loop. Never raises: a step that fails is logged and
    the later steps still run.

    Nor does cancelling its task end the stop half-way: the step under way ends at once
    (the handlers still running are cut short), and the later steps still run, within the
    stop's bound. ``asyncio.run`` cancels every task left when its coroutine returns, such
    as the stop of a ``node.stop()`` that ``asyncio.wait_for`` gave up on; that left the
    node's ZeroMQ context and some 30 descriptors open, and said no goodbye."""
    plan = stop_plan(engine, timeout)
    value: Any = None
    while True:
        finished, step = advance(plan, value, None)
        if finished:
            return
        value = None
        try:
            if step.where == ON_LOOP:
                value = step.fn(*step.args)
            elif step.where == INBOX:
                await inbox.stop(*step.args)
            elif step.where == CALLER:  # (it blocks: never on the loop)
                await asyncio.get_running_loop().run_in_executor(None, step.fn)
            elif step.where == AFTER_LOOP:
                bound = engine.config.linger_s + 1  # the lingers were set within linger_s
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, step.fn), bound)
            else:
                await asyncio.sleep(step.args[0])
        except asyncio.CancelledError:
            log.debug("node %s: the stop's task was cancelled while %s; the stop goes on", engine.name, step.what)
            uncancel = getattr(asyncio.current_task(), "uncancel", None)
            if uncancel is not None:  # (Python 3.11+: the task no longer counts as being cancelled)
                uncancel()
        except Exception as exc:
            log.warning("node %s: %s failed while stopping: %s", engine.name, step.what, exc)
