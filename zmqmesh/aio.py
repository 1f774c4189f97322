"""The asyncio side of the core: what `AsyncNode` (and a sync node's ``async def`` handlers) need.

Kept apart so that a process using only the sync `Node` never imports asyncio (and the
``ssl`` module asyncio brings along). The core itself is loop-agnostic; here are:

* `LoopInbox`: the inbox on the caller's loop (``async def`` handlers awaited in place);
* `LoopRequester`: requests from coroutines, one future per request;
* `wait_until`, `wait_for_provider`, `wait_for_room`: the core's waits as coroutines;
* `HandlerLoop`: a private loop on its own thread for a sync node's ``async def`` handlers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from .core import no_provider
from .errors import MeshTimeoutError, NodeClosedError, PeerLostError
from .inbox import Call, Inbox, is_async
from .reqrep import RetryElsewhere, decode_reply, new_dealer
from .sockets import close_watched, has_input, recv_frames, send_frames

if TYPE_CHECKING:
    from .core import MeshCore, Provider

__all__ = ["LoopInbox", "LoopRequester", "HandlerLoop", "wait_until", "wait_for_provider", "wait_for_room"]

log = logging.getLogger("zmqmesh.aio")


async def wait_until(core: MeshCore, predicate: Callable[[], bool], timeout: float | None) -> None:
    """Return once ``predicate()`` holds (re-checked on every change); raises `MeshTimeoutError`."""
    core.ensure_running()
    if predicate():
        return
    future: asyncio.Future[None] = core.loop.create_future()
    core.add_waiter(predicate, future)
    try:
        await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise MeshTimeoutError(f"condition not met within {timeout} s") from None
    finally:
        core.remove_waiter(future)


async def wait_for_provider(core: MeshCore, service: str, deadline: float, only: str | None = None) -> Provider:
    """A provider of ``service`` (``only`` that node, if given), awaiting until ``deadline``."""
    provider = core.pick_provider(service, only)
    while provider is None:
        core.ensure_running()
        remaining = deadline - time.monotonic()
        try:
            await wait_until(core, lambda: core.pick_provider(service, only) is not None, max(remaining, 0))
        except MeshTimeoutError:
            raise no_provider(service, only) from None
        provider = core.pick_provider(service, only)
    return provider


async def wait_for_room(core: MeshCore, q: deque[Any], deadline: float) -> None:
    """Await while ``q`` is full (back-pressure); raises `MeshTimeoutError` at ``deadline``."""
    limit = core.config.send_queue_max
    if core.space_event is None:
        core.space_event = asyncio.Event()
    event: asyncio.Event = core.space_event
    while len(q) >= limit:
        core.ensure_running()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MeshTimeoutError("send queue full: the receivers are not keeping up")
        event.clear()
        core.wake_flush()
        try:
            await asyncio.wait_for(event.wait(), min(remaining, 0.1))
        except asyncio.TimeoutError:
            pass


class HandlerLoop:
    """An asyncio loop on a thread of its own, for the ``async def`` handlers of a sync `Node`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        try:
            self.loop.run_forever()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))  # let the cancelled see it
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Run ``coro`` on the loop; its outcome as a thread-safe future. `RuntimeError` once closed."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            raise

    def close(self, timeout: float = 1.0) -> None:
        """Stop the loop (cancelling what still runs) and wait a bounded time for its thread."""
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


class LoopInbox(Inbox):
    """Runs the inbox on the caller's event loop: ``async def`` handlers are awaited in place."""

    def __init__(self, core: MeshCore, sub: zmq.Socket[Any], pull: zmq.Socket[Any], router: zmq.Socket[Any]) -> None:
        super().__init__(core, sub, pull, router)
        self.loop = core.loop
        concurrency = core.config.handler_concurrency
        self._worker = ThreadPoolExecutor(concurrency, thread_name_prefix="zmqmesh-handler")
        self._concurrency = asyncio.Semaphore(concurrency) if concurrency > 1 else None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Watch the sockets' descriptors."""
        self.apply_subscriptions()
        for sock, _kind in self.sockets:
            self.loop.add_reader(sock.FD, self.wake)
        self.wake()

    def wake(self) -> None:
        """Start a drain unless one is running (then it goes round once more)."""
        if self.abandoned():
            return
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._drain())
        else:
            self._again = True

    def post(self, calls: list[Call]) -> None:
        """Queue event callbacks to run in order with messages (loop thread only)."""
        self.events.extend(calls)
        self.wake()

    def registry_changed(self) -> None:
        """Re-apply subscriptions (loop thread only)."""
        self.apply_subscriptions()

    async def _drain(self) -> None:
        calls: list[Call] = []
        try:
            while not self.abandoned():
                self._again = False
                while self.events:
                    calls.append(self.events.popleft())
                more = False
                for sock, kind in self.sockets:
                    if self.drain(sock, kind, calls):
                        more = True
                if calls:
                    await self._execute(calls)
                    calls.clear()
                if not (more or self._again or self.events or any(
                    has_input(sock) for sock, _ in self.sockets
                )):
                    return
                await asyncio.sleep(0)  # let the loop breathe between bursts
        except Exception:
            if not self.abandoned():
                log.exception("inbox drain failed")

    async def _execute(self, calls: list[Call]) -> None:
        if self._concurrency is not None:
            for call in calls:
                await self._concurrency.acquire()
                task = self.loop.create_task(self._run_one(call))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        batch: list[Call] = []
        for call in calls:
            if self.abandoned():
                self.core.stats.pattern[call.pattern]["dropped"] += 1
                continue
            if is_async(call.handler):
                if batch:
                    await self._run_sync_batch(batch)
                    batch = []
                try:
                    result, error = await call.handler(call.arg), None
                except Exception as exc:
                    result, error = None, exc
                if call.route is None and error is None:
                    continue  # nothing to reply or count
                self.complete(call, result, error)
            else:
                batch.append(call)
        if batch:
            await self._run_sync_batch(batch)

    async def _run_sync_batch(self, batch: list[Call]) -> None:
        outcomes = await self.loop.run_in_executor(self._worker, _run_batch, batch)
        for call, (result, error) in zip(batch, outcomes):
            self.complete(call, result, error)

    async def _run_one(self, call: Call) -> None:
        try:
            if is_async(call.handler):
                result, error = await self.run_async(call)
            else:
                result, error = await self.loop.run_in_executor(self._worker, self.run_sync, call)
            self.complete(call, result, error)
        finally:
            assert self._concurrency is not None
            self._concurrency.release()

    async def stop(self, timeout: float) -> None:
        """Handle what has already arrived (bounded by ``timeout``), then close the sockets."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        for sock, _kind in self.sockets:
            try:
                self.loop.remove_reader(sock.FD)
            except Exception:
                pass
        self.wake()  # one last pass over what is already in the sockets
        pending = [t for t in (self._task, *self._tasks) if t is not None and not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.close_sockets()


def _run_batch(batch: list[Call]) -> list[tuple[Any, BaseException | None]]:
    return [Inbox.run_sync(call) for call in batch]


class _Expired(Exception):
    """A request's deadline passed (turned into `MeshTimeoutError`)."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())



