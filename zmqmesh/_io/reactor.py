"""A small event loop for the sync `Node`'s I/O thread: descriptors, timers and callbacks.

The engine (and everything it drives) is written against the callback half of the
asyncio event loop API, `EventLoop` below (``add_reader``, ``remove_reader``,
``call_soon``, ``call_soon_threadsafe``, ``call_later``, ``call_at``, ``time``).
`AsyncNode` hands the engine the caller's asyncio loop; the sync `Node` hands the very
same engine this `Reactor`, so a process that only uses `Node` never imports asyncio (and
with it ``ssl``), which keeps a node's memory near that of a bare pyzmq program.

Like asyncio's selector loop it is level-triggered on the descriptors it watches; the
ZeroMQ descriptors are edge-triggered, which the engine allows for the same way on both.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any, Protocol

from ..errors import MeshTimeoutError

__all__ = ["EventLoop", "Reactor", "Timer", "TimerLike", "run_on"]

log = logging.getLogger("zmqmesh.reactor")

_MAX_SLEEP_S = 3600.0
_CLOSED_LOOK_S = 0.1  # how often `run_on` looks whether the loop it waits for was closed


class TimerLike(Protocol):
    """A scheduled callback: a `Timer`, or an asyncio ``TimerHandle``."""

    def cancel(self) -> None: ...
    def cancelled(self) -> bool: ...
    def when(self) -> float: ...


class EventLoop(Protocol):
    """The part of an event loop the engine uses: a `Reactor`, or an asyncio loop."""

    def time(self) -> float: ...
    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...
    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any: ...
    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Any: ...
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerLike: ...
    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerLike: ...


class Timer:
    """A callback scheduled for a moment on the `Reactor`'s clock; `cancel` to drop it."""

    __slots__ = ("_when", "_callback", "_args", "_cancelled", "_reactor")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...], reactor: Reactor) -> None:
        self._when = when
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._reactor: Reactor | None = reactor  # None once it left the reactor's heap

    def cancel(self) -> None:
        """Do not run the callback (harmless once it ran)."""
        if not self._cancelled:
            self._cancelled = True
            if self._reactor is not None:
                self._reactor._cancelled_timers += 1

    def cancelled(self) -> bool:
        """True once `cancel` was called."""
        return self._cancelled

    def when(self) -> float:
        """The moment the callback is due, on the reactor's clock (``time.monotonic``)."""
        return self._when


class Reactor:
    """One thread's event loop: run it with `run_forever`, end it with `stop` (any thread).

    Every method but `call_soon_threadsafe` and `stop` belongs to the thread running the loop.
    A callback that raises is logged and the loop goes on.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_timers = 0  # cancelled but still in the heap
        self._order = itertools.count()
        self._stopping = False
        self._closed = False
        # True from just before the loop looks at its ready callbacks until its poll
        # returns: only then may it sleep, so only then does another thread's callback
        # need a wake-up byte (a write that also hands the GIL to the loop thread)
        self._may_sleep = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    @staticmethod
    def time() -> float:
        """The loop's clock: ``time.monotonic()``."""
        return time.monotonic()

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is readable (replaces an earlier reader)."""
        # unregister first rather than modify: the number may belong to a descriptor that was
        # closed and reused since, which the kernel's poll set no longer holds
        self.remove_reader(fd)
        self._selector.register(fd, selectors.EVENT_READ, (callback, args))

    def remove_reader(self, fd: int) -> bool:
        """Stop watching ``fd``; False if it was not watched."""
        if self._closed:
            return False
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            return False
        return True

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the next turn of the loop (loop thread only)."""
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """`call_soon` from any thread; wakes the loop. Raises `RuntimeError` once closed."""
        if self._closed:
            raise RuntimeError("the reactor is closed")
        self._ready.append((callback, args))
        if not self._may_sleep:
            return  # the loop is busy (or not running yet): it sees this one before it polls
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full: the loop is awake anyway
        except OSError:
            pass  # closed under us: the loop is gone

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` in ``delay`` seconds (loop thread only)."""
        return self.call_at(time.monotonic() + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` at ``when`` on the loop's clock (loop thread only)."""
        timer = Timer(when, callback, args, self)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def stop(self) -> None:
        """End `run_forever` after the current turn (any thread)."""
        self._stopping = True
        try:
            self.call_soon_threadsafe(lambda: None)
        except RuntimeError:
            pass

    def run_forever(self) -> None:
        """Run callbacks, timers and readers until `stop` (also one called before this)."""
        try:
            while not self._stopping:
                self._run_once()
        finally:
            self._stopping = False

    def is_closed(self) -> bool:
        """True once `close` was called (as an asyncio loop's)."""
        return self._closed

    def close(self) -> None:
        """Release the selector and the wake-up pair (after `run_forever` returned). The
        callbacks still queued never run (`run_on` raises for its own at once)."""
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        self._timers.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run_once(self) -> None:
        timers = self._timers
        self._may_sleep = True  # (before looking at _ready: see call_soon_threadsafe)
        if self._ready:
            timeout: float | None = 0.0
        elif timers:
            timeout = min(max(timers[0][0] - time.monotonic(), 0.0), _MAX_SLEEP_S)
        else:
            timeout = None
        ready = self._ready
        events = self._selector.select(timeout)
        self._may_sleep = False
        for key, _events in events:
            if key.data is None:
                self._drain_wake()
            else:
                ready.append((self._fire_reader, (key.fd, key.data)))
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            timer._reactor = None
            if timer._cancelled:
                self._cancelled_timers -= 1
            else:
                ready.append((self._fire_timer, (timer,)))
        if self._cancelled_timers > 64 and self._cancelled_timers > len(timers) // 2:
            for entry in timers:
                if entry[2]._cancelled:
                    entry[2]._reactor = None
            self._timers = timers = [t for t in timers if not t[2]._cancelled]
            heapq.heapify(timers)
            self._cancelled_timers = 0
        for _ in range(len(ready)):  # what is added meanwhile waits for the next turn
            callback, args = ready.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("reactor callback %r failed", callback)

    def _fire_reader(self, fd: int, data: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        # a callback earlier in this turn may have removed or replaced the reader
        key = self._selector.get_map().get(fd)
        if key is not None and key.data is data:
            data[0](*data[1])

    @staticmethod
    def _fire_timer(timer: Timer) -> None:
        if not timer._cancelled:  # cancelled by a callback earlier in this turn
            timer._callback(*timer._args)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass


def run_on(loop: Any, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Call ``fn(*args)`` on ``loop``'s thread from another thread and return its result.

    Works with a `Reactor` or an asyncio loop. Raises what ``fn`` raised, or
    `MeshTimeoutError` if the loop does not get to it within ``timeout`` seconds.
    """
    future: futures.Future[Any] = futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError as exc:
        raise MeshTimeoutError("the node's I/O loop is gone") from exc
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # in slices: a loop closed with ``run`` still queued drops it, and says so only here
        wait = _CLOSED_LOOK_S if deadline is None else min(_CLOSED_LOOK_S, max(deadline - time.monotonic(), 0.0))
        try:
            return future.result(wait)
        except futures.TimeoutError as exc:  # the builtin TimeoutError from 3.11 on
            if loop.is_closed() and future.cancel():
                raise MeshTimeoutError("the node's I/O loop is gone") from exc
            if deadline is not None and time.monotonic() >= deadline:
                future.cancel()
                raise MeshTimeoutError("the node did not answer in time") from exc
