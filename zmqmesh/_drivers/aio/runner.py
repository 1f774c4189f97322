"""The asyncio driver's waiting: a plan's steps awaited (`AsyncRunner`), a request the
quick way while all goes well, the window `request_many` keeps in flight (`Window`),
durable commits in turn (`LoopCommits`), and waits for a condition or for room
(`wait_until`, `wait_for_room`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._engine.api import ItemCalls, OnLoop, Plan, advance
from ..._engine.engine import Engine
from ..._mesh.waiters import Room, Until
from ..._patterns.in_order import InOrder
from ..._patterns.reqrep import Calling, Exchange, QuickRequest
from ..._patterns.request_batches import EARLY_ITEMS
from ..._wire import frames as wire
from ...errors import ZmqMeshError
from ..room import room_waits
from .requests import LoopRequester

if TYPE_CHECKING:
    from ..._patterns.durable import Ticket

__all__ = ["AsyncRunner", "check_loop", "LoopCommits", "Window", "WindowSlot", "wait_until", "wait_for_room"]


_LONE_PASSES = 16


def check_loop(engine: Engine) -> None:
    """Raises `ZmqMeshError` when called from another event loop than the node's: its
    sockets and futures belong to that one loop (`NodeClosedError` once it stopped)."""
    # (asked of asyncio every call, though on Python 3.11 its answer costs a getpid() system
    # call, some 0.3 us of a request's 7 in flight: no cheaper check is exact, since a
    # node's loop may be run again on another thread, or set aside by a bridge that runs
    # another loop on its thread)
    if engine.started and asyncio.get_running_loop() is not engine.loop:
        engine.ensure_running()  # (stopped: that is what to say, wherever it is called from)
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
        a request whose quick way ended (`request`), as its plan, from where that left it."""
        try:
            check_loop(self.engine)
        except ZmqMeshError:
            plan.close()
            raise
        if isinstance(plan, QuickRequest):  # (its quick way ended: `request`)
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

    async def request(self, calling: Calling, body: bytes, seconds: float) -> Any:
        """Carry out a call that may go the quick way (`Calling`, `QuickRequest`'s way), of
        the encoded ``body``, within ``seconds`` from now, and return its result; raises
        what `run` raises (the twin of `BlockingRunner.request`). While all goes well it
        goes to the provider `Calling.choose` gives: alone and at once if that one has
        none of this loop's requests in flight (`LoopRequester.exchange`), otherwise, or
        while tasks that replies woke together run or wait to (`Wakes.waking`, `Wakes.due`),
        gathered into its batch (`LoopRequester.gather`), its reply's future awaited here.
        No `QuickRequest` and no plan are made unless the quick way ends (no provider it
        may go to, a reply not OK, a failure); then the call's plan goes on from there,
        with that outcome."""
        started = time.monotonic()
        deadline = started + seconds
        check_loop(self.engine)
        requester = self.engine.requests
        assert isinstance(requester, LoopRequester), "the node is not started"
        tally = requester.tally
        provider, sent = calling.choose(body, tally)
        reply: tuple[bytes, bytes] | None = None
        error: Exception | None = None
        if sent:  # (else the quick way ended before the request went)
            assert provider is not None
            future: asyncio.Future[tuple[bytes, bytes]]
            # (gathered when the provider is busy (`Outstanding.busy`, asked without a call), or
            # while tasks woken by replies run or wait to: theirs go together once they all ran)
            wakes = requester.wakes
            if provider.id in requester.outstanding.busy_with or wakes.waking or wakes.due:
                future = requester.gather(provider, calling, body, deadline)
            else:
                try:
                    future = requester.exchange(calling.exchange(provider, body, deadline))
                except Exception as exc:
                    future = self.engine.loop.create_future()
                    future.set_exception(exc)
            try:
                reply = await future
            except asyncio.CancelledError:
                requester.abandon(future)
                raise
            except Exception as exc:
                error = exc  # (the plan goes on outside this handler: what it raises is not chained to this)
            else:
                if reply[0] == wire.STATUS_OK:  # (`QuickRequest.advance`'s way for the common reply, spared its call)
                    return calling.result(reply[1], tally, started)
        return await self.run(QuickRequest(calling, body, deadline, started, provider, sent), value=reply, error=error)

    async def run_many(self, calls: ItemCalls, window: int) -> list[Any]:
        """Carry out ``calls`` (made as there is room: `ItemCalls.take`) with at most ``window``
        in flight, and return their results in order; the rules of `_drivers.pipelined.run_many`
        (`InOrder`): raises the error of the first call, in order, that failed, and what
        making a call raises. The requests still in flight when it raises, or when it is
        cancelled, are forgotten.

        A request that goes the quick way waits in the requester's table as a `WindowSlot`,
        not a future: its reply is taken where it is read, the window is refilled right
        there, a batch's worth at a time (so a full batch goes at once), and this one
        coroutine wakes only when all is done. A request that needs more than its quick
        way goes on as its plan, in a task."""
        requester = self.engine.requests
        assert isinstance(requester, LoopRequester), "the node is not started"
        check_loop(self.engine)
        window_ = Window(self, requester, InOrder(window), calls, min(EARLY_ITEMS, window))
        try:
            window_.fill()
            while not window_.finished():
                await window_.changed()
            if window_.error is not None:
                raise window_.error
        finally:
            window_.forget()
        return window_.calls.outcome()


