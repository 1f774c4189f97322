"""Requests from threads: one `ThreadRequester` per calling thread, each with its own
DEALER per provider, so a blocking call waits on its own socket with no hand-off to another
thread (`ThreadRequesters` keeps them, and the thread that completes `Node.submit`'s futures)."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from ..._engine.engine import Engine
from ..._io.sockets import recv_frames, send_frames
from ..._mesh.directory import Provider
from ..._patterns.outstanding import GivenUp
from ..._stats import RequestTally
from ..._wire import frames as wire
from ...errors import MeshTimeoutError, NodeClosedError, PeerLostError, ZmqMeshError
from ..failures import (
    SUBMIT_THREAD_REFUSAL,
    report_link_replaced,
    send_failure,
    take_back_sent,
)

if TYPE_CHECKING:

    from ..pipelined import Pipelined, Submitter

from .waits import POLL_SLICE_S, carry_out

__all__ = ["ThreadRequester", "ThreadRequesters"]

log = logging.getLogger("zmqmesh.node")

_SLICE_MS = int(POLL_SLICE_S * 1000) + 1  # (a whole slice's RCVTIMEO: `_wait`, before a deadline's last slice)
_FREE_WAIT_S = 1.0  # (a thread in a call lets its sockets go within a poll slice of a stop)


class ThreadRequester:
    """Blocking requests from one thread (never shared between threads).

    Its sockets are its thread's alone: the thread holds `in_use` while it uses them, and
    a stop closes them only between two uses (`close`), never under a call (ZeroMQ's
    sockets are not thread-safe; a receive under way aborted the process).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.owner = threading.current_thread()
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self._ids = itertools.count(1)
        self._membership_epoch = -1
        self._slices: dict[str, int] = {}  # provider id: the RCVTIMEO its socket has (see `_wait`)
        self._given_up = GivenUp()  # (the requests on each provider's socket given up on, unanswered since)
        self._pipelined: Pipelined | None = None
        self.tally = RequestTally()
        """What this thread's calls count: added to the stats every `TALLY_FOLD_AT` requests
        sent (`Stats.count_sent`), and meanwhile counted by the stats' snapshots."""
        engine.stats.track(self.tally)
        self.packer = engine.codec.thread_packer()
        """Its thread's `Codec.thread_packer`: `Node.request` encodes with it, as it looks up
        the thread's requester, and not its packer too."""
        self.in_use = threading.RLock()
        """Held by the thread while it uses the sockets: `exchange` takes it, and so must a
        caller of `pipelined` (`Node.request_many`), then `check_open`, and call
        `after_call` once it let go."""
        self.closed = False

    def check_open(self) -> None:
        """Raises `NodeClosedError` once a stop closed the sockets (call holding `in_use`)."""
        if self.closed:
            raise NodeClosedError("the node stopped")

    def pipelined(self) -> Pipelined:
        """This thread's `Pipelined` (for `Node.request_many`; made on first use). A plan of
        it that must wait for something else than a reply waits right here."""
        if self._pipelined is None:
            # (imported here: a node that never pipelines requests never loads it)
            from ..pipelined import Pipelined

            carry = functools.partial(carry_out, self.engine)
            pipelined = self._pipelined = Pipelined(self.engine, lambda job, step: pipelined.resume(job, *carry(step)))
        return self._pipelined

    def exchange(self, provider: Provider, service: str, service_b: bytes, body: bytes, deadline: float,
                 meta: bytes | None = None, compact: bool = False) -> tuple[bytes, bytes]:
        """Send one request (an `Exchange`'s fields, in its order) and wait for its reply:
        ``(status, body)``. Raises `MeshTimeoutError`, `PeerLostError`, `NodeClosedError`.
        What it counts goes into `tally`."""
        sending = False  # (from the send on, an interrupt finds the request gone: `send_frames` ends what it began)
        try:
            with self.in_use:
                engine = self.engine
                try:
                    self.check_open()
                    if engine.directory.epoch != self._membership_epoch:
                        self._prune()
                    sock = self.sockets.get(provider.id) or self._connect(provider)
                    request_id = next(self._ids).to_bytes(8, "big")
                    # (made before: an interrupt meanwhile sent nothing)
                    frames = wire.request_frames(service_b, request_id, body, meta, compact)
                    sending = True
                    try:
                        send_frames(sock, frames, copy=len(body) < wire.LARGE_FRAME)
                    except zmq.Again:
                        sending = False
                        # one request of this thread in flight at most: a DEALER that refuses one is
                        # clogged with requests given up on or lost its connection for good (see
                        # `pipelined.replace_link`), and a new one takes it
                        report_link_replaced(engine, provider.id, self._given_up.get(provider.id, 0))
                        self._forget_socket(provider.id)
                        sock = self._connect(provider)
                        sending = True
                        send_frames(sock, frames, copy=len(body) < wire.LARGE_FRAME)  # (none of them went)
                except BaseException as exc:
                    if sending and not isinstance(exc, Exception):  # interrupted (a Ctrl-C) as it went: gone,
                        engine.stats.count_sent(self.tally, 1)  # and its caller no longer waits
                        engine.stats.add("request", "abandoned")
                        self._given_up.add(provider.id)
                        raise
                    # it did not go (nor will it): not sent, under its name either
                    take_back_sent(self.tally, service)
                    if isinstance(exc, zmq.ZMQError):
                        raise send_failure(exc, provider.id, engine, service) from exc
                    raise
                engine.stats.count_sent(self.tally, 1)
                try:
                    return self._wait(sock, request_id, provider, service, deadline)
                except MeshTimeoutError:  # (counted by `_wait`, which decided it)
                    self._given_up.add(provider.id)
                    raise
                except ZmqMeshError:  # (counted by `_wait`, which decided it)
                    raise
                except zmq.ZMQError:  # (`BlockingRunner` says what it means: the node stopped, or ZeroMQ failed)
                    engine.stats.add("request", "errors")
                    raise
                except BaseException:  # interrupted (a signal's KeyboardInterrupt): its caller no longer waits
                    engine.stats.add("request", "abandoned")
                    self._given_up.add(provider.id)
                    raise
        finally:
            self.after_call()

    def after_call(self) -> None:
        """Close the sockets to providers that left during a call, once it let go of
        `in_use` (`exchange`, and a caller of `pipelined`): `ThreadRequesters.peer_gone`
        passes over a thread in a call, which would keep them until its next call. (Looked
        at after letting go: a provider that leaves later finds `in_use` free.)"""
        if self.engine.directory.epoch != self._membership_epoch:
            self.prune_if_free(wait=True)

    def prune_if_free(self, wait: bool = False) -> None:
        """Close the sockets to providers that left, unless the thread is in a call (then
        its `after_call` does), or with ``wait``, once it let go of them."""
        if not self.in_use.acquire(blocking=wait):
            return
        try:
            if not self.closed:
                self._prune()
        finally:
            self.in_use.release()

    def _wait(self, sock: zmq.Socket[Any], request_id: bytes, provider: Provider, service: str,
              deadline: float) -> tuple[bytes, bytes]:
        # a receive that waits in slices (the socket's RCVTIMEO): between them, and after
        # each reply that answers nothing (a provider sending those without a pause never
        # lets a slice pass), whether the node stopped (its stop closes these sockets once
        # this call lets go of them: `close`) or the provider left
        engine = self.engine
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                engine.stats.add("request", "errors")
                raise MeshTimeoutError(f"request to {service!r} timed out")
            slice_ms = _SLICE_MS if remaining >= POLL_SLICE_S else int(remaining * 1000) + 1
            if self._slices.get(provider.id) != slice_ms:  # (set when it changes: a deadline's last slice)
                sock.setsockopt(zmq.RCVTIMEO, slice_ms)
                self._slices[provider.id] = slice_ms
            try:
                frames = recv_frames(sock, wait=True)
            except zmq.Again:  # the slice passed
                self._check_awaited(provider, service)
                continue
            reply = wire.parse_reply(frames)
            if reply is None or reply[0] != request_id:
                engine.stats.add("request", "dropped")  # a late reply
                self._given_up.replied_late(provider.id)
                self._check_awaited(provider, service)
                continue
            counts = self.tally.counts
            counts["received"] = counts.get("received", 0) + 1
            return reply[1], reply[2]

    def _check_awaited(self, provider: Provider, service: str) -> None:
        """Raises `NodeClosedError` once the node stopped, `PeerLostError` once
        ``provider`` left: a request to ``service`` it was to answer no longer waits (counted
        in ``request.errors``)."""
        engine = self.engine
        if engine.closed:
            engine.stats.add("request", "errors")
            raise NodeClosedError("the node stopped while a request was outstanding") from None
        if provider.id not in engine.directory.alive_ids:
            engine.stats.add("request", "errors")
            raise PeerLostError(f"provider {provider.id[:8]} of {service!r} left before replying", provider.id) from None

    def _forget_socket(self, provider_id: str) -> None:
        """Close ``provider_id``'s socket, and forget what went with it."""
        self._slices.pop(provider_id, None)
        self._given_up.pop(provider_id, None)
        self.sockets.pop(provider_id).close(0)

    def _connect(self, provider: Provider) -> zmq.Socket[Any]:
        sock = self.sockets[provider.id] = self.engine.dealer_to(provider)
        return sock

    def _prune(self) -> None:
        """Close sockets to providers that left (call when membership changed, holding `in_use`)."""
        directory = self.engine.directory
        self._membership_epoch = directory.epoch
        alive = directory.alive_ids
        for pid in [p for p in self.sockets if p not in alive]:
            self._forget_socket(pid)
        if self._pipelined is not None:
            self._pipelined.prune()

    def close(self, wait_s: float = 0.0) -> bool:
        """Close every socket of this requester once its thread is not using them, waiting
        up to ``wait_s`` for that (a thread in a call sees a stop within a poll slice and
        lets go); False, leaving them open, if it still was. Any thread may call this."""
        if not self.in_use.acquire(timeout=wait_s):
            return False
        try:
            self.closed = True
            self._slices.clear()
            self._given_up.clear()
            if self._pipelined is not None:
                self._pipelined.close()
            for sock in self.sockets.values():
                sock.close(0)
            self.sockets.clear()
            self.engine.stats.untrack(self.tally)
        finally:
            self.in_use.release()
        return True


