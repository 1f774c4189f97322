"""Requests from coroutines: DEALERs owned by the event loop, a future per request
(`LoopRequester`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from ..._engine.engine import Engine
from ..._io.sockets import close_watched, has_input, input_probe, recv_frames
from ..._mesh.directory import Provider
from ..._patterns.outstanding import Outstanding
from ..._patterns.reqrep import Calling, Exchange
from ..._patterns.request_batches import RequestBatches
from ..._stats import RequestTally
from ...errors import MeshTimeoutError, NodeClosedError, PeerLostError
from ..failures import take_back_sent
from ..pipelined import WaitingForRoom, send_batches, send_request, withdraw_gathered
from .wakes import Wakes

__all__ = ["LoopRequester", "ReplyWaiter"]


_READ_BURST = range(1024)  # (frames read at most per look at a socket: a range made once, not per read)
_SWEEP_SHARE = 16  # abandoned requests are swept at once when they are this share of those in flight
_SWEEP_S = 0.05  # ... and otherwise within this long
_PARKED_CHECK_S = 0.005  # while frames wait for room in a socket: how often it is tried again


class ReplyWaiter(Protocol):
    """What waits for a reply in the requester's table: an asyncio future, or a slot of
    a `request_many` window (`runner.WindowSlot`)."""

    def done(self) -> bool: ...

    def set_result(self, reply: tuple[bytes, bytes]) -> None: ...

    def set_exception(self, error: BaseException) -> None: ...


def _done(waiter: ReplyWaiter) -> bool:
    """Whether ``waiter``'s outcome is known (or its caller gave up). (A function, not an
    ``operator.methodcaller``, which looks the method up and calls it through a generic
    call each time: asked of every request of a batch as it goes, `Batch.keep`.)"""
    return waiter.done()


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
        self._has_input: dict[str, Callable[[], list[Any]]] = {}
        """By provider id: `has_input` for its socket in `sockets` (`input_probe`: looked at
        after each request sent alone, and after each lone reply read)."""
        self._known: dict[str, Provider] = {}  # (to connect again: `_renew`)
        self.outstanding: Outstanding[Any] = Outstanding()  # (`ReplyWaiter`s)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._unchecked: set[str] = set()
        self._sweep_soon = False
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._abandoned = 0  # requests abandoned since the last sweep (`abandon`)
        self._batches: RequestBatches[str, Any] = RequestBatches()
        self.waiting_for_room = WaitingForRoom()
        """What each provider's socket refused: tried again every `_PARKED_CHECK_S` and as
        the socket signals (`take`)."""
        self._parked_timer: asyncio.TimerHandle | None = None
        self.tally = RequestTally()
        """What the loop's coroutines' requests count: added to the stats every
        `TALLY_FOLD_AT` requests sent (`Stats.count_sent`), and meanwhile counted by
        the stats' snapshots."""
        engine.stats.track(self.tally)
        self.wakes = Wakes(engine.loop, self._check_sent)
        """Wakes the tasks whose gathered requests' replies came, those of a pass together;
        the requests they make meanwhile are gathered (`waking`), and go once they all ran
        (`_check_sent`)."""

    def exchange(self, step: Exchange) -> asyncio.Future[tuple[bytes, bytes]]:
        """Send one request (or gather it, to go at the end of this pass of the loop, or
        with a batch that fills up: `RequestBatches`); the future of its reply ``(status,
        body)``. The future fails with `MeshTimeoutError` (also when the provider takes no
        more requests, for one that was gathered), `PeerLostError` or `NodeClosedError`; a
        send made at once raises `MeshTimeoutError` when the provider takes no more requests."""
        future: asyncio.Future[tuple[bytes, bytes]] = self.engine.loop.create_future()
        provider = step.provider  # (a named tuple's fields, read once each: a generic lookup per read)
        provider_id = provider.id
        sock = self.sockets.get(provider_id)  # (a look, not a call: on the path of every request)
        try:
            if sock is None:
                sock = self._socket(provider)
            sent = send_request(self.outstanding, future, sock, step, self.engine, self._batches, self._renew, self)
        except Exception:  # a send that failed may have taken the signal of a reply with it, too
            take_back_sent(self.tally, step.service)
            with contextlib.suppress(zmq.ZMQError):  # (a stop under way: what failed is said as it is)
                if sock is not None and not sock.closed and has_input(sock):
                    self.engine.loop.call_soon(self._on_readable, provider_id)
            raise
        deadline = step.deadline
        if deadline < self._timer_at:
            self._arm(deadline)
        if sent:  # sent alone: whether that swallowed the signal of a reply, looked at now
            self.engine.stats.count_sent(self.tally, 1)
            probe = self._has_input.get(provider_id)  # (its socket's now: renewed, if its connection was dropped)
            if probe is not None and probe():
                self._on_readable(provider_id)
            return future
        self._gathered(provider_id, self._batches.ready)
        return future

    def gather(self, provider: Provider, calling: Calling, body: bytes, deadline: float,
               waiter: ReplyWaiter | None = None) -> Any:
        """Gather a call of ``calling`` with ``body`` that goes the quick way to ``provider``
        (`Calling.choose`: one a batch can carry), waiting until ``deadline``, into its
        batch, whether or not the provider is busy, as one of many at hand; ``waiter`` is
        told its outcome as a future would be (None: a future made here). It goes with the
        batches of this pass of the loop, or at once with a batch that fills up. Returns
        the waiter (a future made here is a `ReplyFuture`, woken with the others of its
        pass: `wakes`); raises what making a socket to the provider raises."""
        if waiter is None:
            waiter = self.wakes.future()
        provider_id = provider.id
        if provider_id not in self.sockets:  # (a look, not a call: on the path of every request)
            try:
                self._socket(provider)
            except Exception:  # (it will not go)
                take_back_sent(self.tally, calling.service)
                raise
        request_id = self.outstanding.add(waiter, provider_id, calling.service, deadline)
        full = self._batches.gather(provider_id, request_id, waiter, calling.service_b, body)
        if deadline < self._timer_at:
            self._arm(deadline)
        if full or provider_id not in self._unchecked:  # (`_gathered` has nothing to do for the rest)
            self._gathered(provider_id, full)
        return waiter

    def _gathered(self, provider_id: str, full: bool) -> None:
        """A request to ``provider_id`` was gathered; ``full``: a batch is full (`RequestBatches.ready`)."""
        if full:  # a full batch goes now (its waiters fail if it cannot)
            self._send_batches(full_only=True)
        unchecked = self._unchecked
        if provider_id not in unchecked:  # (the first request to it this pass: the rest add nothing)
            if not unchecked and not self.wakes.waking:  # (a wake-up pass checks them once its tasks ran)
                self.engine.loop.call_soon(self._check_sent)
            unchecked.add(provider_id)

    def abandon(self, future: Any) -> None:
        """Forget the request of ``future`` (cancelled with its caller; None: the slots of a
        window), soon, in one sweep of the requests in flight: at the end of this pass of
        the loop once the requests abandoned since the last sweep are a
        `_SWEEP_SHARE`-th of those in flight or more (cancelling a gather of n requests
        must not cost n sweeps), or with a window's; otherwise within `_SWEEP_S` (a sweep
        for each of the cancellations that come one by one would cost a look at every
        request in flight each). Until then a reply to one finds its future done. Each one
        sent counts as abandoned once it leaves the table (`_forget_abandoned`, or wherever
        its reply, deadline, provider's departure or the stop takes it first). A future
        already answered is in flight no more: if its reply came in the pass its caller was
        cancelled, that reply reached no one, and counts as dropped, not received (its
        request as abandoned)."""
        if future is not None and future.done() and not future.cancelled():
            if future.exception() is None:
                counters = self.engine.stats.pattern["request"]
                counters["received"] -= 1
                counters["dropped"] += 1
                counters["abandoned"] += 1
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
        withdraw_gathered(self._batches, self.outstanding, self.tally, _done)  # (not sent: nor counted)
        forgotten = self.outstanding.forget_where(_done)
        self.engine.stats.pattern["request"]["abandoned"] += forgotten
        if forgotten:
            self._requests_ended()

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self.engine.loop
        self._timer_at = deadline
        self._timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0), self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._end(self.outstanding.expired(time.monotonic()),
                  lambda service: MeshTimeoutError(f"request to {service!r} timed out"))
        self._requests_ended()
        deadline = self.outstanding.next_deadline()
        if deadline is not None:
            self._arm(deadline)

    def _end(self, ended: list[tuple[Any, str]], error: Callable[[str], BaseException]) -> None:
        """Fail the requests that ``ended`` (taken out of the table: ``(waiter, service)``
        each) with ``error(service)``, if still waited for. Those sent count as errors, or
        as abandoned once their callers gave up (not swept yet: `abandon`); those still
        gathered never go, and count as nothing."""
        unsent = self._batches.waiters() if ended and self._batches else ()
        errors = abandoned = 0
        for future, service in ended:
            if not future.done():
                errors += future not in unsent
                future.set_exception(error(service))
            else:
                abandoned += future not in unsent
        counters = self.engine.stats.pattern["request"]
        counters["errors"] += errors
        counters["abandoned"] += abandoned

    def _socket(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self.sockets.get(provider.id)
        if sock is None:
            sock = self.sockets[provider.id] = self.engine.dealer_to(provider)
            self._has_input[provider.id] = input_probe(sock)
            self._known[provider.id] = provider
            self.engine.loop.add_reader(sock.FD, self._on_readable, provider.id)
            self.engine.loop.call_soon(self._on_readable, provider.id)
        return sock

    def _renew(self, provider_id: str) -> zmq.Socket[Any]:
        """A new socket to ``provider_id`` in place of one whose connection was dropped."""
        close_watched(self.engine.loop, self.sockets.pop(provider_id))
        return self._socket(self._known[provider_id])

    def _check_sent(self) -> None:
        """At the end of a pass of the loop that gathered requests, or of a wake-up pass that
        woke several tasks (`Wakes.after`): send the batches
        (`RequestBatches`), then read the sockets sent on that hold replies: sending may
        have swallowed the descriptor's signal (once per pass, not per request; a request
        sent alone is looked after by `exchange`, at once). The requests gathered while it
        reads (a window refilled as its replies come: `Window`) schedule the next one."""
        unchecked, self._unchecked = self._unchecked, set()
        self._send_batches()
        for provider_id in unchecked:
            sock = self.sockets.get(provider_id)
            if sock is not None and has_input(sock):
                self._on_readable(provider_id)

    def _send_batches(self, full_only: bool = False) -> None:
        send_batches(self._batches, self.sockets, self.outstanding, self.engine, _fail_future,
                     _done, full_only=full_only, renew=self._renew, tally=self.tally, full=self)  # (counted there)

    def take(self, sock: zmq.Socket[Any], provider_id: str, frames: list[bytes], request_ids: list[bytes],
             copy: bool) -> None:
        """Keep ``frames`` to send once ``provider_id``'s socket has room, behind those kept
        before them (tried again every `_PARKED_CHECK_S` and when the socket signals): the
        back-pressure of a provider that reads requests more slowly than the loop sends
        them; its requests wait as if sent, and time out as they would. A `FullSocket`'s."""
        self.waiting_for_room.keep(provider_id, frames, request_ids, copy)
        if self._parked_timer is None:
            self._parked_timer = self.engine.loop.call_later(_PARKED_CHECK_S, self._send_all_parked)

    def _requests_ended(self) -> None:
        """Requests stopped waiting (timed out, forgotten): those sent on a socket whose
        frames wait for room may all have ended (`_send_parked`, ``replace``)."""
        for provider_id in list(self.waiting_for_room):
            self._send_parked(provider_id, replace=True)

    def _send_all_parked(self) -> None:
        self._parked_timer = None
        for provider_id in list(self.waiting_for_room):
            self._send_parked(provider_id)
            sock = self.sockets.get(provider_id)
            with contextlib.suppress(zmq.ZMQError):  # (what went may have swallowed the signal of a reply)
                if sock is not None and has_input(sock):
                    self._on_readable(provider_id)
        if self.waiting_for_room:
            self._parked_timer = self.engine.loop.call_later(_PARKED_CHECK_S, self._send_all_parked)

    def _send_parked(self, provider_id: str, replace: bool = False) -> None:
        """Send the frames kept for ``provider_id`` (`take`) as far as its socket takes them;
        ``replace``: as requests ended, a socket that refuses them while none sent on it
        waits any more is replaced (`WaitingForRoom.send_or_replace`)."""
        sock = self.sockets.get(provider_id)
        if sock is None:
            self.waiting_for_room.pop(provider_id, None)
            return
        try:
            if replace:
                self.waiting_for_room.send_or_replace(provider_id, sock, self.outstanding, self.engine, self._renew)
            else:
                self.waiting_for_room.send(provider_id, sock, self.outstanding.ids)
        except zmq.ZMQError:  # (closed under a stop: what waits fails with it)
            self.waiting_for_room.pop(provider_id, None)

    def _on_readable(self, provider_id: str) -> None:
        if provider_id in self.waiting_for_room:
            self._send_parked(provider_id)
        sock = self.sockets.get(provider_id)
        if sock is not None and self._read(sock, provider_id, _READ_BURST):
            self.engine.loop.call_soon(self._on_readable, provider_id)

    def _read(self, sock: zmq.Socket[Any], provider_id: str, burst: range) -> bool:
        # True if it read the whole burst (more may wait); ``sock``: ``provider_id``'s in `sockets`
        counters = self.engine.stats.pattern["request"]
        outstanding = self.outstanding
        answer_all = outstanding.answer_all
        for i in burst:
            # a lone reply (nothing else waited for): a check, not a raised Again; with requests
            # in flight, replies tend to queue, and a check would be spent on most frames
            if i == 1 and not outstanding and not self._has_input[provider_id]():
                return False
            try:
                frames = recv_frames(sock)
            except zmq.ZMQError:
                return False
            answered, unanswered = answer_all(frames, provider_id)
            given_up = 0
            for future, status, body in answered:
                if future.done():  # its caller gave up (not swept yet: `abandon`)
                    given_up += 1
                else:
                    future.set_result((status, body))
            # (counted once a frame: a batch answers many requests)
            counters["received"] += len(answered) - given_up
            if unanswered or given_up:
                counters["dropped"] += unanswered + given_up  # late replies, or ones nobody asked for
                counters["abandoned"] += given_up
        return True

    def peer_gone(self, peer_id: str) -> None:
        """Take the replies a departed provider sent before it left (a stopping node answers,
        then says goodbye), fail the requests still waiting on it at once, and close its
        socket."""
        sock = self.sockets.get(peer_id)
        if sock is not None:  # (a frame answers one request or more: bounded by those waiting)
            self._read(sock, peer_id, range(len(self.outstanding) + 1))
        self._end(self.outstanding.lost(peer_id),  # (counted as the threads' requesters count theirs)
                  lambda _service: PeerLostError(f"provider {peer_id[:8]} left before replying", peer_id))
        sock = self.sockets.pop(peer_id, None)
        self._has_input.pop(peer_id, None)
        self._known.pop(peer_id, None)
        self.waiting_for_room.pop(peer_id, None)
        if sock is not None:
            close_watched(self.engine.loop, sock)

    def fail_outstanding(self) -> None:
        """Fail every waiting request with `NodeClosedError` and close every socket. Those
        sent count as errors (or, their callers gone, as abandoned); those gathered and not
        sent yet never go, and count as nothing."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if self._parked_timer is not None:
            self._parked_timer.cancel()
            self._parked_timer = None
        self.waiting_for_room.clear()
        closed = "the node stopped while a request was outstanding"
        for future in withdraw_gathered(self._batches, self.outstanding, self.tally):
            _fail_future(future, NodeClosedError(closed))
        errors = abandoned = 0
        for future in self.outstanding.take_all():
            if not future.done():
                errors += 1
                future.set_exception(NodeClosedError(closed))
            else:
                abandoned += 1  # (not swept yet: `abandon`)
        counters = self.engine.stats.pattern["request"]
        counters["errors"] += errors
        counters["abandoned"] += abandoned
        self._has_input.clear()
        for pid in list(self.sockets):
            close_watched(self.engine.loop, self.sockets.pop(pid))

    def close(self) -> None:
        """Add up what the tally still holds (`fail_outstanding` closed the sockets)."""
        self.engine.stats.untrack(self.tally)
