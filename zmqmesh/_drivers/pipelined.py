"""Many requests in flight from one thread, without a thread each: `Node.request_many` and
`Node.submit`.

`Pipelined` carries out many request plans at once over the DEALERs of one thread: it
sends each plan's exchange, and resumes the plan whose reply arrives (the table of what
waits for what is `_patterns.outstanding`'s, shared with `AsyncNode`'s requester). A plan
that must wait for something else (a provider to appear) is handed to ``wait_step``,
which blocks for it where blocking is allowed.

* `request_many` pumps a `Pipelined` of the calling thread until its requests are
  answered, keeping at most ``window`` in flight.
* `Submitter` is a thread of the node that pumps one for `submit`'s futures; a plan that
  must wait goes to a small pool of threads, so that it never holds up the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq

from .._engine.api import Plan, advance
from .._engine.engine import Engine
from .._io.sockets import recv_frames, send_frames
from .._io.waker import Waker
from .._mesh.directory import Provider
from .._patterns.outstanding import Outstanding
from .._patterns.reqrep import Exchange
from .._wire import frames as wire
from ..errors import MeshTimeoutError, NodeClosedError, PeerLostError

__all__ = ["Job", "Pipelined", "Submitter", "MAX_SUBMITTED", "run_many"]

log = logging.getLogger("zmqmesh.node")

MAX_SUBMITTED = 4096
"""Requests that `Node.submit` keeps in flight at most; a call past it waits for room
(within its timeout): back-pressure instead of a queue that grows with the caller."""

_READ_BURST = 1024
_IDLE_POLL_MS = 100
_WAIT_THREADS = 4


class Job:
    """One request plan in flight, and what to call with its outcome."""

    __slots__ = ("plan", "finish")

    def __init__(self, plan: Plan, finish: Callable[[Any, BaseException | None], None]) -> None:
        self.plan = plan
        self.finish = finish


class Pipelined:
    """Request plans in flight over the DEALERs of one thread (the only thread using it).

    ``wait_step(job, step)`` gets the plans that yield anything but an exchange; it
    resumes them with `resume` (from this thread) or finishes them itself.
    """

    def __init__(self, engine: Engine, wait_step: Callable[[Job, Any], None]) -> None:
        self.engine = engine
        self.outstanding: Outstanding[Job] = Outstanding()
        self.poller = zmq.Poller()
        self._wait_step = wait_step
        self._sockets: dict[str, zmq.Socket[Any]] = {}
        self._providers: dict[zmq.Socket[Any], str] = {}
        self._epoch = -1

    def __len__(self) -> int:
        return len(self.outstanding)

    def start(self, job: Job) -> None:
        """Begin ``job``: run its plan up to its first wait."""
        self.resume(job, None, None)

    def resume(self, job: Job, value: Any, error: BaseException | None) -> None:
        """Go on with ``job``'s plan, given the outcome of its last step."""
        while True:
            try:
                finished, step = advance(job.plan, value, error)
            except Exception as exc:
                job.finish(None, exc)
                return
            if finished:
                job.finish(step, None)
                return
            if not isinstance(step, Exchange):
                self._wait_step(job, step)
                return
            try:
                self._send(job, step)
                return
            except Exception as exc:  # the plan decides what a failed send means
                value, error = None, exc

    def _send(self, job: Job, step: Exchange) -> None:
        sock = self._socket(step.provider)
        request_id = self.outstanding.add(job, step.provider.id, step.service, step.deadline)
        try:
            send_frames(sock, step.frames(request_id),
                        copy=len(step.body) < 65536)
        except zmq.Again:
            self.outstanding.withdraw(request_id)
            raise MeshTimeoutError(
                f"provider {step.provider.id[:8]} of {step.service!r} is not accepting requests") from None
        self.engine.stats.add("request", "sent")

    def _socket(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self._sockets.get(provider.id)
        if sock is None:
            sock = self._sockets[provider.id] = self.engine.dealer_to(provider)
            self._providers[sock] = provider.id
            self.poller.register(sock, zmq.POLLIN)
        return sock

    def pump(self, timeout_s: float) -> list[tuple[Any, int]]:
        """Wait up to ``timeout_s`` (less if a request falls due sooner) for replies, and
        resume the plans they answer; fail the overdue requests and those of providers
        that left. Returns what the poller found ready (other sockets registered on
        `poller` by the caller included)."""
        deadline = self.outstanding.next_deadline()
        if deadline is not None:
            timeout_s = min(timeout_s, max(deadline - time.monotonic(), 0.0))
        ready = self.poller.poll(int(timeout_s * 1000) + (1 if timeout_s > 0 else 0))
        for sock, _event in ready:
            provider_id = self._providers.get(sock)
            if provider_id is not None:
                self._read(sock)
        self._expire()
        self._prune()
        return ready

    def _read(self, sock: zmq.Socket[Any]) -> None:
        stats = self.engine.stats
        received = dropped = 0
        for _ in range(_READ_BURST):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            answered = self.outstanding.answer(frames)
            if answered is None:
                dropped += 1  # a late reply (its request timed out), or one nobody asked for
                continue
            received += 1
            self.resume(answered[0], (answered[1], answered[2]), None)
        stats.add("request", "received", received)
        if dropped:
            stats.add("request", "dropped", dropped)

    def _expire(self) -> None:
        overdue = self.outstanding.expired(time.monotonic())
        if overdue:
            self.engine.stats.add("request", "errors", len(overdue))
        for job, service in overdue:
            self.resume(job, None, MeshTimeoutError(f"request to {service!r} timed out"))

    def _prune(self) -> None:
        """Fail the requests of providers that left, and close their sockets (looked at
        only when membership changed)."""
        directory = self.engine.directory
        if directory.epoch == self._epoch:
            return
        self._epoch = directory.epoch
        alive = directory.alive_ids
        for provider_id in [p for p in self._sockets if p not in alive]:
            sock = self._sockets.pop(provider_id)
            self.poller.unregister(sock)
            del self._providers[sock]
            sock.close(0)
            lost = self.outstanding.lost(provider_id)
            if lost:
                self.engine.stats.add("request", "errors", len(lost))
            for job, service in lost:
                self.resume(job, None, PeerLostError(
                    f"provider {provider_id[:8]} of {service!r} left before replying", provider_id))

    def abandon(self) -> list[Job]:
        """Forget every request in flight (their replies will be dropped); their jobs."""
        return self.outstanding.take_all()

    def close(self) -> None:
        """Close every socket (requests still in flight are forgotten)."""
        self.outstanding.take_all()
        for sock in self._sockets.values():
            self.poller.unregister(sock)
            sock.close(0)
        self._sockets.clear()
        self._providers.clear()


class Submitter:
    """The thread behind `Node.submit`: it pumps a `Pipelined` of its own, taking the plans
    that any thread submits. Started on the first `submit`, stopped with the node."""

    def __init__(self, engine: Engine, carry_out: Callable[[Plan, Any], Any]) -> None:
        self.engine = engine
        self._carry_out = carry_out
        self._incoming: deque[Job] = deque()
        self._room = threading.BoundedSemaphore(MAX_SUBMITTED)
        self._idle = False
        self._closing = False
        self._waker = Waker(engine.ctx, wire.inproc_endpoint(engine.node_id, "submit"))
        self._pipelined = Pipelined(engine, self._wait_elsewhere)
        self._pipelined.poller.register(self._waker.socket, zmq.POLLIN)
        self._waiting = ThreadPoolExecutor(_WAIT_THREADS, thread_name_prefix=f"zmqmesh-submit-wait-{engine.name}")
        self.thread = threading.Thread(target=self._run, name=f"zmqmesh-submit-{engine.name}", daemon=True)
        self.thread.start()

    def submit(self, plan: Plan, deadline: float) -> Future[Any]:
        """The future of ``plan``'s outcome; waits for room (back-pressure) until
        ``deadline``. Raises `MeshTimeoutError` if none frees up, `NodeClosedError`."""
        if not self._room.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            plan.close()
            raise MeshTimeoutError(f"{MAX_SUBMITTED} submitted requests are still in flight: none finished in time")
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()  # (a request once sent cannot be taken back)
        room = self._room

        def finish(value: Any, error: BaseException | None) -> None:
            room.release()
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

        self._incoming.append(Job(plan, finish))
        if self._closing or not self.thread.is_alive():
            self._fail_incoming()  # the thread may have ended before it could see this one
        elif self._idle:
            self._waker.wake()
        return future

    def _fail_incoming(self) -> None:
        closed = NodeClosedError("the node stopped while a request was outstanding")
        while True:
            try:
                job = self._incoming.popleft()
            except IndexError:
                return
            job.plan.close()
            job.finish(None, closed)

    def _wait_elsewhere(self, job: Job, step: Any) -> None:
        """A plan waits for something else than a reply: carry it out on a pool thread."""

        def carry_out() -> None:
            try:
                value = self._carry_out(job.plan, step)
            except Exception as exc:
                job.finish(None, exc)
            else:
                job.finish(value, None)

        try:
            self._waiting.submit(carry_out)
        except RuntimeError:  # the pool was shut down: the node stops
            job.plan.close()
            job.finish(None, NodeClosedError("the node stopped while a request was outstanding"))

    def begin_close(self) -> None:
        """Make the thread fail what is in flight with `NodeClosedError` and end (any thread)."""
        self._closing = True
        self._waker.wake()

    def close(self) -> None:
        """`begin_close`, and wait for the thread to end (it closes its sockets)."""
        self.begin_close()
        if threading.current_thread() is not self.thread:
            self.thread.join(5.0)
        self._waiting.shutdown(wait=False)  # (what waits there finds the node closed)

    def _run(self) -> None:
        pipelined, incoming, engine = self._pipelined, self._incoming, self.engine
        try:
            while not self._closing and not engine.closed:
                while incoming:
                    pipelined.start(incoming.popleft())
                self._idle = True
                if incoming or self._closing:
                    self._idle = False
                    continue
                ready = pipelined.pump(_IDLE_POLL_MS / 1000)
                self._idle = False
                if any(sock is self._waker.socket for sock, _event in ready):
                    self._waker.clear()
        except Exception:
            log.exception("the submit thread failed")
        finally:
            self._closing = True
            closed = NodeClosedError("the node stopped while a request was outstanding")
            for job in pipelined.abandon():
                job.plan.close()
                job.finish(None, closed)
            self._fail_incoming()
            pipelined.close()
            self._waker.close()


def run_many(pipelined: Pipelined, plans: Iterable[Plan], window: int) -> list[Any]:
    """Carry out ``plans`` (made one by one as there is room) with at most ``window`` in
    flight; their results in order. Raises the error of the first plan (in order) that
    failed, once no more can go; the requests still in flight then are forgotten."""
    results: list[Any] = []
    failures: list[tuple[int, BaseException]] = []
    unfinished = 0

    def finisher(index: int) -> Callable[[Any, BaseException | None], None]:
        def finish(value: Any, error: BaseException | None) -> None:
            nonlocal unfinished
            unfinished -= 1
            if error is not None:
                failures.append((index, error))
            else:
                results[index] = value
        return finish

    try:
        for index, plan in enumerate(plans):
            results.append(None)
            unfinished += 1
            pipelined.start(Job(plan, finisher(index)))
            while unfinished >= window and not failures:
                pipelined.pump(_IDLE_POLL_MS / 1000)
            if failures:
                break
        while unfinished and not failures:
            pipelined.pump(_IDLE_POLL_MS / 1000)
    finally:
        for job in pipelined.abandon():
            job.plan.close()
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return results