class ThreadRequesters:
    """The requesters of the threads that called `Node.request`, one per live thread: the
    sockets of a thread that ended are closed when the next new thread asks, or a
    provider leaves (so a program that calls from short-lived threads does not run out of
    descriptors)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.here = threading.local()
        """The calling thread's requester, as ``here.requester``, once `current` made it (read
        where a call must not cost another: `Node.request`)."""
        self._all: list[ThreadRequester] = []
        self._lock = threading.Lock()
        self._submitter: Submitter | None = None

    def submitter(self) -> Submitter:
        """The thread behind `Node.submit` (started on first use). Raises `NodeClosedError`."""
        with self._lock:
            if self._submitter is None:
                self.engine.ensure_running()
                from ..pipelined import Submitter

                submitter = Submitter(self.engine, functools.partial(carry_out, self.engine))
                try:
                    submitter.start()
                except BaseException:  # (a Ctrl-C in its start: not left running unknown; the next submit starts another)
                    submitter.close()
                    raise
                self._submitter = submitter
            return self._submitter

    def on_submit_thread(self) -> bool:
        """Whether the calling thread is the one that completes `Node.submit`'s futures."""
        submitter = self._submitter
        return submitter is not None and threading.current_thread() is submitter.thread

    def current(self) -> ThreadRequester:
        """The calling thread's requester (created on first use). Raises `ZmqMeshError` on
        the thread that completes `Node.submit`'s futures: a request waited for there (from
        a done-callback) would hold up every submitted request."""
        requester: ThreadRequester | None = getattr(self.here, "requester", None)
        if requester is None and self.on_submit_thread():
            raise ZmqMeshError(SUBMIT_THREAD_REFUSAL)
        if requester is None:
            requester = ThreadRequester(self.engine)
            self.here.requester = requester
            with self._lock:
                for ended in [r for r in self._all if not r.owner.is_alive()]:
                    # its thread is gone: only `peer_gone` may hold its sockets a moment (then
                    # they close at the next look)
                    if ended.close():
                        self._all.remove(ended)
                self._all.append(requester)
        return requester

    def __len__(self) -> int:
        return len(self._all)

    def peer_gone(self, peer_id: str) -> None:
        """Close the sockets to providers that left that no thread is using: those of the
        threads that ended, and those of the threads between two calls (a thread in a call
        closes its own once the call is over: `ThreadRequester.after_call`); the submit
        thread is woken to close its own. Left open, each would try to connect to the
        provider's endpoint again, ten times a second, until its thread made another call.
        (On the loop: waits for no lock but a moment's, the waker's and the stats'.)"""
        if self._submitter is not None:
            self._submitter.wake()
        # the table is needed only to drop the threads that ended (a new thread's first call,
        # or a stop, holding it does so itself); each requester's sockets need its `in_use`
        table = self._lock.acquire(blocking=False)
        try:
            for requester in list(self._all):  # (a copy, taken in one C call)
                if table and not requester.owner.is_alive():
                    if requester.close():  # its thread is gone: nobody else uses these sockets
                        self._all.remove(requester)
                else:
                    requester.prune_if_free()
        finally:
            if table:
                self._lock.release()

    def fail_outstanding(self) -> None:
        """Fail what was submitted (`Node.submit`) with `NodeClosedError`; a blocked
        thread sees the node close itself."""
        if self._submitter is not None:
            self._submitter.begin_close()

    def close(self) -> None:
        """Close every thread's sockets, each once its thread is not using them (within
        `_FREE_WAIT_S` in all), and stop the submit thread."""
        with self._lock:
            if self._submitter is not None:
                self._submitter.close()
            deadline = time.monotonic() + _FREE_WAIT_S
            for requester in self._all:
                if not requester.close(max(deadline - time.monotonic(), 0.0)):
                    log.warning("node %s: a thread still uses its request sockets; the context's end closes them",
                                self.engine.name)
