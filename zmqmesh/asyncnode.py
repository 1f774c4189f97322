"""`AsyncNode`: the coroutine API. Its engine runs on the caller's asyncio loop.

Same decorators and method names as `Node`, over the same `NodeBase`; the plans are
carried out by the asyncio driver (`_drivers.aio`), so a program that only uses `Node`
never imports asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

from ._drivers import at_exit
from ._drivers.aio import AsyncRunner, LoopInbox, LoopRequester, check_loop, stop_async
from ._engine.api import (
    NodeBase,
    as_frames,
    check_group,
    check_peer_id,
    check_timeout,
    check_window,
)
from ._io.serving import not_ignored, served, serving
from .config import NodeConfig, check_switch
from .errors import NodeClosedError, ZmqMeshError
from .message import Peer

log = logging.getLogger("zmqmesh.aio")

__all__ = ["AsyncNode"]

_RUN_POLL_S = 0.5  # how often serve_forever looks whether the node was stopped meanwhile
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _ServingHandlers:
    """The SIGINT and SIGTERM handlers of the nodes serving on one event loop
    (`AsyncNode.serve_forever`). A loop holds one handler per signal, so the first node
    to serve puts in place one that wakes every node serving there (each node's own
    replaced the one before: a signal reached only the last, and the others served on);
    the last to end takes it away and puts back what it replaced. A signal the process
    ignores gets none (`not_ignored`): it stays ignored."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put the handlers in place on ``loop``. Raises `ZmqMeshError` for a loop that
        cannot take them (``add_signal_handler`` unsupported), with none left in place."""
        self.loop = loop
        self.woken: list[asyncio.Event] = []  # one per node serving
        self.replaced = {sig: signal.getsignal(sig) for sig in not_ignored(_SIGNALS)}
        placed: list[int] = []
        try:
            for sig in self.replaced:
                loop.add_signal_handler(sig, self._wake)
                placed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            self._take_away(placed)
            raise ZmqMeshError(f"serve_forever() handles SIGINT and SIGTERM: this event loop cannot take "
                               f"signal handlers ({type(exc).__name__}: {exc})") from None

    def _wake(self) -> None:
        for event in self.woken:
            event.set()

    def take_away(self) -> None:
        """Remove the loop's handlers, and put back those they replaced (asyncio.run's
        SIGINT one, a program's own): removed, a loop's leaves Python's default handler,
        or the system's. One that a loop's ``add_signal_handler`` had put in place went
        with the handler it stood for: the default stays."""
        self._take_away(self.replaced)

    def _take_away(self, signals: Iterable[int]) -> None:
        for sig in signals:
            self.loop.remove_signal_handler(sig)
            previous = self.replaced[sig]
            if previous is not None and getattr(previous, "__module__", None) != "asyncio.unix_events":
                signal.signal(sig, previous)


_LOOP_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, threading.Lock] = weakref.WeakKeyDictionary()
_LOOP_LOCKS_LOCK = threading.Lock()  # (`_stop_on_its_loop`: a lock per loop, made under this one)


_SERVING_ON: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ServingHandlers] = weakref.WeakKeyDictionary()


class AsyncNode(NodeBase):
    """A mesh node for asyncio programs; its engine runs on the caller's event loop.

    Same decorators and method names as `Node`; the calls are coroutines. ``async def``
    handlers are awaited on the loop, in arrival order; ``def`` handlers run on a worker
    thread so they never block the loop. ``name`` as for `Node` (`ConfigError` for one
    no HELLO can carry).

    Example:

        async with zmqmesh.AsyncNode("client") as node:
            print(await node.request("add", {"a": 1, "b": 2}))
    """

    def __init__(self, name: str | None = None, *, config: NodeConfig | None = None, **options: Any) -> None:
        super().__init__(name, NodeConfig.from_options(config, **options), LoopInbox, LoopRequester)
        self._runner = AsyncRunner(self._engine)
        self._stopping: asyncio.Future[None] | None = None  # the stop under way (see `stop`)
        self._loop_end: AsyncIterator[None] | None = None  # (see `_stop_as_loop_ends`)

    async def start(self) -> AsyncNode:
        """Bind, start discovery and handlers on the running loop; returns the node.

        Raises `ZmqMeshError` (or `ConfigError`) on failure, `NodeClosedError` for a node
        that was stopped.
        """
        self._check_process()
        if self._stopped:  # (also one stopped before it ever started)
            raise NodeClosedError("a stopped node cannot be started again; create a new one")
        if self._engine.started:
            self._check_loop()
            return self
        try:
            self._engine.start(asyncio.get_running_loop())
        except ZmqMeshError:
            self._mark_stopped()
            raise
        except Exception as exc:
            self._mark_stopped()
            raise ZmqMeshError(f"node {self.name!r} failed to start: {exc}") from exc
        at_exit.running(self, AsyncNode._stop_at_exit, at_exit.STOP_TIMEOUT_S + 2 * self.config.linger_s + 2.0)
        if sys.get_asyncgen_hooks().finalizer is not None:  # (the loop closes async generators: asyncio's loops do)
            self._loop_end = self._stop_as_loop_ends()
            await self._loop_end.__anext__()  # (its first step: the loop now holds it, `_stop_as_loop_ends`)
        return self

    async def _stop_as_loop_ends(self) -> AsyncIterator[None]:
        """Held open from the start on: the event loop closes it as it shuts down
        (``asyncio.run`` does when its coroutine returns or raises: ``shutdown_asyncgens``),
        or when the node is collected, and a node still running then is stopped on the
        loop, after a warning. (Left running, its loop's end cut it off: what it had not
        sent was lost, and peers waited ``peer_timeout_s`` to take it for gone.)"""
        try:
            yield
        finally:
            try:
                on_its_loop = asyncio.get_running_loop() is self._engine.loop
            except RuntimeError:  # (closed with no loop running: nothing to stop it on)
                on_its_loop = False
            if on_its_loop and self.running:
                log.warning("node %s was left running (its event loop ends, or nothing refers to it any more): "
                            "stopping it, so that what it queued goes out (%d message(s) not sent yet); stop it in "
                            "the program (`async with node:`, or `await node.stop()`)", self.name,
                            self._engine.counters()["gauges"]["queued"])
                await self.stop(at_exit.STOP_TIMEOUT_S)

    def _stopped_as_collected(self) -> bool:
        # (its loop, running, closes `_stop_as_loop_ends` as the node is collected: that stops it)
        loop = self._engine.loop
        return self._loop_end is not None and isinstance(loop, asyncio.AbstractEventLoop) and loop.is_running()

    def _stop_at_exit(self, bound: float | None) -> None:
        """At the interpreter's exit, for a node that still runs then (`at_exit`): stop it on
        its event loop if that one still runs (on another thread) or can be run; say what
        it had not sent, when its loop was closed under it (``loop.close()`` without the
        shutdown that `_stop_as_loop_ends` stops it in). A stop handed to a loop another
        thread runs is waited for ``bound`` seconds at most (None: until it ends). Raises
        only ``TimeoutError`` (`concurrent.futures`'), when it did not end within ``bound``."""
        loop = self._engine.loop
        if not self.running or not isinstance(loop, asyncio.AbstractEventLoop):
            return
        queued = self._engine.counters()["gauges"]["queued"]
        if loop.is_closed():  # (nothing can stop it now: said once, here, not again as it is collected)
            self._mark_stopped()
            log.warning("node %s was never stopped, and its event loop has ended%s; stop it in the program "
                        "(`async with node:`, or `await node.stop()`)", self.name,
                        f": {queued} message(s) it had not sent yet are lost" if queued else "")
            return
        at_exit.say_stopping(self.name, queued, "`async with node:`, or `await node.stop()`")
        self._stop_on_at_exit(loop, bound)

    def _finish_stop_at_exit(self, bound: float | None) -> None:
        """At the interpreter's exit, wait for a stop begun in one of the node's handlers
        that has not ended yet (a task of its loop, which may have been set aside since,
        or run on another thread), after a warning, on that loop as `_stop_at_exit` does
        (and within ``bound`` as it does; raises what it raises)."""
        stopping, loop = self._stopping, self._engine.loop
        if stopping is None or stopping.done() or not isinstance(loop, asyncio.AbstractEventLoop) \
                or loop.is_closed():
            return
        at_exit.say_still_stopping(self.name)
        self._stop_on_at_exit(loop, bound)

    def _stop_on_at_exit(self, loop: asyncio.AbstractEventLoop, bound: float | None) -> None:
        """`stop` on ``loop`` (the node's, not closed), at the interpreter's exit, from this
        thread (`_stop_on_its_loop`; a hand-over waited for ``bound`` seconds at most).
        Raises only ``TimeoutError`` (`concurrent.futures`'), when that ran out."""
        try:
            _stop_on_its_loop(loop, self, at_exit.STOP_TIMEOUT_S, bound)
        except (TimeoutError, FutureTimeoutError):  # (the two differ before Python 3.11)
            raise
        except Exception as exc:
            log.warning("node %s: its stop at exit failed: %s", self.name, exc)

    async def stop(self, timeout: float = 5.0) -> None:
        """Drain queued sends, say goodbye, close everything. Idempotent and bounded; raises
        only `ConfigError`, for a ``timeout`` that is not a finite number >= 0.

        The stop runs to its end even if the call is cancelled (``asyncio.wait_for`` around
        it, say): its sockets, threads and readers are closed all the same. (A coroutine
        cancelled before its first step, as ``asyncio.wait_for(node.stop(), 0)`` does,
        never began the stop: the node still runs.) A second call waits for the first's
        stop to end. Awaited in one of this node's handlers (or a task one made), it
        returns once the stop began: the stop waits for that handler. Awaited on another
        event loop than the node's, it hands the stop to the node's loop (run for it on a
        thread of its own if it was set aside, neither running nor closed: meanwhile its own
        thread cannot run it, and what else waits on it runs there too), and waits for
        it there (at most ``timeout``, twice ``linger_s`` and a second
        more, the stop's own bound; past that it logs a warning and returns). A node still
        running at the interpreter's exit is stopped then, if its loop still runs or can
        be run, after a warning in the log."""
        timeout = check_timeout(timeout)
        at_exit.stopped(self)
        if self._forked():  # (after a fork the sockets, and the stop under way, are the parent's)
            self._mark_stopped()
            return
        owner = self._engine.loop
        if isinstance(owner, asyncio.AbstractEventLoop) and owner is not asyncio.get_running_loop() \
                and not owner.is_closed():
            await self._stop_on(owner, timeout)
            return
        inbox = self._engine.inbox
        if not self._stopped:
            self._mark_stopped()
            if not isinstance(inbox, LoopInbox):  # never started
                return
            self._stopping = asyncio.ensure_future(stop_async(self._engine, inbox, timeout))
        stopping = self._stopping
        if stopping is None or stopping.done():
            return
        if isinstance(inbox, LoopInbox) and inbox.runs_caller():
            # (the stop goes on in a task of the loop: a program that set the loop aside and
            # ended meanwhile cut it short, unsaid; the exit waits for it instead)
            at_exit.running(self, AsyncNode._finish_stop_at_exit, timeout + 2 * self.config.linger_s + 2.0)
            return
        await asyncio.shield(stopping)

    async def _stop_on(self, owner: asyncio.AbstractEventLoop, timeout: float) -> None:
        # (every step of a stop touches the owner loop's sockets, readers and tasks; a loop set
        # aside, neither running nor closed, is run for it on a thread of its own: awaited here,
        # the stop ran on this loop, and waited its whole timeout for the owner's tasks)
        bound = timeout + 2 * self._engine.config.linger_s + 1.0  # (draining, handlers, the context's end)
        handed = asyncio.ensure_future(asyncio.to_thread(_stop_on_its_loop, owner, self, timeout, bound))
        try:
            await asyncio.wait_for(asyncio.shield(handed), bound)
        except asyncio.TimeoutError:
            log.warning("node %s: its event loop did not finish the stop within %.1f s", self.name, bound)

    async def serve_forever(self) -> None:
        """Start the node (if it is not running) and serve until SIGINT or SIGTERM, or until
        the node is stopped, then stop it cleanly and return.

        Uses the running loop's signal handlers for the time it runs, its stop included (a
        second signal then only asks again); a signal ends every node serving on that
        loop. Once the last of them returns, or is cancelled, the handlers they replaced
        are back (asyncio.run's SIGINT handler, say; not one that the loop's
        ``add_signal_handler`` had put in place: that one is removed). A child forked
        meanwhile gets the previous ones back, and no longer hands its signals to this
        loop. A signal ignored when the first of them is called (inherited from a parent
        that ignored SIGTERM or SIGINT: a shell script's background job ignores SIGINT)
        stays ignored: only the other one, or a `stop`, ends them. Raises `ZmqMeshError`
        on a loop that another thread than the main one runs, or on one that cannot take
        them (``add_signal_handler`` unsupported), before it starts anything; and what
        `start` raises.
        """
        if threading.current_thread() is not threading.main_thread():
            raise ZmqMeshError("serve_forever() handles SIGINT and SIGTERM: run it on a loop of the main thread")
        loop = asyncio.get_running_loop()
        handlers = _SERVING_ON.get(loop)
        if handlers is None:  # (before the start: a loop that cannot take them leaves no node running)
            handlers = _SERVING_ON[loop] = _ServingHandlers(loop)
        signalled = asyncio.Event()
        handlers.woken.append(signalled)
        serving({sig: (signal.getsignal(sig), replaced) for sig, replaced in handlers.replaced.items()}, wakeup_fd=True)
        try:
            await self.start()
            while self.running and not signalled.is_set():
                try:
                    await asyncio.wait_for(signalled.wait(), _RUN_POLL_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            try:
                await self.stop()  # (the handlers stay meanwhile: a second signal only asks again)
            finally:
                served()
                handlers.woken.remove(signalled)
                if not handlers.woken:  # the last node serving on this loop
                    del _SERVING_ON[loop]
                    handlers.take_away()

    async def __aenter__(self) -> AsyncNode:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _check_loop(self) -> None:
        check_loop(self._engine)

    async def publish(self, topic: str, data: Any, *, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` on ``topic`` (see `Node.publish`)."""
        self._check_loop()
        pending = self._publish_now(topic, data, headers)
        if pending is not None:  # (the publish queue could not take it yet)
            await self._runner.run(self._publish_many_plan([pending]))

    async def push(self, queue: str, data: Any, timeout: float | None = None, *, durable: bool = False,
                   headers: dict[str, str] | None = None) -> None:
        """Send ``data`` to one puller of ``queue`` (see `Node.push`). A durable push commits
        on the loop's thread, in one transaction with the durable pushes other tasks made
        in the same pass of the loop (a group commit). A durable push cancelled while it
        waits for that commit may still be stored; any other push cancelled while it waits
        (for a puller, or for room) is not sent."""
        self._check_loop()
        if durable is not False and check_switch(durable, "durable"):  # (a NumPy False: not durable)
            await self._commit_durable(queue, (data,), headers)
            return
        body = self._push_now(queue, data, headers, timeout)
        if body is not None:  # (the queue could not take it yet)
            await self._runner.run(self._push_many_plan(queue, [body], timeout))

    async def push_many(self, queue: str, items: Iterable[Any], timeout: float | None = None, *,
                        durable: bool = False, headers: dict[str, str] | None = None) -> None:
        """`push` each of ``items``, in order, encoded first (see `Node.push_many`).
        Cancelled part-way, the items it queued before are sent, the others not."""
        self._check_loop()
        if durable is not False and check_switch(durable, "durable"):  # (a NumPy False: not durable)
            await self._commit_durable(queue, items, headers)
            return
        await self._runner.run(self._push_many_plan(queue, self._encode_many("push", queue, items, headers), timeout))

    async def publish_many(self, topic: str, items: Iterable[Any], *, headers: dict[str, str] | None = None) -> None:
        """`publish` each of ``items`` on ``topic``, in order, encoded first (see `Node.publish_many`)."""
        self._check_loop()
        await self._runner.run(self._publish_many_plan(self._encode_publications(topic, items, headers)))

    async def _commit_durable(self, queue: str, items: Iterable[Any], headers: dict[str, str] | None) -> None:
        ticket = self._durable_ticket(queue, items, headers)
        if ticket is not None:
            await self._runner.commits.commit(ticket)

    async def request(self, service: str, data: Any = None, timeout: float | None = None,
                      peer: str | Peer | None = None, *, headers: dict[str, str] | None = None) -> Any:
        """Call ``service`` on one provider and return its reply (see `Node.request`)."""
        calls, body, calling = self._encoded_call(service, data, timeout, peer, headers)  # (as `Node.request`)
        if calling is not None:
            return await self._runner.request(calling, body, calls.seconds)
        return await self._runner.run(self._plan_call(calls, body))

    async def request_many(self, service: str, items: Iterable[Any], timeout: float | None = None,
                           peer: str | Peer | None = None, *, window: int = 64,
                           headers: dict[str, str] | None = None) -> list[Any]:
        """Call ``service`` once per item of ``items``, up to ``window`` at a time, and
        return the replies in order (see `Node.request_many`: the same rules, the first
        failure in item order raised; `NodeClosedError` when the node is not running). The
        requests still in flight when it raises, or when it is cancelled, are forgotten."""
        check_window(window)
        self._check_loop()
        self._engine.ensure_running()
        return await self._runner.run_many(self._request_calls(service, items, timeout, peer, headers), window)

    async def node_stats(self, peer: str | Peer, timeout: float = 5.0) -> dict[str, Any]:
        """Ask a zmqmesh peer (or this node) for its counters, as `stats` returns them there.
        Raises as `Node.node_stats` does."""
        result: dict[str, Any] = await self._runner.run(self._node_stats_plan(peer, timeout))
        return result

    async def whisper(self, peer_id: str, *frames: bytes | str) -> None:
        """Send a ZRE WHISPER to one peer (see `Node.whisper`). Raises as `Node.whisper` does."""
        peer_id, raw = check_peer_id(peer_id), as_frames(frames)  # (the arguments first, as `Node`'s twin)
        self._check_loop()
        self._check_open()
        self._engine.whisper(peer_id, raw)

    async def shout(self, group: str, *frames: bytes | str) -> int:
        """Send a ZRE SHOUT to every peer in ``group``; returns how many got it. Raises as
        `Node.shout` does."""
        group, raw = check_group(group), as_frames(frames)  # (the arguments first, as `Node`'s twin checks them)
        self._check_loop()
        self._check_open()
        return self._engine.shout(group, raw)

    async def join(self, group: str) -> None:
        """Join a ZRE group. Raises as `Node.join` does."""
        group = check_group(group)  # (first, as `Node`'s twin checks it)
        self._check_loop()
        self._check_open()
        self._engine.join_group(group)

    async def leave(self, group: str) -> None:
        """Leave a ZRE group. Raises as `Node.leave` does."""
        group = check_group(group)  # (first, as `Node`'s twin checks it)
        self._check_loop()
        self._check_open()
        self._engine.leave_group(group)

    async def wait_for_peers(self, n: int, timeout: float = 10.0) -> list[Peer]:
        """Wait until at least ``n`` peers are present (see `Node.wait_for_peers`); returns
        them. Raises `MeshTimeoutError`."""
        peers: list[Peer] = await self._runner.run(self._peers_plan(n, timeout))
        return peers

    async def wait_for_subscribers(self, topic: str, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes' subscriptions matching ``topic`` are in place (see `Node`)."""
        await self._runner.run(self._subscribers_plan(topic, n, timeout))

    async def wait_for_service(self, name: str, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes offer service ``name``. Raises `MeshTimeoutError`."""
        await self._runner.run(self._offer_plan("services", name, n, timeout))

    async def wait_for_pullers(self, queue: str, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes pull ``queue``. Raises `MeshTimeoutError`."""
        await self._runner.run(self._offer_plan("queues", queue, n, timeout))

    async def wait_for_keepers(self, queue: str, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` nodes keep ``queue`` (see `keep`). Raises `MeshTimeoutError`."""
        await self._runner.run(self._offer_plan("keepers", queue, n, timeout))


def _stop_on_its_loop(owner: asyncio.AbstractEventLoop, node: AsyncNode, timeout: float, bound: float | None) -> None:
    """Run ``node``'s stop on its loop ``owner`` from this thread (not the loop's): handed to
    it if another thread runs it, else run here until the stop ends (the loop is idle
    again after; if its own thread runs it meanwhile, handed to that one; if it was closed
    meanwhile, nothing is left to stop it on). The stops run here on one loop take turns:
    run together, the first to end stopped the loop under the others, which then waited
    their whole bound unfinished. Raises what waiting ``bound`` for a hand-over raises
    (None: no bound)."""
    with _LOOP_LOCKS_LOCK:
        turn = _LOOP_LOCKS.setdefault(owner, threading.Lock())
    with turn:
        if not owner.is_running():
            stopping = node.stop(timeout)
            try:
                owner.run_until_complete(stopping)
                return
            except RuntimeError:  # (running now, on its own thread; or closed)
                stopping.close()
    if owner.is_running():
        asyncio.run_coroutine_threadsafe(node.stop(timeout), owner).result(bound)