class WindowSlot:
    """A request of `AsyncRunner.run_many`'s window that goes the quick way, as the
    requester's table holds it: what a future would be told (`set_result`,
    `set_exception`) goes straight to the window."""

    __slots__ = ("window", "index", "quick", "finished")

    def __init__(self, window: Window, index: int, quick: QuickRequest) -> None:
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
        if reply[0] != wire.STATUS_OK:  # (`QuickRequest.advance`'s way, spared its call: the plan goes on)
            window.carry_on(self.index, self.quick, reply, None)
            return
        try:
            quick = self.quick
            result = quick.calling.result(reply[1], window.requester.tally, quick.started)
        except Exception as exc:
            window.end(self.index, None, exc)
            return
        window.end(self.index, result, None)

    def set_exception(self, error: BaseException) -> None:
        """The request failed (timed out, its provider left, the node stopped...): its plan
        decides what that means."""
        self.finished = True
        self.window.carry_on(self.index, self.quick, None, error)


class Window:
    """The calls of one `AsyncRunner.run_many`: making them as there is room, and what
    they came to."""

    def __init__(self, runner: AsyncRunner, requester: LoopRequester, calls: InOrder[Any],
                 made: ItemCalls, refill: int) -> None:
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
        try:
            made, failed = self._made.take(free)
            for call in made:
                self.start(call)
        except Exception as exc:
            self.error, self._more = exc, False
            return
        if failed is not None:
            self.error, self._more = failed, False
            return
        self._more = len(made) == free

    def finished(self) -> bool:
        """Whether nothing is left to wait for: every call ended (or one failed, and
        those before it ended), and no more are to be made."""
        calls = self.calls  # (asked after every reply: whether calls still wait, only once no more are to be made)
        return self.error is not None or ((not self._more or bool(calls.failures)) and not calls.waiting())

    def start(self, call: Plan | QuickRequest) -> None:
        """Begin ``call``, for the next item."""
        calls = self.calls
        if isinstance(call, QuickRequest):
            provider = call.pick(self.requester.tally)
            if provider is not None:
                slot = WindowSlot(self, len(calls.results), call)
                calls.begin(slot)
                try:
                    self.requester.gather(provider, call.calling, call.body, call.deadline, slot)
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
            if isinstance(waiting, WindowSlot):
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
    ``deadline`` (`room_waits`). Raises `NodeClosedError` if the node stops, and
    `CancelledError` at once when the awaiting task is cancelled."""
    space = engine.space
    if not isinstance(space.event, _RoomSignal):
        space.event = _RoomSignal()
    signal: _RoomSignal = space.event
    loop = engine.loop
    assert isinstance(loop, asyncio.AbstractEventLoop)
    waits = room_waits(engine, full, deadline)
    finished, step = advance(waits, None, None)
    while not finished:
        finished, step = advance(waits, await signal.wait(loop, step), None)
    return bool(step)
