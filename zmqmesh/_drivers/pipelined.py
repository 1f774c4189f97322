"""Many requests in flight from one thread, without a thread each: `Node.request_many` and
`Node.submit`.

`Pipelined` carries out many request plans at once over the DEALERs of one thread: it
sends each plan's exchange, and resumes the plan whose reply arrives (the table of what
waits for what is `_patterns.outstanding`'s, shared with `AsyncNode`'s requester). A step
that waits for something else than a reply (a provider to appear) is handed to
``wait_step``; once carried out, the plan goes on in the pipeline.

* `request_many` pumps a `Pipelined` of the calling thread until its requests are
  answered, keeping at most ``window`` in flight; it carries out a waiting step itself.
* `Submitter` is a thread of the node that pumps one for `submit`'s futures; a waiting
  step is carried out on a small pool of threads, and its plan then comes back to the
  submit thread, so that it never holds up the others.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import zmq

from .._engine.api import ItemCalls, Plan, advance_call
from .._engine.engine import Engine
from .._io.sockets import has_input, recv_frames, send_frames
from .._io.waker import Waker
from .._mesh.directory import Provider
from .._mesh.waiters import Until
from .._patterns.in_order import InOrder
from .._patterns.outstanding import Outstanding
from .._patterns.reqrep import Exchange, QuickRequest
from .._patterns.request_batches import EARLY_ITEMS, RequestBatches
from .._stats import RequestTally
from .._wire import frames as wire
from ..errors import MeshTimeoutError, NodeClosedError, PeerLostError
from .failures import (
    CLOSED,
    clogged,
    closed_or_failed,
    report_link_replaced,
    send_failure,
    take_back_sent,
)

__all__ = ["Pipelined", "Submitter", "MAX_SUBMITTED", "run_many", "FullSocket", "WaitingForRoom", "send_on", "send_request", "send_batches",
           "withdraw_gathered"]

log = logging.getLogger("zmqmesh.node")

MAX_SUBMITTED = 4096
"""Requests that `Node.submit` keeps in flight at most; a call past it waits for room
(within its timeout): back-pressure instead of a queue that grows with the caller."""

_READ_BURST = 1024
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)  # (ints: ``event & zmq.POLLIN`` runs the flag enum's Python ``__and__``)
_REFILL_BURST = 1  # (request_many at hand: reply frames read per pump; see `run_many`)
_BUSY_POLL_S = 0.1  # with requests in flight: how often providers that left are looked for
_WAIT_THREADS = 4


def replace_link(outstanding: Outstanding[Any], provider_id: str, engine: Engine) -> None:
    """Count and log, by its cause (`report_link_replaced`), a DEALER to ``provider_id``
    about to be replaced: it refused a frame (``zmq.Again``) though no other request waited
    on it. Requests given up on that the provider never read fill it (it stopped reading),
    or ZeroMQ dropped its connection for good (it ends one that carried a frame past
    ``MAXMSGSIZE``, a reply larger than this node's ``max_message_bytes``, and never
    connects it again: the socket then refuses every send). What was given up on goes with
    the old socket."""
    report_link_replaced(engine, provider_id, outstanding.given_up_on(provider_id))
    outstanding.renewed(provider_id)


class FullSocket(Protocol):
    """What a driver does with the frames that a provider's socket refused (``zmq.Again``,
    its ``send_hwm`` frames unread) while other requests still wait on it: back-pressure,
    each driver in its own way of waiting."""

    @property
    def waiting_for_room(self) -> Container[str]:
        """The ids of the providers whose frames wait for room already: the next go behind
        them (`take` then takes them). (An attribute where implemented, not a method: it is
        asked per request sent.)"""

    def take(self, sock: zmq.Socket[Any], provider_id: str, frames: list[bytes], request_ids: list[bytes],
             copy: bool) -> None:
        """Keep ``frames`` (carrying ``request_ids``) to send on ``sock`` once it has room,
        behind those kept before them; their requests wait as if sent, and time out as they
        would (`WaitingForRoom`)."""


Parked = tuple[list[bytes], list[bytes], bool]
"""Frames a socket refused, the ids of the requests they carry, and whether to copy them."""


class WaitingForRoom(dict[str, deque[Parked]]):
    """The frames each provider's socket refused (its ``send_hwm`` frames unread), in order,
    by provider id (a `FullSocket`'s ``waiting_for_room``): sent as the socket takes them
    again, when the driver finds it may (each in its own way of waiting: a poll for room, a
    timer on the loop); those whose requests none waits for any more go. (A dict: asked
    per request sent, ``in`` costs no Python call.)"""

    def keep(self, provider_id: str, frames: list[bytes], request_ids: list[bytes], copy: bool) -> bool:
        """Keep ``frames`` behind those kept for ``provider_id`` before them; True if they are
        the first (the driver then watches its socket for room)."""
        parked = self.get(provider_id)
        if parked is None:
            self[provider_id] = deque([(frames, request_ids, copy)])
            return True
        parked.append((frames, request_ids, copy))
        return False

    def send(self, provider_id: str, sock: zmq.Socket[Any], waiting: Container[bytes]) -> bool:
        """Send the frames kept for ``provider_id`` on ``sock`` as far as it takes them, those
        of requests none of ``waiting`` waits for dropped; True once none is kept for it any
        more. Raises `zmq.ZMQError` (not `zmq.Again`) for a socket that failed."""
        parked = self.get(provider_id)
        if parked is None:
            return True
        while parked:
            frames, request_ids, copy = parked[0]
            if any(request_id in waiting for request_id in request_ids):
                try:
                    send_frames(sock, frames, copy=copy)
                except zmq.Again:
                    return False
            parked.popleft()
        del self[provider_id]
        return True

    def send_or_replace(self, provider_id: str, sock: zmq.Socket[Any], outstanding: Outstanding[Any],
                        engine: Engine, renew: Callable[[str], zmq.Socket[Any]]) -> bool:
        """`send` the frames kept for ``provider_id``; True once none is kept. A socket that
        refuses them while no request sent on it waits any more (only those kept aside: no
        reply will make room), and whose requests given up on could not fill it
        (`clogged`), was dropped by ZeroMQ: it is replaced (`replace_link`, ``renew``) and
        they go on the new one. (Else, under steady traffic, some always waited aside, and
        a dropped connection was never replaced: every request to its provider timed out.)
        One full of them waits on: its provider stopped reading. Raises `zmq.ZMQError`
        (not `zmq.Again`) for a socket that failed."""
        if self.send(provider_id, sock, outstanding.ids):
            return True
        if clogged(engine, outstanding.given_up_on(provider_id)) or \
                outstanding.waiting_on(provider_id) > self.waited(provider_id, outstanding.ids):
            return False  # (requests given up on fill it, or those sent on it wait: room comes as they are read)
        replace_link(outstanding, provider_id, engine)
        return self.send(provider_id, renew(provider_id), outstanding.ids)

    def waited(self, provider_id: str, waiting: Container[bytes]) -> int:
        """How many requests of the frames kept for ``provider_id`` are still waited for."""
        return sum(request_id in waiting for _frames, request_ids, _copy in self.get(provider_id, ())
                   for request_id in request_ids)

    def drop_unwaited(self, waiting: Container[bytes]) -> list[str]:
        """Drop the frames whose requests none of ``waiting`` waits for any more (they timed
        out, or their callers gave up: a provider that stopped reading would have them kept
        as long as it lives); the providers with none kept any more."""
        emptied: list[str] = []
        for provider_id, parked in list(self.items()):
            kept = deque(entry for entry in parked if any(request_id in waiting for request_id in entry[1]))
            if kept:
                self[provider_id] = kept
            else:
                del self[provider_id]
                emptied.append(provider_id)
        return emptied


def send_on(outstanding: Outstanding[Any], sock: zmq.Socket[Any], provider_id: str, frames: list[bytes],
            request_ids: list[bytes], engine: Engine, renew: Callable[[str], zmq.Socket[Any]] | None = None,
            full: FullSocket | None = None, copy: bool = True) -> None:
    """Send ``frames``, carrying the requests ``request_ids`` that wait in ``outstanding``,
    on ``provider_id``'s socket ``sock``. When the socket refuses them (``zmq.Again``) while
    other requests still wait on it, the driver takes them (``full``: back-pressure, the
    provider reads more slowly than the caller sends); one that refuses them with no
    other waiting on it is replaced (``renew``: `replace_link`). Without either, raises
    ``zmq.Again`` as any other ``zmq.ZMQError``."""
    if full is not None and provider_id in full.waiting_for_room:
        full.take(sock, provider_id, frames, request_ids, copy)
        return
    try:
        send_frames(sock, frames, copy=copy)
        return
    except zmq.Again:
        if renew is None:
            raise
        if outstanding.waiting_on(provider_id) > len(request_ids):  # full of requests waited for: not stale
            if full is None:
                raise
            full.take(sock, provider_id, frames, request_ids, copy)
            return
        replace_link(outstanding, provider_id, engine)
    send_frames(renew(provider_id), frames, copy=copy)


def send_request(outstanding: Outstanding[Any], waiter: Any, sock: zmq.Socket[Any], step: Exchange,
                 engine: Engine, batches: RequestBatches[str, Any] | None = None,
                 renew: Callable[[str], zmq.Socket[Any]] | None = None, full: FullSocket | None = None) -> bool:
    """Send ``step``'s request on ``sock`` (True), with ``waiter`` waiting for it in
    ``outstanding``, or gather it in ``batches`` to go with `send_batches` (False); a full
    socket is waited for or replaced as `send_on` says. Raises `MeshTimeoutError` when the
    provider takes no more requests, `NodeClosedError` or `ZmqMeshError` when the socket
    fails (nothing is then left waiting)."""
    # (each field read once: a named tuple's cost a generic lookup per read)
    provider, service, _service_b, body, deadline, _meta, _compact = step
    provider_id = provider.id
    busy = provider_id in outstanding.busy_with  # (`Outstanding.busy`, asked without a call)
    request_id = outstanding.add(waiter, provider_id, service, deadline)
    if batches is not None and batches.add(provider_id, request_id, waiter, step, busy):
        return False
    try:
        send_on(outstanding, sock, provider_id, step.frames(request_id), [request_id], engine, renew, full,
                len(body) < wire.LARGE_FRAME)
    except zmq.ZMQError as exc:
        outstanding.withdraw(request_id)
        raise send_failure(exc, provider_id, engine, service) from (None if isinstance(exc, zmq.Again) else exc)
    return True


def send_batches(batches: RequestBatches[str, Any], sockets: dict[str, zmq.Socket[Any]],
                 outstanding: Outstanding[Any], engine: Engine,
                 fail: Callable[[Any, BaseException], None], gave_up: Callable[[Any], bool] | None = None,
                 full_only: bool = False, renew: Callable[[str], zmq.Socket[Any]] | None = None,
                 tally: RequestTally | None = None, full: FullSocket | None = None) -> int:
    """Send the batches gathered since the last call, each on its provider's socket; how
    many requests went (counted as sent in ``tally``, the driver's, before they go: a
    Ctrl-C once a batch went must not leave its requests uncounted, to be counted as
    abandoned; one that does not go is taken back). A request no longer waited for is left out: forgotten (its
    caller gave up, its time ran out, its provider left) or one whose waiter ``gave_up``
    (then withdrawn from ``outstanding`` too: never sent, it must not be counted as
    abandoned when its caller's sweep comes); it was counted as sent under its service
    when it was gathered (unless a built-in service's), and ``tally`` (the driver's)
    takes that back.
    ``fail(waiter, error)`` hears of each request of a batch that could not be sent (its
    count under its name taken back in ``tally`` too):
    `MeshTimeoutError` when the provider takes no more, `NodeClosedError` or `ZmqMeshError`
    when the socket failed. Requests gathered meanwhile (by ``fail``) go too. ``full_only``:
    only the batches already full (`RequestBatches.ready`), before the pause. A full socket
    is left to the driver (``full``) or replaced as `send_on` says."""
    sent = 0
    while True:
        taken = batches.take(full_only)  # (without full_only, also when empty: a pause begins a new pass)
        if not taken:
            return sent
        if tally is not None:
            engine.stats.count_sent(tally, sum(len(batch.items) for batch in taken))
        for batch in taken:
            sock = sockets.get(batch.key)
            left_out = batch.keep(outstanding.ids, gave_up)
            for service_b, request_id, _body in left_out:  # (they never go: in flight no more either)
                outstanding.withdraw(request_id)
                if tally is not None:
                    take_back_sent(tally, service_b, counted=True)
            if sock is None or not batch.items:
                continue
            try:
                send_on(outstanding, sock, batch.key, [batch.frame()], batch.ids, engine, renew, full)
                sent += len(batch.items)
                continue
            except zmq.ZMQError as exc:
                error = send_failure(exc, batch.key, engine)
            for waiter, (service_b, request_id, _body) in zip(batch.waiters, batch.items):
                if tally is not None:
                    take_back_sent(tally, service_b, counted=True)
                if outstanding.withdraw(request_id):
                    fail(waiter, error)


def withdraw_gathered(batches: RequestBatches[str, Any], outstanding: Outstanding[Any], tally: RequestTally,
                      gave_up: Callable[[Any], bool] | None = None) -> list[Any]:
    """Take the requests gathered and not sent yet whose waiter ``gave_up`` (every one:
    None) out of ``batches`` and ``outstanding``: they never go, and their count under
    their service's name is taken back in ``tally``. The waiters of those that still
    waited (to be failed, uncounted: they were not sent)."""
    waiters = []
    for request_id, waiter, service_b in batches.remove_where(gave_up):
        take_back_sent(tally, service_b)
        if outstanding.withdraw(request_id):
            waiters.append(waiter)
    return waiters


def _sent_among(ended: list[tuple[Any, str]], batches: RequestBatches[str, Any]) -> int:
    """How many of the requests that ``ended`` (``(waiter, service)`` each) were sent: not
    those still gathered, which never go (`send_batches` leaves them out)."""
    if not batches:
        return len(ended)
    unsent = batches.waiters()
    return sum(waiter not in unsent for waiter, _service in ended)


class Job:
    """One request plan in flight (or a `QuickRequest`, until it becomes one), and what to
    tell its outcome (once): ``finish(key, value, error)``."""

    __slots__ = ("plan", "finish", "key")

    def __init__(self, plan: Plan | QuickRequest, finish: Callable[[Any, Any, BaseException | None], None],
                 key: Any) -> None:
        self.plan = plan
        self.finish = finish
        self.key = key


class Pipelined:
    """Request plans in flight over the DEALERs of one thread (the only thread using it).

    ``wait_step(job, step)`` gets the plans that yield anything but an exchange; it
    resumes them with `resume` (from this thread) once the step is carried out.
    """

    def __init__(self, engine: Engine, wait_step: Callable[[Job, Any], None]) -> None:
        self.engine = engine
        self.outstanding: Outstanding[Job] = Outstanding()
        self.poller = zmq.Poller()
        self._wait_step = wait_step
        self._sockets: dict[str, zmq.Socket[Any]] = {}
        self._providers: dict[zmq.Socket[Any], str] = {}
        self._known: dict[str, Provider] = {}  # (to connect again: `_renew`)
        self._epoch = -1
        self._tally = RequestTally()
        """What this thread's requests count: added to the stats every `TALLY_FOLD_AT`
        requests sent (`Stats.count_sent`), and meanwhile counted by the stats' snapshots."""
        engine.stats.track(self._tally)
        self._batches: RequestBatches[str, Job] = RequestBatches()
        self.waiting_for_room = WaitingForRoom()
        """What each provider's socket refused: sent as `pump` finds it writable (`take`)."""

    def __len__(self) -> int:
        return len(self.outstanding)

    def start(self, job: Job) -> None:
        """Begin ``job``: run its plan up to its first wait."""
        self.resume(job, None, None)

    def resume(self, job: Job, value: Any, error: BaseException | None) -> None:
        """Go on with ``job``'s plan, given the outcome of its last step. Its request may
        fill a batch, which then goes at once: the jobs of one that cannot go are resumed
        with the error, from here."""
        while True:
            try:
                job.plan, finished, step = advance_call(job.plan, value, error, self._tally)
            except Exception as exc:
                job.finish(job.key, None, exc)
                return
            if finished:
                job.finish(job.key, step, None)
                return
            if not isinstance(step, Exchange):
                self.send_gathered()  # (the wait may block this thread)
                self._wait_step(job, step)
                return
            try:
                went = send_request(self.outstanding, job, self._socket(step.provider), step, self.engine,
                                    self._batches, self._renew, self)
            except Exception as exc:  # the plan decides what a failed send means
                take_back_sent(self._tally, step.service)
                value, error = None, exc
                continue
            if went:
                self.engine.stats.count_sent(self._tally, 1)
            elif self._batches.ready:  # a full batch goes now (its jobs hear of a failure through `fail`)
                self._send_batches(full_only=True)
            return

    def start_many(self, jobs: list[Job]) -> None:
        """Begin ``jobs`` together. The requests of those that go the quick way
        (`QuickRequest`) are gathered whatever their provider's state (the items are at
        hand) and go at once, a batch per frame (`RequestBatches`); the others begin after
        them, one by one (`start`: a plan may wait, blocking this thread)."""
        later = []
        tally, gather, add, sockets = self._tally, self._batches.gather, self.outstanding.add, self._sockets
        for job in jobs:
            plan = job.plan
            if not isinstance(plan, QuickRequest) or (provider := plan.pick(tally)) is None:
                if isinstance(plan, QuickRequest):
                    job.plan = plan.plan()
                later.append(job)
                continue
            provider_id = provider.id
            if provider_id not in sockets:
                try:
                    self._socket(provider)
                except Exception as exc:  # (the plan decides what that means)
                    take_back_sent(tally, plan.calling.service)
                    self.resume(job, None, exc)
                    continue
            calling = plan.calling
            gather(provider_id, add(job, provider_id, calling.service, plan.deadline), job, calling.service_b, plan.body)
        self._send_batches()
        for job in later:
            self.start(job)

    def _socket(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self._sockets.get(provider.id)
        if sock is None:
            sock = self._sockets[provider.id] = self.engine.dealer_to(provider)
            self._providers[sock] = provider.id
            self._known[provider.id] = provider
            self.poller.register(sock, zmq.POLLIN)
        return sock

    def _renew(self, provider_id: str) -> zmq.Socket[Any]:
        """A new socket to ``provider_id`` in place of one whose connection was dropped."""
        old = self._sockets.pop(provider_id)
        self.poller.unregister(old)
        del self._providers[old]
        old.close(0)
        return self._socket(self._known[provider_id])

    def take(self, sock: zmq.Socket[Any], provider_id: str, frames: list[bytes], request_ids: list[bytes],
             copy: bool) -> None:
        """Keep ``frames`` to send once ``provider_id``'s socket ``sock`` has room, behind
        those kept before them (`pump` sends them as the socket becomes writable): the
        back-pressure of a provider that reads requests more slowly than this thread sends
        them. Its requests wait as if sent, and time out as they would; meanwhile this
        thread goes on reading replies and sending to the other providers (before, it
        waited here, holding up every other request of the thread: a `submit` to a healthy
        provider timed out behind one to a stalled provider). A `FullSocket`'s."""
        if self.waiting_for_room.keep(provider_id, frames, request_ids, copy):
            self.poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)

    def _send_parked(self, provider_id: str, replace: bool = False) -> None:
        """Send the frames kept for ``provider_id`` (`take`) as far as its socket takes them;
        ``replace``: as requests ended, a socket that refuses them while none sent on it
        waits any more is replaced (`WaitingForRoom.send_or_replace`)."""
        sock = self._sockets.get(provider_id)
        if sock is None:
            return
        waiting, outstanding = self.waiting_for_room, self.outstanding
        if replace:
            done = waiting.send_or_replace(provider_id, sock, outstanding, self.engine, self._renew)
        else:
            done = waiting.send(provider_id, sock, outstanding.ids)
        if done:
            self.poller.modify(self._sockets[provider_id], zmq.POLLIN)
        elif self._sockets[provider_id] is not sock:  # (replaced, and full already)
            self.poller.modify(self._sockets[provider_id], zmq.POLLIN | zmq.POLLOUT)

    def _drop_unwaited(self) -> None:
        """Drop the frames kept for room whose requests none waits for any more; then try
        those left: the requests sent on their socket may all have ended (`_send_parked`)."""
        for provider_id in self.waiting_for_room.drop_unwaited(self.outstanding.ids):
            sock = self._sockets.get(provider_id)
            if sock is not None:
                self.poller.modify(sock, zmq.POLLIN)
        for provider_id in list(self.waiting_for_room):
            with contextlib.suppress(zmq.ZMQError):  # (a socket that failed: the next poll says so)
                self._send_parked(provider_id, replace=True)

    def pump(self, timeout_s: float | None, burst: int = _READ_BURST) -> list[tuple[Any, int]]:
        """Wait up to ``timeout_s`` (None: until something is ready; less if a request falls
        due sooner) for replies, and resume the plans they answer (up to ``burst`` messages
        from each provider); fail the overdue requests and those of providers that left.
        Returns what the poller found ready (other sockets or descriptors registered on
        `poller` by the caller included). Raises `NodeClosedError` once the node stopped under the call."""
        self.send_gathered()
        deadline = self.outstanding.next_deadline()
        if deadline is not None:
            due = max(deadline - time.monotonic(), 0.0)
            timeout_s = due if timeout_s is None else min(timeout_s, due)
        try:
            ready = self.poller.poll(None if timeout_s is None else int(timeout_s * 1000) + (1 if timeout_s > 0 else 0))
            for sock, event in ready:
                provider_id = self._providers.get(sock)
                if provider_id is None:
                    continue
                if event & _POLLOUT:
                    self._send_parked(provider_id)
                if event & _POLLIN:
                    self._read(sock, provider_id, burst)
        except zmq.ZMQError as exc:
            raise closed_or_failed(self.engine, exc) from exc
        if self.engine.closed:
            raise NodeClosedError(CLOSED)
        self._expire()
        self.prune()
        return ready

    def overdue(self) -> bool:
        """Whether a request in flight has passed its deadline (`pump` fails it)."""
        deadline = self.outstanding.next_deadline()
        return deadline is not None and deadline <= time.monotonic()

    def send_gathered(self) -> None:
        """Send the requests gathered since the last pump (`RequestBatches`) now."""
        self._send_batches()

    def _send_batches(self, full_only: bool = False) -> None:
        send_batches(self._batches, self._sockets, self.outstanding, self.engine,
                     lambda job, error: self.resume(job, None, error), full_only=full_only, renew=self._renew,
                     tally=self._tally, full=self)  # (counted there)

    def forget(self, jobs: set[Job]) -> None:
        """Forget the requests of ``jobs`` (their caller gave up, or the node stopped under
        it): late replies are dropped, and those not sent yet never go. Those sent are
        counted as abandoned (or, once the node stopped, as errors)."""
        withdraw_gathered(self._batches, self.outstanding, self._tally, jobs.__contains__)
        forgotten = self.outstanding.forget_where(jobs.__contains__)
        if forgotten:
            self.engine.stats.add("request", "errors" if self.engine.closed else "abandoned", forgotten)
            if self.waiting_for_room:
                self._drop_unwaited()

    def _read(self, sock: zmq.Socket[Any], provider_id: str, burst: int) -> None:
        answer_all, tally = self.outstanding.answer_all, self._tally
        counts = tally.counts
        for i in range(burst):
            if i == 1 and not self.outstanding and not has_input(sock):  # (as `LoopRequester._on_readable`)
                break
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            answered, unanswered = answer_all(frames, provider_id)
            # counted before their callers hear of them: a submitted request's future wakes
            # its caller (another thread) at once, and the counters must add up by then
            if answered:
                counts["received"] = counts.get("received", 0) + len(answered)
            if unanswered:  # late replies (their requests timed out), or ones nobody asked for
                counts["dropped"] = counts.get("dropped", 0) + unanswered
            now = time.monotonic()  # (when the frame came: the time its replies were waited for)
            for job, status, body in answered:
                plan = job.plan
                if status != wire.STATUS_OK or type(plan) is not QuickRequest:
                    self.resume(job, (status, body), None)
                    continue
                try:  # (`resume`'s way for the common reply, spared its steps)
                    value = plan.calling.result(body, tally, plan.started, now)
                except Exception as exc:
                    job.finish(job.key, None, exc)
                else:
                    job.finish(job.key, value, None)

    def _expire(self) -> None:
        overdue = self.outstanding.expired(time.monotonic())
        if overdue:
            self.engine.stats.add("request", "errors", _sent_among(overdue, self._batches))
            if self.waiting_for_room:
                self._drop_unwaited()
        for job, service in overdue:
            self.resume(job, None, MeshTimeoutError(f"request to {service!r} timed out"))

    def prune(self) -> None:
        """Take the replies providers that left sent before they did, fail the requests
        still waiting on them, and close their sockets (looked at only when membership
        changed)."""
        directory = self.engine.directory
        if directory.epoch == self._epoch:
            return
        self._epoch = directory.epoch
        alive = directory.alive_ids
        for provider_id in [p for p in self._sockets if p not in alive]:
            with contextlib.suppress(zmq.ZMQError):  # (the context ending under it: the requests fail below)
                self._read(self._sockets[provider_id], provider_id, len(self.outstanding) + 1)
            self.waiting_for_room.pop(provider_id, None)
            sock = self._sockets.pop(provider_id)
            self.poller.unregister(sock)
            del self._providers[sock]
            self._known.pop(provider_id, None)
            sock.close(0)
            lost = self.outstanding.lost(provider_id)
            if lost:
                self.engine.stats.add("request", "errors", _sent_among(lost, self._batches))
            for job, service in lost:
                self.resume(job, None, PeerLostError(
                    f"provider {provider_id[:8]} of {service!r} left before replying", provider_id))

    def close(self) -> list[Job]:
        """Close every socket; the jobs of the requests still in flight, forgotten (their
        replies will never be read): those sent are counted as errors (the node stopped)."""
        jobs = withdraw_gathered(self._batches, self.outstanding, self._tally)
        sent = self.outstanding.take_all()
        if sent:
            self.engine.stats.add("request", "errors", len(sent))
        jobs.extend(sent)
        self.waiting_for_room.clear()
        for sock in self._sockets.values():
            self.poller.unregister(sock)
            sock.close(0)
        self._sockets.clear()
        self._providers.clear()
        self.engine.stats.untrack(self._tally)
        return jobs


class Submitter:
    """The thread behind `Node.submit`: it pumps a `Pipelined` of its own, taking the plans
    that any thread submits. Started on the first `submit`, stopped with the node.

    The futures are completed on this thread, so their done-callbacks run here: a blocking
    `Node` call from one is refused (`SUBMIT_THREAD_REFUSAL`)."""

    def __init__(self, engine: Engine, carry_out: Callable[[Any], tuple[Any, BaseException | None]]) -> None:
        self.engine = engine
        self._carry_out = carry_out
        self._incoming: deque[Job] = deque()
        self._resumed: deque[tuple[Job, Any, BaseException | None]] = deque()
        # Room (at most MAX_SUBMITTED in flight) is counted from what this thread took in and
        # finished, and what waits in `_incoming`: a submit takes room only by its append, one
        # step, so a Ctrl-C anywhere in it takes none that is never given back (`_in_flight`).
        self._room = threading.Condition()  # (guards a submit's look for room and its append)
        self._room_waiters = 0  # (submits waiting for room: `_finish` wakes one)
        self._taken_in = 0  # jobs this thread took from `_incoming` (written by it alone)
        self._finished = 0  # jobs finished (by this thread, but for those a stop fails)
        self._idle = False
        self._closing = False
        self._waker = Waker()
        self._pipelined = Pipelined(engine, self._wait_elsewhere)
        self._pipelined.poller.register(self._waker.fd, zmq.POLLIN)
        self._waiting = ThreadPoolExecutor(_WAIT_THREADS, thread_name_prefix=f"zmqmesh-submit-wait-{engine.name}")
        self.thread = threading.Thread(target=self._run, name=f"zmqmesh-submit-{engine.name}", daemon=True)
        self._began = threading.Lock()  # taken by the thread as it begins, or by a close before it did

    def start(self) -> None:
        """Start the thread (once, before any `submit`)."""
        self.thread.start()

    def submit(self, make_plan: Callable[[], Plan | QuickRequest], deadline: float) -> Future[Any]:
        """The future of the outcome of the plan ``make_plan()`` gives, made once there is
        room (back-pressure, until ``deadline``). Raises `MeshTimeoutError` if no room
        frees up, `NodeClosedError`, and what ``make_plan`` raises."""
        if self._closing:
            raise NodeClosedError("the node is not running")
        # (on this thread, room frees up only once the caller returns: never wait for it)
        wait_room = threading.current_thread() is not self.thread
        with self._room:
            if not self._wait_for_room(deadline if wait_room else 0.0):
                if self._closing:
                    raise NodeClosedError("the node is not running")
                raise MeshTimeoutError(f"{MAX_SUBMITTED} submitted requests are still in flight: none finished in time")
            future: Future[Any] = Future()
            future.set_running_or_notify_cancel()  # (a request once sent cannot be taken back)
            self._incoming.append(Job(make_plan(), self._finish, future))  # (the one step that takes room)
        if self._closing:
            self._fail_waiting()  # the thread may have ended before it could see this one
        elif self._idle:
            self._waker.wake()
        return future

    def _finish(self, future: Future[Any], value: Any, error: BaseException | None) -> None:
        """A submitted request's outcome: into its future (a `Job`'s ``finish``)."""
        self._finished += 1
        if self._room_waiters:
            with self._room:
                self._room.notify()
        try:  # (this runs the future's done-callbacks, on this thread)
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        except BaseException:  # a callback's SystemExit or KeyboardInterrupt must not end the thread
            log.exception("a done-callback of a submitted request raised")

    def _in_flight(self) -> int:
        """Submitted requests not finished yet: those waiting in `_incoming` too (this
        thread counts one taken in before it takes it)."""
        return len(self._incoming) + self._taken_in - self._finished

    def _wait_for_room(self, deadline: float) -> bool:
        """Whether there is room for one more request, waiting until ``deadline`` (holding
        `_room`). Waits in slices: a wake-up lost to a Ctrl-C in another waiter costs a
        slice at most."""
        if self._in_flight() < MAX_SUBMITTED:
            return True
        self._room_waiters += 1
        try:
            while self._in_flight() >= MAX_SUBMITTED:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    return False
                self._room.wait(min(remaining, _BUSY_POLL_S))
            return True
        finally:
            self._room_waiters -= 1

    def _fail_waiting(self) -> None:
        """Fail the jobs no thread will take any more: submitted, or back from a wait."""
        while True:
            try:
                job = self._incoming.popleft()
            except IndexError:
                try:
                    job = self._resumed.popleft()[0]
                except IndexError:
                    return
            _fail_closed(job)

    def _come_back(self, job: Job, value: Any, error: BaseException | None) -> None:
        """Hand ``job`` back to the submit thread with the outcome of its step (any thread)."""
        self._resumed.append((job, value, error))
        if self._closing:
            self._fail_waiting()  # the thread may have ended before it could see this one
        else:
            self._waker.wake()

    def _wait_elsewhere(self, job: Job, step: Any) -> None:
        """A plan waits for something else than a reply. For a condition (a provider to
        appear), the loop watches it and hands the plan back when it holds or its time is
        up, so that any number wait at once; any other step is carried out on a pool
        thread. Either way the plan comes back here with the outcome."""
        if isinstance(step, Until):
            self._wait_on_loop(job, step)
            return

        def carry_out() -> None:
            self._come_back(job, *self._carry_out(step))

        try:
            self._waiting.submit(carry_out)
        except RuntimeError:  # the pool was shut down: the node stops
            self._come_back(job, None, NodeClosedError(CLOSED))

    def _wait_on_loop(self, job: Job, step: Until) -> None:
        try:
            waiter = self.engine.watch(step.predicate, step.deadline, step.what)
        except NodeClosedError as exc:
            self._come_back(job, None, exc)
            return
        waiter.add_done_callback(lambda done: self._come_back(job, None, done.exception()))

    def wake(self) -> None:
        """Have the thread look at its sockets now (any thread): those to providers that
        left are closed (`Pipelined.prune`)."""
        self._waker.wake()

    def begin_close(self) -> None:
        """Make the thread fail what is in flight with `NodeClosedError` and end (any thread)."""
        self._closing = True
        self._waker.wake()

    def close(self) -> None:
        """`begin_close`, and wait (a moment) for the thread to end: it closes its sockets
        (closed here if the thread never ran: its start interrupted, say)."""
        self.begin_close()
        if self._began.acquire(blocking=False):
            self._let_go()
        elif threading.current_thread() is not self.thread:
            self.thread.join(2.0)
        self._waiting.shutdown(wait=False)  # (what waits there finds the node closed)

    def _run(self) -> None:
        if not self._began.acquire(blocking=False):  # closed before this thread ran
            return
        pipelined, incoming, resumed, engine = self._pipelined, self._incoming, self._resumed, self.engine
        try:
            while not self._closing and not engine.closed:
                while incoming or resumed:
                    if incoming:
                        self._taken_in += 1  # (first: counted in flight all along, `_in_flight`)
                        try:
                            job = incoming.popleft()
                        except IndexError:  # (a stop failed it meanwhile)
                            pass
                        else:
                            pipelined.start(job)
                    try:
                        job, value, error = resumed.popleft()
                    except IndexError:
                        pass
                    else:
                        pipelined.resume(job, value, error)
                self._idle = True
                if incoming or resumed or self._closing:
                    self._idle = False
                    continue
                ready = pipelined.pump(_BUSY_POLL_S if len(pipelined) else None)
                self._idle = False
                if any(sock == self._waker.fd for sock, _event in ready):
                    self._waker.clear()
        except NodeClosedError:
            pass
        except Exception:
            log.exception("the submit thread failed")
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """Fail what is in flight or waiting with `NodeClosedError`, close the sockets (on
        the thread, or in `close` when it never ran)."""
        self._closing = True
        for job in self._pipelined.close():
            _fail_closed(job)
        self._fail_waiting()  # (and what comes back later, `_come_back` fails itself)
        self._waker.close()


def _fail_closed(job: Job) -> None:
    job.plan.close()
    job.finish(job.key, None, NodeClosedError(CLOSED))


def run_many(pipelined: Pipelined, plans: ItemCalls, window: int, at_hand: bool = False) -> list[Any]:
    """Carry out ``plans`` (made as there is room: `ItemCalls.take`) with at most ``window``
    in flight; their results in order. Raises the error of the first plan (in order) that
    failed: once one failed, no more are made, and those before it are waited for; the
    requests still in flight then are forgotten. What making a plan raises is raised once
    those made before it are begun (not sent: forgotten too).

    ``at_hand``: making the next plan never waits (its data is in a sequence), so the
    requests of several go in one batch; otherwise each goes before the next is made."""
    calls: InOrder[Job] = InOrder(window)  # (this call's: a nested call on the same thread has its own)
    take = plans.take
    # at hand: room is filled a batch's worth at a time, with the rest of the window still in
    # flight, reading a reply frame per pump: both sides work at once and frames stay whole
    # (3 clients x 64 in flight, bench.py req_clients: 21 k/s refilling by the reply, 42-51 k
    # reading all that waits per pump, 51-54 k this way)
    refill, burst = (min(EARLY_ITEMS, window), _REFILL_BURST) if at_hand else (1, _READ_BURST)
    try:
        while not calls.failures:
            if not at_hand:
                pipelined.send_gathered()  # (the next item may be long in coming)
            jobs: list[Job] = []
            # (there is room here, and no failure: the loops around see to both)
            made, failed = take(calls.free() if at_hand else 1)  # at hand: as many as there is room for
            for plan in made:
                job = Job(plan, calls.end, len(calls.results))
                calls.begin(job)
                jobs.append(job)
            if failed is not None:
                raise failed
            if not jobs:
                break
            pipelined.start_many(jobs)
            if not at_hand and pipelined.overdue():  # (items come one by one: a request fell due meanwhile)
                pipelined.pump(0, burst)
            while calls.free() < refill and not calls.failures:
                pipelined.pump(_BUSY_POLL_S, burst)
        while calls.waiting():
            pipelined.pump(_BUSY_POLL_S)
    finally:
        if calls.running:
            left = set(calls.running.values())
            pipelined.forget(left)
            for job in left:
                job.plan.close()
    return calls.outcome()