class LoopRequester:
    """Requests from coroutines: DEALERs owned by the event loop, one future per request."""

    def __init__(self, core: MeshCore) -> None:
        self.core = core
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self.pending: dict[bytes, tuple[asyncio.Future[tuple[bytes, bytes]], str]] = {}
        self._ids = itertools.count(1)

    async def request(self, service: str, service_b: bytes, body: bytes, timeout: float, only: str | None = None) -> Any:
        """Send ``body`` to one provider of ``service`` (``service_b``: its name, checked and
        encoded by the node) and await the reply; ``only``: that node's."""
        core = self.core
        loop = core.loop
        deadline = time.monotonic() + timeout
        while True:
            provider = core.pick_provider(service, only) or await wait_for_provider(core, service, deadline, only)
            sock = self._socket(provider)
            request_id = next(self._ids).to_bytes(8, "big")
            future: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
            self.pending[request_id] = (future, provider.id)
            try:
                try:
                    send_frames(sock, [service_b, request_id, body], copy=len(body) < 65536)
                except zmq.Again as exc:
                    raise MeshTimeoutError(f"provider {provider.id[:8]} of {service!r} is not accepting requests") from exc
                core.stats.pattern["request"]["sent"] += 1
                self._kick(provider.id)
                # a timer on the future itself: cheaper than asyncio.wait_for's extra task
                timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0), _expire, future)
                try:
                    status, reply = await future
                except _Expired:
                    core.stats.pattern["request"]["errors"] += 1
                    raise MeshTimeoutError(f"request to {service!r} timed out") from None
                finally:
                    timer.cancel()
            except PeerLostError:
                if not core.may_retry(service, provider.id, deadline):
                    raise
                continue
            finally:
                self.pending.pop(request_id, None)
            try:
                return decode_reply(core, status, reply)
            except RetryElsewhere:
                core.skip_provider(service, provider.id)

    def _socket(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self.sockets.get(provider.id)
        if sock is None:
            sock = self.sockets[provider.id] = new_dealer(self.core, provider)
            self.core.loop.add_reader(sock.FD, self._on_readable, provider.id)
            self.core.loop.call_soon(self._on_readable, provider.id)
        return sock

    def _kick(self, provider_id: str) -> None:
        sock = self.sockets.get(provider_id)
        if sock is not None and has_input(sock):
            self.core.loop.call_soon(self._on_readable, provider_id)

    def _on_readable(self, provider_id: str) -> None:
        sock = self.sockets.get(provider_id)
        stats = self.core.stats.pattern["request"]
        for _ in range(1024):
            if sock is None:
                return
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            entry = self.pending.get(frames[0]) if len(frames) == 3 else None
            if entry is None or entry[0].done():
                stats["dropped"] += 1
                continue
            stats["received"] += 1
            entry[0].set_result((frames[1], frames[2]))
            sock = self.sockets.get(provider_id)
        self.core.loop.call_soon(self._on_readable, provider_id)

    def peer_gone(self, peer_id: str) -> None:
        """Fail the requests waiting on a departed provider at once, and close its socket."""
        for future, pid in list(self.pending.values()):
            if pid == peer_id and not future.done():
                future.set_exception(PeerLostError(f"provider {peer_id[:8]} left before replying", peer_id))
        sock = self.sockets.pop(peer_id, None)
        if sock is not None:
            close_watched(self.core.loop, sock)

    def close(self) -> None:
        """Fail every waiting request with `NodeClosedError` and close every socket."""
        for future, _pid in list(self.pending.values()):
            if not future.done():
                future.set_exception(NodeClosedError("the node stopped while a request was outstanding"))
        for pid in list(self.sockets):
            close_watched(self.core.loop, self.sockets.pop(pid))
