"""`Node`: the blocking API. Its engine runs on a `Reactor` on a background I/O thread.

`AsyncNode` (in `asyncnode`) has the same decorators and method names as coroutines. Both
share `NodeBase` (registration, views, and every call's logic as a plan); `Node` carries
the plans out with the thread driver, blocking the calling thread where they wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from ._drivers import at_exit
from ._drivers.thread import (
    BlockingRunner,
    ThreadInbox,
    ThreadRequesters,
    stop_blocking,
)
from ._engine.api import (
    NodeBase,
    as_frames,
    check_group,
    check_peer_id,
    check_timeout,
    check_window,
)
from ._io.reactor import Reactor, run_on
from ._io.serving import not_ignored, served, serving
from ._io.stop_flag import StopFlag
from .config import NodeConfig, check_switch
from .errors import NodeClosedError, ZmqMeshError
from .message import Peer

__all__ = ["Node"]

log = logging.getLogger("zmqmesh.node")

_STOP_WAIT_S = 10.0  # past linger_s: how long run_forever waits for a stop begun by another thread


class Node(NodeBase):
    """A mesh node with a blocking API; its engine runs on a background I/O thread.

    ``def`` handlers run on the node's inbox thread, ``async def`` handlers on an asyncio
    loop of the node's own (started on first use), never on the I/O thread, so a slow
    handler delays only this node's deliveries, never its heartbeats. Every method is
    safe to call from any thread.

    ``name`` is what peers see of the node (text of at most 255 bytes in UTF-8; by
    default ``node-`` and the start of its id). Raises `ConfigError` for another name,
    or an option it cannot use.

    Example:

        node = zmqmesh.Node("worker-1")

        @node.service("add")
        def add(msg):
            return msg.data["a"] + msg.data["b"]

        with node:
            node.request("add", {"a": 1, "b": 2}, timeout=2.0)   # -> 3
    """

    def __init__(self, name: str | None = None, *, config: NodeConfig | None = None, **options: Any) -> None:
        super().__init__(name, NodeConfig.from_options(config, **options), ThreadInbox, ThreadRequesters)
        self._runner = BlockingRunner(self._engine)
        self._loop: Reactor | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._serving: list[StopFlag] = []  # what run_forever waits on: stop() raises them
        self._stopper: threading.Thread | None = None  # the thread running the stop (see `stop`)
        self._stop_args: tuple[Any, ...] | None = None  # what it runs with (`stop_blocking`), once a stop began
        self._stop_handed = False  # whether it was handed to `_stopper`, or to the caller (`_begin_stop`)
        self._stopper_began = threading.Lock()  # taken by `_stopper` as it begins, or by a stop beginning another
        self._after_start: threading.Thread | None = None  # the one stopping a start interrupted (`start`)
        self._began = threading.Lock()  # the I/O thread's, taken as it begins to run (`_run_loop`)

    def start(self) -> Node:
        """Bind, start discovery and handlers; returns the node.

        Raises `ZmqMeshError` (or `ConfigError`) on failure, `NodeClosedError` for a node
        that was stopped. Interrupted anywhere (a Ctrl-C), it stops the node before the
        interrupt goes on: its I/O thread, and the start already handed to it, are not
        left running with nothing to stop them (that stop runs on a thread of its own:
        `stop` waits for it).
        """
        self._check_process()
        interrupted: BaseException | None = None
        with self._lock:
            if self._stopped:  # (also one stopped before it ever started)
                raise NodeClosedError("a stopped node cannot be started again; create a new one")
            if self._thread is not None:
                return self
            loop = Reactor()
            began = threading.Lock()  # taken by the I/O thread as it begins, or by a start undone before it did
            thread = threading.Thread(target=self._run_loop, args=(loop, began), name=f"zmqmesh-io-{self.name}",
                                      daemon=True)
            try:
                # (known before it runs: a start interrupted anywhere leaves no thread a stop cannot find)
                self._loop, self._thread, self._began = loop, thread, began
                thread.start()
                run_on(loop, self._engine.start, loop, timeout=30)
            except Exception as exc:
                self._mark_stopped()
                self._end_loop_thread()
                if isinstance(exc, ZmqMeshError):
                    raise
                raise ZmqMeshError(f"node {self.name!r} failed to start: {exc}") from exc
            except BaseException as exc:  # (KeyboardInterrupt, SystemExit from a signal handler)
                interrupted = exc
        if interrupted is not None:
            self._after_start = threading.Thread(target=self._stop_after_start, name=f"zmqmesh-stop-{self.name}",
                                                 daemon=True)
            self._after_start.start()
            raise interrupted
        at_exit.running(self, Node._stop_at_exit, self.config.linger_s + at_exit.STOP_TIMEOUT_S + 2.0)
        return self

    def _stop_at_exit(self, bound: float | None) -> None:
        """Stop the node at the interpreter's exit, when it still runs then (`at_exit`),
        after a warning saying what it has not sent yet (``bound`` unused: the stop bounds
        each of its steps). Never raises but what `stop` does."""
        if not self.running:
            return
        at_exit.say_stopping(self.name, self._engine.counters()["gauges"]["queued"], "`with node:`, or `node.stop()`")
        self.stop(at_exit.STOP_TIMEOUT_S)

    def _finish_stop_at_exit(self, bound: float | None) -> None:
        """At the interpreter's exit, wait for a stop begun in one of the node's handlers
        that has not ended yet (it runs on a daemon thread), after a warning, for ``bound``
        seconds at most (None: until it ends). Raises ``TimeoutError`` when it did not end
        within ``bound``."""
        stopper = self._stopper
        if stopper is None or not stopper.is_alive():
            return
        at_exit.say_still_stopping(self.name)
        stopper.join(bound)
        if stopper.is_alive():
            raise TimeoutError(f"the stop of node {self.name} did not end within {bound} s")

    def _stop_after_start(self) -> None:
        """Stop a node whose start was interrupted, once the loop is past that start (the
        stop needs what it made). Never raises."""
        loop = self._loop
        assert loop is not None
        if self._began.acquire(blocking=False):  # interrupted before its I/O thread ran: it never will
            self._mark_stopped()
            loop.close()
            return
        try:
            run_on(loop, lambda: None, timeout=35)  # (queued behind the start, which has 30 s)
        except ZmqMeshError:
            pass
        if self._engine.closed:  # the start failed there (and let go of what it made), or never reached it
            self._mark_stopped()
            self._end_loop_thread()
            return
        try:
            self.stop()
        except Exception as exc:
            log.warning("node %s: stopping after an interrupted start failed: %s", self.name, exc)

    def _end_loop_thread(self) -> None:
        """End the I/O thread of a start that failed or was interrupted before the engine
        started (or close its loop, if the thread never ran). Never raises."""
        loop, thread = self._loop, self._thread
        assert loop is not None and thread is not None
        if self._began.acquire(blocking=False):  # (its thread will not run the loop now: closed here)
            loop.close()
            return
        loop.stop()
        thread.join(5)

    @staticmethod
    def _run_loop(loop: Reactor, began: threading.Lock) -> None:
        if not began.acquire(blocking=False):  # its start was undone before this thread ran
            return
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain queued sends (up to ``linger_s``), say goodbye, close everything. Idempotent.

        Never hangs: each step is bounded, the whole by about ``linger_s + timeout`` seconds.
        The stop runs on a thread of its own: a call interrupted while it waits (a second
        Ctrl-C) leaves it to end all the same, and a second call waits for it. Called from
        one of this node's own handlers, or from a done-callback of a future of `submit`,
        it returns at once (waiting there would wait for the caller itself). Raises
        `ZmqMeshError` only when called on the node's own I/O thread, `ConfigError` for a
        ``timeout`` that is not a finite number >= 0. A node still running at the
        interpreter's exit is stopped then, after a warning in the log. After a start
        interrupted (a Ctrl-C: see `start`), it waits for the stop that the start began,
        within the same bound (that stop goes on if the start is not over by then).
        """
        timeout = check_timeout(timeout)
        if self._forked():  # the sockets and threads are the parent's: leave them alone
            at_exit.stopped(self)
            self._mark_stopped()
            return
        after_start = self._after_start
        if after_start is not None and after_start is not threading.current_thread():
            if threading.current_thread() is self._thread:
                raise ZmqMeshError("stop() cannot be called from the node's own I/O thread")
            inbox = self._engine.inbox
            if not (isinstance(inbox, ThreadInbox) and inbox.runs_handlers_here()):  # (a handler does not wait)
                after_start.join(self.config.linger_s + timeout)  # (it stops the node once the start is over)
            if after_start.is_alive():
                return
        run_here: tuple[Any, ...] | None = None
        with self._lock:
            for flag in self._serving:
                flag.set()
            if not (self._stopped or self._loop is None or self._thread is None):
                if threading.current_thread() is self._thread:
                    raise ZmqMeshError("stop() cannot be called from the node's own I/O thread")
                inbox = self._engine.inbox
                assert isinstance(inbox, ThreadInbox)
                # The stop runs on a thread of its own: a caller interrupted while it waits (a
                # second Ctrl-C) leaves it to close the sockets and threads all the same.
                # (Known before the node is marked stopped: a stop interrupted from then on is
                # begun again, `_stop_undone`.)
                self._stop_args = (self._engine, inbox, self._loop, self._thread, timeout)
                self._mark_stopped()  # (first: a handler registered from now on is refused, not left uncalled)
                run_here = self._begin_stop_once_more_if_interrupted()
            elif self._stop_undone():  # (one whose thread a Ctrl-C kept from running)
                run_here = self._begin_stop_once_more_if_interrupted()
            self._mark_stopped()
            stopper = self._stopper
        at_exit.stopped(self)  # (once its stop began: one refused on the I/O thread leaves it to the exit)
        if run_here is not None:  # (on this thread, the lock let go: a handler calling stop() meanwhile returns)
            stop_blocking(*run_here)
            return
        inbox = self._engine.inbox
        requests = self._engine.requests
        if stopper is None or stopper is threading.current_thread() or \
                (isinstance(inbox, ThreadInbox) and inbox.runs_handlers_here()) or \
                (isinstance(requests, ThreadRequesters) and requests.on_submit_thread()):
            # (a handler, or a done-callback of a submitted request, does not wait: the stop
            # waits for the handlers, and for the submit thread to end)
            if stopper is not None and stopper.daemon and stopper is not threading.current_thread():
                # (that stop runs on a daemon thread: a program ending meanwhile cut its drain
                # short, unsaid; the exit waits for it instead)
                at_exit.running(self, Node._finish_stop_at_exit, self.config.linger_s + timeout + 2.0)
            return
        stopper.join()  # (also a second call: it waits for the first's stop)

    def _begin_stop_once_more_if_interrupted(self) -> tuple[Any, ...] | None:
        """`_begin_stop`; interrupted (a Ctrl-C) before its thread ran, it begins the stop
        once more before the interrupt goes on (under `_lock`)."""
        try:
            return self._begin_stop()
        except BaseException:
            if self._stop_undone():
                self._begin_stop()
            raise

    def _begin_stop(self) -> tuple[Any, ...] | None:
        """Start the thread that runs the stop, `_stopper` (under `_lock`); None, or the
        arguments of `stop_blocking` for the caller to run it itself (Python 3.12.0 and
        3.12.1 start no thread at the interpreter's exit)."""
        inbox = self._engine.inbox
        began = self._stopper_began = threading.Lock()
        self._stopper = threading.Thread(target=self._run_stop, args=(began, self._stop_args),
                                         name=f"zmqmesh-stop-{self.name}",
                                         daemon=isinstance(inbox, ThreadInbox) and inbox.runs_handlers_here())
        try:
            self._stopper.start()
        except RuntimeError:
            self._stopper = None
            self._stop_handed = True
            return self._stop_args
        self._stop_handed = True
        return None

    def _stop_undone(self) -> bool:
        """Whether a stop began whose thread an interrupt (a Ctrl-C) kept from running: it
        never will now (under `_lock`; `_begin_stop` begins it again)."""
        return self._stop_args is not None and not self._stop_handed and self._stopper_began.acquire(blocking=False)

    @staticmethod
    def _run_stop(began: threading.Lock, stop_args: tuple[Any, ...]) -> None:
        if began.acquire(blocking=False):  # (else a stop whose start was interrupted began another)
            stop_blocking(*stop_args)

    def run_forever(self) -> None:
        """Start the node (if it is not running) and serve until SIGINT or SIGTERM, or until
        the node is stopped, then stop it cleanly and return.

        Installs its signal handlers for the time it runs, the start and the stop included
        (a signal then only asks for the stop, once), and restores the previous ones
        after (a child forked meanwhile gets the previous ones back); so it must be called
        from the main thread: raises `ZmqMeshError` from any other, and what `start` raises.
        A signal ignored when it is called (inherited from a parent that ignored SIGTERM
        or SIGINT: a shell script's background job ignores SIGINT) stays ignored: only
        the other one, or a `stop` from another thread, ends it.
        """
        if threading.current_thread() is not threading.main_thread():
            raise ZmqMeshError("run_forever() handles SIGINT and SIGTERM: call it from the main thread")
        import signal  # (here: a node that never runs forever does not load it)

        stop = StopFlag()  # (not a threading.Event: see StopFlag)
        handler = stop.set
        previous = {sig: signal.getsignal(sig) for sig in not_ignored((signal.SIGINT, signal.SIGTERM))}
        serving({sig: (handler, replaced) for sig, replaced in previous.items()})  # (put back in a forked child)
        try:
            for sig in previous:
                signal.signal(sig, handler)
            try:
                self.start()
                with self._lock:
                    self._serving.append(stop)
                    if self._stopped:  # (stopped by another thread already)
                        stop.set()
                stop.wait()
            finally:
                with self._lock:
                    if stop in self._serving:
                        self._serving.remove(stop)
                    thread = self._thread
                self.stop()
                if thread is not None:  # (a stop begun by another thread: return once the I/O thread ended)
                    thread.join(self.config.linger_s + _STOP_WAIT_S)
        finally:
            served()
            for sig, replaced in previous.items():
                signal.signal(sig, replaced)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # messaging ------------------------------------------------------------------------------------

    def publish(self, topic: str, data: Any, *, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` on ``topic`` to every node subscribed to a prefix of it (this one too).

        Returns once queued; order per publisher is kept. ``headers`` (a ``dict[str, str]``,
        at most 64 of them, 16 KiB in all) travel with it. Raises `EncodeError` (a
        ``TypeError``) for data msgpack cannot encode or bad headers, `ConfigError` (a
        ``ValueError``) for headers past those bounds or a bad topic,
        `MessageTooLargeError`, `NodeClosedError` if the node is not running,
        `MeshTimeoutError` if the publish queue stays full (``send_queue_max`` messages, or
        ``send_queue_max_bytes``: the node sends more slowly than its callers publish) for
        ``push_timeout_s``.
        """
        pending = self._publish_now(topic, data, headers)
        if pending is not None:  # (the publish queue could not take it yet)
            self._runner.run(self._publish_many_plan([pending]))

    def push(self, queue: str, data: Any, timeout: float | None = None, *, durable: bool = False,
             headers: dict[str, str] | None = None) -> None:
        """Send ``data`` to exactly one node pulling ``queue`` (load-balanced round-robin).

        Waits up to ``timeout`` (default ``push_timeout_s``) for a puller to exist and for
        room in the send queue. ``headers`` (a ``dict[str, str]``) travel with it. Raises
        `NoProviderError` if nobody pulls ``queue``, `MeshTimeoutError` if the pullers do
        not keep up (from a handler of this node when only this node pulls ``queue`` and
        it runs one handler at a time, as soon as ZeroMQ holds all it takes, or an
        at-least-once queue's window of unacknowledged messages is full: nothing
        would take the queue's messages until the push returned), `EncodeError` (a
        ``TypeError``) for unencodable data or headers, `ConfigError` (a ``ValueError``)
        for headers past their bounds (64 of them, 16 KiB in all) or a bad queue name.

        With ``durable=True`` (needs a store) the message is committed to this node's
        store before ``push`` returns and delivered at least once to an at-least-once
        puller, whenever one is there, also after this node restarts. Raises
        `StoreFullError` when the store is full, `ConfigError` without one (and for a
        ``durable`` that is neither True nor False: a truth test read ``"no"`` as on).
        """
        if durable is not False and check_switch(durable, "durable"):  # (a NumPy False: not durable)
            self._commit_durable(queue, (data,), headers)
            return
        body = self._push_now(queue, data, headers, timeout)
        if body is not None:  # (the queue could not take it yet)
            self._runner.run(self._push_many_plan(queue, [body], timeout))

    def push_many(self, queue: str, items: Iterable[Any], timeout: float | None = None, *, durable: bool = False,
                  headers: dict[str, str] | None = None) -> None:
        """`push` each of ``items``, in order, much faster than one `push` each: all are
        encoded first (one that cannot be encoded fails the call before any is sent), then
        queued as room allows. With ``durable=True`` all of them are committed in one
        transaction before this returns, or none is. Raises as `push` does (`EncodeError`
        names the item that cannot be encoded by its index), `ArgumentTypeError` (a
        ``TypeError``) for ``items`` that cannot be iterated; a timeout part-way leaves the
        items before it sent."""
        if durable is not False and check_switch(durable, "durable"):  # (a NumPy False: not durable)
            self._commit_durable(queue, items, headers)
            return
        self._runner.run(self._push_many_plan(queue, self._encode_many("push", queue, items, headers), timeout))

    def publish_many(self, topic: str, items: Iterable[Any], *, headers: dict[str, str] | None = None) -> None:
        """`publish` each of ``items`` on ``topic``, in order, much faster than one `publish`
        each: all are encoded first (one that cannot be encoded fails the call before any
        is sent), then queued as room allows. Raises as `publish` does (and as `push_many`
        does for the items); a timeout part-way (the queue held ``send_queue_max`` messages
        or ``send_queue_max_bytes`` for ``push_timeout_s``) leaves the items before it sent."""
        self._runner.run(self._publish_many_plan(self._encode_publications(topic, items, headers)))

    def _commit_durable(self, queue: str, items: Iterable[Any], headers: dict[str, str] | None) -> None:
        ticket = self._durable_ticket(queue, items, headers)
        if ticket is not None:
            self._engine.durable.commit_in_turn(ticket)  # type: ignore[union-attr]

    def request(self, service: str, data: Any = None, timeout: float | None = None, peer: str | Peer | None = None,
                *, headers: dict[str, str] | None = None) -> Any:
        """Call ``service`` on one provider (round-robin, or the given ``peer``) and return its reply.

        Waits up to ``timeout`` (default ``request_timeout_s``) in all; with ``timeout=0``
        nothing is sent, and it raises `MeshTimeoutError` at once. Raises
        `NoProviderError` (nobody offers it), `MeshTimeoutError`, `PeerLostError` (the
        provider left mid-request, raised as soon as that is known), `RemoteError` (the
        handler raised), `EncodeError` (a ``TypeError``) for unencodable data or headers,
        `ConfigError` (a ``ValueError``) for a bad service name or headers past their bounds,
        `ArgumentTypeError` (a ``TypeError``) for a ``peer`` that is neither a `Peer` nor an
        id, `MessageTooLargeError` for data larger than this node's ``max_message_bytes``
        or than every provider announced it takes (a provider that takes it is picked over
        one that does not).
        """
        engine = self._engine
        if engine.on_loop_thread():
            raise ZmqMeshError("Node.request would block the node's own I/O thread")
        # the thread's requester, once it made one, is looked up once for the whole call: its
        # packer encodes the data (else the codec looks the thread's up), and it sends the request
        requests = engine.requests
        requester = getattr(requests.here, "requester", None) if type(requests) is ThreadRequesters else None
        calls, body, calling = self._encoded_call(service, data, timeout, peer, headers, True,
                                                  None if requester is None else requester.packer)
        if calling is not None:
            return self._runner.request(calling, body, calls.seconds, requester)
        return self._runner.run(self._plan_call(calls, body))

    def request_many(self, service: str, items: Iterable[Any], timeout: float | None = None,
                     peer: str | Peer | None = None, *, window: int = 64,
                     headers: dict[str, str] | None = None) -> list[Any]:
        """Call ``service`` once per item of ``items`` and return the replies, in order.

        Up to ``window`` requests are in flight at once, from this thread, on one socket per
        provider (no thread per request); each is sent as soon as there is room, and round
        robin spreads them over the providers (from a sequence of items, those that go to
        one provider together travel in batches). Each request waits up to ``timeout``
        (default ``request_timeout_s``) from when it is sent; a window past what the socket
        to a provider holds (``send_hwm`` frames it has not read) waits for room, each
        request within its timeout (back-pressure). Raises what `request` raises,
        for the first item (in order) that failed: once one failed no more are sent, and
        the items before it are waited for; the requests still in flight are then
        forgotten (their late replies are dropped and counted), those after it that
        had already gone with the items before it too (items at hand go in batches, which
        may leave before the failing item is found unable to go). An item that cannot be
        encoded raises `EncodeError` (naming its index) as soon as its turn comes, without
        waiting: the requests in flight are forgotten, and those not sent yet never go.
        `ConfigError` (a `ValueError`) for a ``window`` that is not an int >= 1,
        `ArgumentTypeError` (a ``TypeError``) for ``items`` that cannot be iterated.
        """
        check_window(window)
        if self._engine.on_loop_thread():
            raise ZmqMeshError("Node.request_many would block the node's own I/O thread")
        self._engine.ensure_running()
        requesters = self._engine.requests
        assert isinstance(requesters, ThreadRequesters)
        calls = self._request_calls(service, items, timeout, peer, headers)
        requester = requesters.current()
        # (imported first: not under the lock a stop waits for)
        from ._drivers.pipelined import run_many

        try:
            with requester.in_use:  # (its sockets: a stop closes them only once this call is over)
                requester.check_open()
                # items in a sequence are at hand: their requests go in batches; those of an
                # iterator go as they come (its next item may take its time)
                return run_many(requester.pipelined(), calls, window, at_hand=isinstance(items, Sequence))
        finally:
            requester.after_call()

    def submit(self, service: str, data: Any = None, timeout: float | None = None, peer: str | Peer | None = None,
               *, headers: dict[str, str] | None = None) -> Future[Any]:
        """Send a request to ``service`` and return at once the `concurrent.futures.Future`
        of its reply; the future raises what `request` raises.

        Any number of threads may submit; one thread of the node sends them all and reads
        the replies, so many requests are in flight without a thread each. At most
        `MAX_SUBMITTED` (4,096) are in flight: past that, the call waits for room, within
        ``timeout``. A submitted request cannot be cancelled. Raises at once
        `NodeClosedError`, `EncodeError` (a ``TypeError``) for unencodable data, and
        `MeshTimeoutError` when no room freed up in time.

        The futures complete on that thread of the node, so their done-callbacks run
        there (those a stop fails may complete on another thread of the node, or on one
        calling `submit` meanwhile): keep them short, and never wait in one for another
        future (nothing else completes meanwhile). A request made from one (`request`,
        `request_many`) raises `ZmqMeshError`; `submit` from one never waits for room
        (`MeshTimeoutError` at once when there is none).
        """
        if self._engine.on_loop_thread():
            raise ZmqMeshError("Node.submit would block the node's own I/O thread")
        seconds = self.config.request_timeout_s if timeout is None else check_timeout(timeout)
        self._engine.ensure_running()
        requesters = self._engine.requests
        assert isinstance(requesters, ThreadRequesters)
        return requesters.submitter().submit(
            lambda: self._request_call(service, data, seconds, peer, headers, blocking=False),
            time.monotonic() + seconds)

    def node_stats(self, peer: str | Peer, timeout: float = 5.0) -> dict[str, Any]:
        """Ask a zmqmesh peer (or this node) for its counters, as `stats` returns them there.

        Raises as `request` does, and `DecodeError` for an answer that is not a map.
        """
        result: dict[str, Any] = self._runner.run(self._node_stats_plan(peer, timeout))
        return result

    def whisper(self, peer_id: str, *frames: bytes | str) -> None:
        """Send a ZRE WHISPER (raw frames) to one peer, zmqmesh or plain ZRE.

        Raises `ZmqMeshError` for an unknown peer or a full send buffer, `ConfigError` (a
        ``ValueError``) for no frame, `EncodeError` (a ``TypeError``) for a frame that is
        not bytes or str, `ArgumentTypeError` (a ``TypeError``) for a ``peer_id`` that is
        no str.
        """
        self._call(self._engine.whisper, check_peer_id(peer_id), as_frames(frames))

    def shout(self, group: str, *frames: bytes | str) -> int:
        """Send a ZRE SHOUT (raw frames) to every peer in ``group``; returns how many got it.
        Raises `ConfigError` (a ``ValueError``) for a group name no group has (`check_group`:
        text of 1 to 255 bytes, not beginning with ``zmqmesh/``) or no frame, `EncodeError`
        (a ``TypeError``) for a frame that is not bytes or str, `NodeClosedError` unless the
        node runs."""
        return int(self._call(self._engine.shout, check_group(group), as_frames(frames)))

    def join(self, group: str) -> None:
        """Join a ZRE group (to receive its shouts). Raises `ConfigError` (a ``ValueError``)
        for a reserved or bad name (as `shout`), `NodeClosedError` unless the node runs."""
        self._call(self._engine.join_group, check_group(group))

    def leave(self, group: str) -> None:
        """Leave a ZRE group (nothing happens if this node is not in it). Raises
        `ConfigError` (a ``ValueError``) for a reserved or bad name (as `shout`),
        `NodeClosedError` unless the node runs."""
        self._call(self._engine.leave_group, check_group(group))

    def _call(self, fn: Any, *args: Any) -> Any:
        self._check_open()
        return self._engine.call_on_loop(fn, *args)

    # waiting ----------------------------------------------------------------------------------------

    def wait_for_peers(self, n: int, timeout: float = 10.0) -> list[Peer]:
        """Block until at least ``n`` peers are present; returns them. A peer is present once
        it is known and its subscriptions are in place at this node's publisher: what this
        node publishes afterwards reaches every matching subscriber among them. Raises
        `MeshTimeoutError`."""
        peers: list[Peer] = self._runner.run(self._peers_plan(n, timeout))
        return peers

    def wait_for_subscribers(self, topic: str, n: int, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes' subscriptions matching ``topic`` are in place at this publisher.

        Uses the XPUB's subscription events, not a sleep: what is published afterwards
        reaches them. Raises `MeshTimeoutError`.
        """
        self._runner.run(self._subscribers_plan(topic, n, timeout))

    def wait_for_service(self, name: str, n: int = 1, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes offer service ``name``. Raises `MeshTimeoutError`."""
        self._runner.run(self._offer_plan("services", name, n, timeout))

    def wait_for_pullers(self, queue: str, n: int = 1, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes pull ``queue``. Raises `MeshTimeoutError`."""
        self._runner.run(self._offer_plan("queues", queue, n, timeout))

    def wait_for_keepers(self, queue: str, n: int = 1, timeout: float = 10.0) -> None:
        """Block until ``n`` nodes keep ``queue`` (see `keep`). Raises `MeshTimeoutError`."""
        self._runner.run(self._offer_plan("keepers", queue, n, timeout))

