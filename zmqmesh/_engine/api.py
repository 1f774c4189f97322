"""What `Node` and `AsyncNode` share: registration, the read-only views, and the logic of
every call as a plan of steps. The two node kinds differ only in how they carry out the
steps that wait (a blocking driver, or an awaiting one).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

import zmq

from .._membership.engine import MAX_GROUP_BYTES
from .._mesh.directory import no_provider
from .._mesh.registry import PullOptions, Registry, SubscribeOptions
from .._mesh.waiters import Room, Until
from .._observe import tracing
from .._patterns.calls import serving_chain
from .._patterns.pubsub import Publisher
from .._patterns.reqrep import MAX_CHAIN, Calling, Exchange, QuickRequest, request_plan
from .._stats import RequestTally
from .._wire.frames import (
    HISTORY_SERVICE,
    HISTORY_SERVICE_BYTES,
    LARGE_FRAME,
    MAX_NAME_BYTES,
    RESERVED_NAME_PREFIX,
    STATS_SERVICE,
    STATS_SERVICE_BYTES,
    Headed,
    RawPayload,
    check_headers,
    dead_letter_queue,
    pullable,
    wire_size,
)
from ..config import LONGEST_WAIT_S, NodeConfig, check_switch
from ..errors import (
    ArgumentTypeError,
    ConfigError,
    DecodeError,
    EncodeError,
    MeshTimeoutError,
    NodeClosedError,
    NoProviderError,
    ZmqMeshError,
)
from ..message import Message, Peer
from .engine import RESERVED_GROUP_PREFIX, Engine, InboxFactory, RequestsFactory

log = logging.getLogger("zmqmesh.node")

if TYPE_CHECKING:
    import msgpack

    from .._patterns.durable import Ticket
    from .._patterns.replay import Fetch

__all__ = ["NodeBase", "OnLoop", "Plan", "advance", "advance_call", "check_name", "check_window",
           "peer_id_of", "check_peer_id", "as_frames", "check_group", "check_items"]

Handler = TypeVar("Handler", bound=Callable[..., Any])

_NAME_CACHE_MAX = 4096
_PLAIN_PEERS = (type(None), str)
_PLAIN_TIMEOUTS = (type(None), int, float)


_NO_NODES: frozenset[str] = frozenset()


class _Calls:
    """What the calls of one service from one thread share (`NodeBase._prepare_calls`).
    (Slots, not a named tuple: its fields are read on the path of every request, and a
    named tuple's cost a generic lookup each.)"""

    __slots__ = ("service", "service_b", "seconds", "only", "chain", "blocked", "headers", "calling")

    def __init__(self, service: str, service_b: bytes, seconds: float, only: str | None, chain: tuple[str, ...],
                 blocked: frozenset[str], headers: dict[str, str] | None, calling: Calling | None) -> None:
        self.service = service
        self.service_b = service_b
        self.seconds = seconds  # each call's timeout
        self.only = only  # the provider asked for, if any
        self.chain = chain  # the nodes that wait for these calls (see `serving_chain`)
        self.blocked = blocked
        self.headers = headers
        self.calling = calling  # when the calls may go the quick way (`QuickRequest`)

    def quick(self) -> Calling | None:
        """What a call of these goes the quick way with now (`QuickRequest`): `calling`, but
        none while traces are on (a traced call has its span, and headers)."""
        return self.calling if tracing.active is None else None


class ItemCalls:
    """The calls of a batch call's items (`NodeBase._request_calls`), made as its driver has
    room for them (`take`), several at once: the items of a list or a tuple (read ahead
    without a side effect) are encoded by one map of the codec's packer (`Codec.packed`),
    with no Python step per item; those of any other iterable are taken and encoded one by
    one, none before its turn. Either way each item raises what it raises in its turn."""

    def __init__(self, node: NodeBase, service: str, items: Iterable[Any], timeout: float | None,
                 peer: str | Peer | None, headers: dict[str, str] | None) -> None:
        self._items = check_items(items)
        self._listed = items if type(items) is list or type(items) is tuple else None
        self._at = 0  # (the index of the next item)
        self._node = node
        self._call = (service, timeout, peer, headers)
        self._calls: _Calls | None = None

    def take(self, count: int) -> tuple[list[Plan | QuickRequest], Exception | None]:
        """The calls of the next ``count`` items (fewer: the items ran out), and what making
        the one after them raised, if anything: the error to raise once those are begun
        (none is made after it)."""
        made: list[Plan | QuickRequest] = []
        try:
            if self._calls is None:  # the first item: what its data raises comes before the rest
                self._one_by_one(1, made)
                count -= len(made)
            listed, calls, node = self._listed, self._calls, self._node
            if not count or calls is None:
                return made, None
            if listed is None or not node.running:  # (a forked or stopped node: `_encode_call` raises what it must)
                self._one_by_one(count, made)
                return made, None
            chunk = listed[self._at:self._at + count]
            if not chunk:
                return made, None
            bodies = node._engine.codec.packed(chunk)
            if bodies is None:  # one of them cannot be encoded (or is too large): which, and where, said in its turn
                self._one_by_one(count, made)
                return made, None
            self._at += len(bodies)
            quick_or_plan, calling = node._quick_or_plan, calls.quick()
            for body in bodies:
                made.append(quick_or_plan(calls, body, calling))
        except Exception as exc:
            return made, exc
        return made, None

    def _one_by_one(self, count: int, made: list[Plan | QuickRequest]) -> None:
        """Make the calls of the next ``count`` items into ``made``, each item taken and
        encoded in its turn; raises what the first that fails raises."""
        node, listed, at = self._node, self._listed, self._at
        encode = node._engine.codec.encode
        for data in (islice(self._items, count) if listed is None else listed[at:at + count]):
            # (a forked or stopped node: `_encode_call` raises what it must)
            body = encode(data, self._at) if node.running else node._encode_call(data)
            self._at += 1
            calls = self._calls
            if calls is None:
                calls = self._calls = node._prepare_calls(*self._call)
            made.append(node._quick_or_plan(calls, body, calls.quick()))


class OnLoop(NamedTuple):
    """Run ``fn(*args)`` on the node's loop and send back its result."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


Plan = Generator["Until | Room | Exchange | OnLoop", Any, Any]
"""The logic of one call: it yields the steps that wait, and returns the call's result."""


def advance(plan: Generator[Any, Any, Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``plan`` with the outcome of its last step: ``(False, next step)``, or
    ``(True, result)`` once it finished. Raises what the plan raises; a raw ZeroMQ error
    becomes `ZmqMeshError`."""
    try:
        return False, (plan.send(value) if error is None else plan.throw(error))
    except StopIteration as done:
        return True, done.value
    except zmq.ZMQError as exc:
        raise ZmqMeshError(f"ZeroMQ failed: {exc}") from exc


def advance_call(call: Plan | QuickRequest, value: Any, error: BaseException | None,
                 tally: RequestTally | None) -> tuple[Plan | QuickRequest, bool, Any]:
    """`advance` for a plan or a `QuickRequest` (whose driver's ``tally`` it counts into):
    ``(the call, finished, next step or result)``, where the call is the request's plan
    once the quick way ended (given the same outcome). Raises what `advance` raises."""
    while isinstance(call, QuickRequest):
        assert tally is not None, "a quick request needs its driver's tally"
        finished, step = call.advance(value, tally) if error is None else (False, None)
        if finished or step is not None:
            return call, finished, step
        call = call.plan()
    return (call, *advance(call, value, error))


_FORKS = [0]  # how many forks this process descends from, since zmqmesh was imported
os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))


def fetch_plan(engine: Engine, fetch: Fetch, timeout: float = 10.0) -> Plan:
    """Ask a publisher for a page of its history, for a replaying subscription (see
    `_patterns.replay`), of no more rows than this node takes in one message (``"b"``:
    half its ``max_message_bytes``, the rest left for the page's numbers). Raises as
    `request` does; `NoProviderError` at once for a publisher not present (a request waits
    out its timeout for a provider to come: a sync node reads pages one at a time, and
    each read of a publisher gone held every other subscription's for 10 s; its
    subscription looks again for it while it is away: `Replays._retry`)."""
    if fetch.node_id not in engine.directory.alive_ids:
        raise no_provider(HISTORY_SERVICE, fetch.node_id)
    body = engine.codec.encode({**fetch.request, "b": max(1, engine.codec.max_message_bytes // 2)})
    return request_plan(engine.directory, engine.codec, HISTORY_SERVICE, HISTORY_SERVICE_BYTES, body,
                        time.monotonic() + timeout, fetch.node_id, None, engine.stats)


_ID_SUFFIXES = tuple(f".{i:x}" for i in range(256))  # (a run of ids: one number formatted per 256)
_LONGEST_S = sys.float_info.max  # (NaN fails every comparison, so the chained check rejects it, as it does infinity)


def check_timeout(value: Any, name: str = "timeout") -> float:
    """``value`` as seconds to wait: a finite number >= 0, at most `LONGEST_WAIT_S` (a
    longer one waits that long). Raises `ConfigError` (a `ValueError`) for anything else:
    NaN, a negative or infinite number, one too large for a float, a non-number."""
    # (exact types first: the common case, per call, skips the isinstance checks)
    number = type(value) is float or type(value) is int or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if number and 0 <= value <= LONGEST_WAIT_S:
        return float(value)
    if number and 0 <= value <= _LONGEST_S:
        return LONGEST_WAIT_S
    shown = repr(value)
    raise ConfigError(f"{name} must be a finite number of seconds >= 0, got "
                      f"{shown if len(shown) <= 60 else shown[:57] + '...'}")


def check_window(window: Any) -> int:
    """``window`` as a number of requests in flight: an int >= 1. Raises `ConfigError`
    (a `ValueError`) for anything else."""
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= sys.maxsize:
        raise ConfigError(f"window must be an int from 1 to {sys.maxsize}, got {window!r}")
    return window


def check_count(n: Any, what: str = "n") -> int:
    """``n`` as a number of nodes to wait for: an int >= 0. Raises `ConfigError` (a
    `ValueError`) for anything else (NaN or a fraction could never be met, and waited out
    the whole timeout; a str failed with a bare ``TypeError``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{what} must be a whole number >= 0, got {n!r}")
    return n


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid topic, queue or service name. Raises `ConfigError` (a
    ``ValueError``)."""
    size = _utf8_size(name) if isinstance(name, str) else None
    if size is None or size > MAX_NAME_BYTES or (kind != "topic" and not name):
        raise ConfigError(f"a {kind} must be a string (text UTF-8 can encode) of at most {MAX_NAME_BYTES} bytes"
                         + ("" if kind == "topic" else ", not empty"))
    return name


def check_group(group: object) -> str:
    """``group`` if it can name a user's ZRE group: text of 1 to `MAX_GROUP_BYTES` bytes in
    UTF-8, not beginning with ``zmqmesh/`` (zmqmesh's own groups: leaving one would withdraw
    this node's offer from its peers behind its back). Raises `ConfigError` (a ``ValueError``)."""
    size = _utf8_size(group) if isinstance(group, str) else None
    if not isinstance(group, str) or not size or size > MAX_GROUP_BYTES:
        raise ConfigError(f"a group must be a string (text UTF-8 can encode) of 1 to {MAX_GROUP_BYTES} bytes, "
                         f"got {f'{group!r}'[:60]}")
    if group.startswith(RESERVED_GROUP_PREFIX):
        raise ConfigError(f"group names beginning with {RESERVED_GROUP_PREFIX!r} are reserved: {group!r}")
    return group


MAX_NODE_NAME_BYTES = 255
"""Longest node name, in UTF-8 bytes: the name travels in every HELLO, as a ZRE string."""


def check_node_name(name: object) -> str | None:
    """``name`` if it can name a node: None (a name is made) or text of at most
    `MAX_NODE_NAME_BYTES` bytes in UTF-8. Raises `ConfigError` otherwise (a longer one was
    taken, and every HELLO the node made then failed: it could meet no peer)."""
    if name is None:
        return None
    size = _utf8_size(name) if isinstance(name, str) else None
    if not isinstance(name, str) or size is None or size > MAX_NODE_NAME_BYTES:
        raise ConfigError(f"a node's name must be a string (text UTF-8 can encode) of at most {MAX_NODE_NAME_BYTES} "
                          f"bytes, got {f'{name!r}'[:60]}")
    return name


def _check_not_reserved(kind: str, name: str) -> None:
    """Raises `ConfigError` (a ``ValueError``) for a name of the built-in services (they
    begin with ``\\x00``): a handler registered under one would never be called, and its
    callers would be refused by the built-in."""
    if name.startswith(RESERVED_NAME_PREFIX):
        raise ConfigError(f"a {kind} name may not begin with \\x00 (reserved for built-in services): {name!r}")


def _utf8_size(text: str) -> int | None:
    """The bytes of ``text`` in UTF-8; None if UTF-8 cannot encode it (a lone surrogate,
    from bytes decoded with ``surrogateescape``, cannot)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return None


def peer_id_of(peer: str | Peer | None) -> str | None:
    """The id of a `Peer`, or the id given. Raises `ArgumentTypeError` (a ``TypeError``)
    for anything else."""
    if isinstance(peer, Peer):
        return peer.id
    if peer is not None and not isinstance(peer, str):
        raise ArgumentTypeError(f"peer must be a Peer or a node id (str), got {type(peer).__name__}")
    return peer


def check_peer_id(peer_id: object) -> str:
    """``peer_id`` if it can name the peer of a whisper: a node id (str; an unknown one is
    refused where it is looked up). Raises `ArgumentTypeError` (a ``TypeError``) otherwise."""
    if not isinstance(peer_id, str):
        raise ArgumentTypeError(f"peer_id must be a node id (str), got {type(peer_id).__name__}")
    return peer_id


class _UnencodableFrame(ConfigError, UnicodeEncodeError):
    """A frame's text UTF-8 cannot encode: a `ConfigError`, still the ``UnicodeEncodeError``
    ``str.encode`` raised (callers catching that keep working)."""


def as_frames(frames: tuple[bytes | str, ...]) -> list[bytes]:
    """Raw ZRE frames from bytes (or a bytes-like object) or str (in UTF-8). Raises
    `ConfigError` (a ``ValueError``) for none or for text UTF-8 cannot encode (a lone
    surrogate; then also the ``UnicodeEncodeError`` it was), `EncodeError` (a
    ``TypeError``) for a frame of another type (``bytes(5)`` would have made five zero
    bytes of an int)."""
    if not frames:
        raise ConfigError("at least one frame is needed")
    out = []
    for index, frame in enumerate(frames):
        if isinstance(frame, str):
            try:
                out.append(frame.encode())
            except UnicodeEncodeError as exc:
                raise _UnencodableFrame(exc.encoding, exc.object, exc.start, exc.end,
                                        f"frame {index}: {exc.reason}") from exc
        elif isinstance(frame, (bytes, bytearray, memoryview)):
            out.append(bytes(frame))
        else:
            raise EncodeError(f"frame {index} must be bytes or str, got {type(frame).__name__}")
    return out


def check_items(items: object) -> Iterator[Any]:
    """The iterator over ``items`` (the items of a batch call), for the call to take them
    from: asked for once, as a for loop asks (a second ``iter()`` of an iterable that
    hands its items over found none). Raises `ArgumentTypeError` (a ``TypeError``) if
    ``items`` cannot be iterated."""
    try:
        return iter(items)  # type: ignore[call-overload, no-any-return]  # (a class with __getitem__ only passes)
    except TypeError:
        raise ArgumentTypeError(f"items must be an iterable of payloads, got {type(items).__name__}") from None


def _sent_traced(active: Any, operation: str, name: str, headers: dict[str, str] | None) -> dict[str, str]:
    """``headers`` carrying the context of a span for sending to ``name`` (ended at once:
    a publish or a push is done once queued)."""
    span = tracing.send_span(active, operation, name, "PRODUCER")
    try:
        return tracing.inject(span, headers)
    finally:
        span.end()


def _traced_plan(plan: Plan, span: Any) -> Plan:
    """``plan``, with ``span`` ended when it ends (failed if it raised)."""
    try:
        return (yield from plan)
    except Exception as exc:
        tracing.fail(span, exc)
        raise
    finally:
        span.end()


def _counters_answer(plan: Plan) -> Plan:
    """``plan``, a call of the built-in stats service, whose answer must be a map (of any
    shape: another version's counters are its own). Raises `DecodeError` for another."""
    answer = yield from plan
    if not isinstance(answer, dict):
        raise DecodeError(f"the counters a peer answered are not a map but {type(answer).__name__}")
    return answer


class NodeBase:
    """Registration of handlers, the read-only views, and the plans of the calls."""

    def __init__(self, name: str | None, config: NodeConfig, inbox_factory: InboxFactory,
                 requests_factory: RequestsFactory) -> None:
        check_node_name(name)
        self.config = config
        self._registry = Registry()
        self._engine = Engine(name or "", self.config, self._registry, inbox_factory, requests_factory)
        self._pid = os.getpid()  # a node serves the process that built it (see _check_process)
        self._forks = _FORKS[0]
        self._stopped = False
        self._stop_lock = threading.Lock()
        """Held while a handler is admitted or removed and while the node is marked stopped
        (`_mark_stopped`): a registration racing a stop from another thread is either made
        before the stop begins, or refused; and the registry's tables, each copied, changed
        and put back, change for one caller at a time (a removal racing a registration
        lost it, or brought back what another thread removed)."""
        # message ids, unique without a uuid4 each: this run's node id (random) and a counter
        # (made by C code alone: no Python call per id)
        self._ids = map(f"{self._engine.node_id[:24]}-{{:x}}".format, itertools.count(1))
        self._topic_names: dict[str, bytes] = {}
        self._service_names: dict[str, bytes] = {STATS_SERVICE: STATS_SERVICE_BYTES}
        self._plain_calls: dict[tuple[str, Any, Any], _Calls] = {}  # (see `_prepare_calls`)

    def _next_id(self) -> str:
        """A message id, unique without a uuid4 each: this run's node id (random) and a counter."""
        return next(self._ids)

    def _id_run(self, n: int) -> list[str]:
        """``n`` message ids for the messages of one call, without formatting a number for
        each: a `_next_id` per 256 of them (a number of the counter names one id or one
        run, never both), the messages under it numbered after a dot."""
        ids: list[str] = []
        while len(ids) < n:
            ids += map(next(self._ids).__add__, _ID_SUFFIXES[:n - len(ids)])
        return ids

    def _check_process(self) -> None:
        """Raises `ZmqMeshError` in a process forked after this node was built: its identity
        (and any thread it started) belongs to the parent, and every child would share it.
        (An integer compare: it guards the hot paths too.)"""
        if self._forks != _FORKS[0]:
            raise ZmqMeshError(f"this node was built in process {self._pid}, before a fork; build a node in "
                               "each process that uses one (after the fork)")

    def _forked(self) -> bool:
        """Whether this process was forked after the node was built."""
        return self._forks != _FORKS[0]

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else
                                                ("built before a fork" if self._forked() else "not started"))
        return f"<{type(self).__name__} {self.name!r} id={self.id[:8]} {state}>"

    # identity ------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """This node's ZRE UUID as 32 hex characters."""
        return self._engine.node_id

    @property
    def name(self) -> str:
        """This node's name."""
        return self._engine.name

    @property
    def endpoints(self) -> dict[str, str]:
        """The bound endpoints: ``mailbox`` (ZRE), ``pub`` (XPUB), ``sub``, ``pull``, ``service``.

        Raises `NodeClosedError` unless the node runs.
        """
        return self._engine.endpoints()

    @property
    def metrics_endpoint(self) -> str | None:
        """Where this node serves Prometheus metrics (``metrics_port``): the URL of its
        ``/metrics``, or None when it serves none (none was asked for, or the node stopped)."""
        server = self._engine.metrics
        if server is None or server.closed:
            return None
        address = self.config.metrics_address
        host = f"[{address}]" if ":" in address else address  # (an IPv6 address, as a URL writes it)
        return f"http://{host}:{server.port}/metrics"

    @property
    def discovery(self) -> str:
        """How this node looks for peers, for messages: e.g. ``"beacons on
        127.255.255.255:5670"``, ``"beacons off, seeds tcp://10.0.0.5:50001"``."""
        return self._engine.discovery

    @property
    def running(self) -> bool:
        """True between `start` and `stop`, in the process that started the node (never in a
        child forked from it, where the node's threads do not exist)."""
        return not self._engine.closed and self._forks == _FORKS[0]

    # registration ---------------------------------------------------------------------------

    def _register(self, kind: str, name: str, handler: Callable[..., Any] | None,
                  then: Callable[[Callable[..., Any]], None] | None = None,
                  check: Callable[[Callable[..., Any]], None] | None = None) -> Any:
        """Register ``handler`` (or return a decorator that does); ``check(handler)`` first
        (it raises to refuse it), and ``then(handler)`` records its options, only if the
        registration succeeds (a failed one leaves nothing), and before the name is offered
        (`Registry.add`: the loop, announcing the offers, never finds a queue pulled
        at-least-once offered as a plain one).
        Raises `ArgumentTypeError` (a ``TypeError``) for a handler that cannot be called,
        `NodeClosedError` once the node was stopped, `ZmqMeshError` in a process forked
        after it was built (nothing would ever call it)."""
        def decorate(fn: Handler) -> Handler:
            if not callable(fn):
                raise ArgumentTypeError(f"a handler must be callable, got {type(fn).__name__}")
            self._check_process()  # (before the lock: a parent's thread may have held it at the fork)
            with self._stop_lock:
                self._refuse_if_stopped()
                if check is not None:
                    check(fn)
                self._registry.add(kind, name, fn, None if then is None else lambda: then(fn))
            self._engine.registry_changed()
            return fn

        return decorate(handler) if handler is not None else decorate

    @overload
    def subscribe(self, prefix: str, handler: None = None, *, replay: str | float = "new",
                  durable_name: str | None = None) -> Callable[[Handler], Handler]: ...

    @overload
    def subscribe(self, prefix: str, handler: Handler, *, replay: str | float = "new",
                  durable_name: str | None = None) -> Handler: ...

    def subscribe(self, prefix: str, handler: Callable[[Message], Any] | None = None, *,
                  replay: str | float = "new", durable_name: str | None = None) -> Any:
        """Handle every message whose topic starts with ``prefix`` (decorator or direct call).

        May be called before or while the node runs; peers learn of the subscription.
        This node's own publications reach its subscriptions directly, from the first one.

        Publishers that keep their topics (``history=``) can be replayed:

        * ``replay="new"`` (the default): live messages only, from now on.
        * ``replay="all"``: first everything each matching publisher still keeps, then its
          live messages, with no gap and no duplicate, in order per publisher.
        * ``replay=<seconds>``: the same, from that many seconds ago.
        * ``durable_name="name"`` (needs a store): the subscription remembers, per
          publisher and topic, the last message handled, and after a restart resumes right
          after it (a first start follows ``replay``). Messages that may have been handled
          just before a crash come again with ``msg.redelivered`` set (those the history
          dropped meanwhile are counted in ``msg.gap``, handled or not).

        A replaying subscription made again (after `unsubscribe`, or by a second call for
        the same prefix and handler) is a new one: it replays as its ``replay`` says; a
        durable one resumes from where its name was recorded.

        What fell out of a publisher's history before it could be replayed is reported on
        the next message (``msg.gap``, the number missed) and in ``stats()["pubsub"]["gap"]``.
        A ``durable_name`` names one subscription: another subscription of this node whose
        prefix shares topics with this one (one prefix starts with the other) cannot take it.

        Raises `ConfigError` (a ``ValueError``) for a prefix longer than 200 bytes, a bad
        ``replay``, a ``durable_name`` without a store or taken by another subscription of
        this node that shares topics with it, `NodeClosedError` once the node was stopped.
        """
        check_name("topic", prefix)
        if not (replay in ("new", "all") or (isinstance(replay, (int, float)) and not isinstance(replay, bool)
                                             and 0 < replay < float("inf"))):
            raise ConfigError(f"replay must be 'new', 'all' or a positive number of seconds, got {replay!r}")
        if durable_name is not None:
            if not isinstance(durable_name, str) or not durable_name or len(durable_name) > 200 or \
                    _utf8_size(durable_name) is None:
                raise ConfigError(f"durable_name must be a name of 1 to 200 characters (text UTF-8 can "
                                  f"encode), got {durable_name!r}")
            if self.config.store is None:
                raise ConfigError("durable_name needs a store: Node(..., store='path/dir')")
        options = SubscribeOptions(replay, durable_name)
        return self._register("topics", prefix, handler,
                              lambda fn: self._registry.set_subscribe_options(prefix, fn, options),
                              lambda fn: self._registry.check_durable_name(prefix, fn, options))

    @overload
    def pull(self, queue: str, handler: None = None, *, at_least_once: bool = False,
             ack_timeout_s: float | None = None, max_deliveries: int = 5, dead_letter: str | None = None,
             dedupe: bool = False, dedupe_window: int = 100_000, zero_copy: bool = False
             ) -> Callable[[Handler], Handler]: ...

    @overload
    def pull(self, queue: str, handler: Handler, *, at_least_once: bool = False,
             ack_timeout_s: float | None = None, max_deliveries: int = 5, dead_letter: str | None = None,
             dedupe: bool = False, dedupe_window: int = 100_000, zero_copy: bool = False) -> Handler: ...

    def pull(self, queue: str, handler: Callable[[Message], Any] | None = None, *, at_least_once: bool = False,
             ack_timeout_s: float | None = None, max_deliveries: int = 5, dead_letter: str | None = None,
             dedupe: bool = False, dedupe_window: int = 100_000, zero_copy: bool = False) -> Any:
        """Take messages from the work queue ``queue``: each message goes to one puller.

        With ``at_least_once=True`` every message is acknowledged when the handler
        returns, and what a puller that dies had not acknowledged is redelivered to
        another (``msg.redelivered`` is then True). All pullers of a queue should agree.
        Durable pushes (``push(..., durable=True)``) reach at-least-once pullers only, and
        for them:

        * ``ack_timeout_s``: a delivery not acknowledged in time (a stuck handler) is
          given to another puller; the late acknowledgement is ignored. The time runs
          per message, from when the batch reached the head of its puller's line
          (docs/durability.md); from 0.001 s (it is announced in milliseconds) to a day.
        * ``max_deliveries``: a message whose handler failed (raised, or timed out) that
          many times moves to the durable queue ``dead_letter`` (default
          ``"<queue>.dead"``) with headers ``x-original-queue``, ``x-attempts`` and
          ``x-last-error``; pull that queue to handle dead letters.
        * ``dedupe=True`` (needs a store): the ids of the last ``dedupe_window`` messages
          handled are remembered, so a redelivery after a crash or a lost acknowledgement
          is not handled twice.

        ``zero_copy=True`` (plain pulls only): a payload pushed as ``bytes`` of 64 KiB or
        more, without headers, reaches the handler as a read-only `memoryview` of
        ZeroMQ's own buffer instead of a copy in ``bytes`` (smaller ones stay ``bytes``).
        The view stays valid for as long as it is referenced. For handlers that only read
        the payload (write it out, hash it, parse it), it spares one copy per message;
        ``bytes(msg.data)`` makes the copy when one is needed (to keep, pickle or compare it).

        Raises `ConfigError` (a ``ValueError``) if this node already pulls ``queue`` with
        another handler, for an option that does not fit (e.g. ``dedupe`` without a store,
        a ``dead_letter`` that is ``queue`` itself, or none for a ``queue`` whose ``".dead"``
        name would pass the bound of a name), for a name no pull could take (``queue`` or
        ``dead_letter`` past 200 bytes of UTF-8, or beginning ``\\x00``), for a switch
        (``at_least_once``, ``dedupe``, ``zero_copy``) that is not True or False,
        `NodeClosedError` once the node was stopped.
        """
        check_name("queue", queue)
        _check_not_reserved("queue", queue)
        at_least_once = check_switch(at_least_once, "at_least_once")
        dedupe = check_switch(dedupe, "dedupe")
        zero_copy = check_switch(zero_copy, "zero_copy")
        extras = ack_timeout_s is not None or dead_letter is not None or dedupe or max_deliveries != 5
        if extras and not at_least_once:
            raise ConfigError("ack_timeout_s, max_deliveries, dead_letter and dedupe need at_least_once=True")
        if zero_copy and at_least_once:
            raise ConfigError("zero_copy=True is for plain pulls: at-least-once messages come encoded, in "
                              "acknowledged batches, so there is no buffer to hand over")
        if ack_timeout_s is not None and not 0.001 <= check_timeout(ack_timeout_s, "ack_timeout_s") <= 86_400:
            # (announced to pushers in whole milliseconds: less would be announced as none)
            raise ConfigError(f"ack_timeout_s must be a number of seconds from 0.001 to a day, got {ack_timeout_s!r}")
        if not isinstance(max_deliveries, int) or isinstance(max_deliveries, bool) or max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be a whole number >= 1, got {max_deliveries!r}")
        if dead_letter is not None:
            check_name("queue", dead_letter)
            _check_not_reserved("dead-letter queue", dead_letter)  # (a pusher would take "<queue>.dead" instead)
            if dead_letter == queue:  # (a message given up on would go back to the end of its queue, for ever)
                raise ConfigError(f"dead_letter must name another queue than {queue!r}: a message given up on "
                                  "would be moved to the end of the queue it failed in, and dealt again without end")
        elif at_least_once and not pullable(dead_letter_queue(queue)):
            raise ConfigError(f"the dead letters of a queue of {len(queue.encode())} bytes would go to "
                              f"'<queue>.dead', past the {MAX_NAME_BYTES} bytes of a queue's name, which no "
                              "puller could pull: give dead_letter=")
        if dedupe and self.config.store is None:
            raise ConfigError("dedupe=True needs a store: Node(..., store='path/dir')")
        if not isinstance(dedupe_window, int) or isinstance(dedupe_window, bool) or not 1 <= dedupe_window < 1 << 62:
            raise ConfigError(f"dedupe_window must be a whole number from 1 to 2**62, got {dedupe_window!r}")
        options = PullOptions(True, None if ack_timeout_s is None else float(ack_timeout_s), max_deliveries,
                              dead_letter, dedupe, dedupe_window)
        registry = self._registry

        def record_options(fn: Callable[..., Any]) -> None:
            if at_least_once:
                registry.set_pull_options(queue, options)
            registry.set_zero_copy(queue, zero_copy)

        return self._register("queues", queue, handler, record_options)

    @overload
    def service(self, name: str, handler: None = None, *, idempotent: bool = False
                ) -> Callable[[Handler], Handler]: ...

    @overload
    def service(self, name: str, handler: Handler, *, idempotent: bool = False) -> Handler: ...

    def service(self, name: str, handler: Callable[[Message], Any] | None = None, *, idempotent: bool = False) -> Any:
        """Answer requests to service ``name``; the handler's return value is the reply.

        ``idempotent=True`` declares that running a request twice is harmless: a caller
        whose provider dies mid-request then retries on another provider instead of
        raising `PeerLostError`. Raises `ConfigError` (a ``ValueError``) if this node
        already offers ``name`` with another handler or ``idempotent`` is not True or
        False, `NodeClosedError` once the node was stopped.
        """
        check_name("service", name)
        _check_not_reserved("service", name)
        idempotent = check_switch(idempotent, "idempotent")
        return self._register("services", name, handler,
                              (lambda fn: self._registry.mark_idempotent(name)) if idempotent else None)

    def keep(self, queue: str) -> None:
        """Become a keeper of ``queue``: a pusher that stops with durable messages of it not
        yet delivered hands them to a keeper (within its stop deadline), which stores them
        and delivers them to pullers when they appear. Several keepers may run; each
        message is kept by one. Raises `ConfigError` without a store, or past 2,000 names
        offered (topics, queues, services and kept queues in all), `NodeClosedError` once
        the node was stopped, `ZmqMeshError` in a process forked after it was built."""
        if self.config.store is None:
            raise ConfigError("keep() needs a store: Node(..., store='path/dir')")
        queue = check_name("queue", queue)
        self._check_process()
        with self._stop_lock:
            self._refuse_if_stopped()
            self._registry.keep(queue)
        self._engine.registry_changed()

    def unsubscribe(self, prefix: str, handler: Callable[..., Any] | None = None) -> bool:
        """Stop handling ``prefix`` (one handler, or all of them); True if anything was removed
        (in any state of the node: a removal on a stopped node holds for its next start).
        Once it returns, the handler is called with no more publications of ``prefix``, not
        even those already received for it (counted in ``stats()["pubsub"]["after_unsubscribe"]``);
        a call already running finishes. Never raises."""
        return self._unregister("topics", prefix, handler)

    def unpull(self, queue: str) -> bool:
        """Stop pulling ``queue``; True if this node pulled it (as `unsubscribe`). Never raises."""
        return self._unregister("queues", queue, None)

    def unservice(self, name: str) -> bool:
        """Stop offering service ``name``; True if this node offered it (as `unsubscribe`).
        Never raises."""
        return self._unregister("services", name, None)

    def remove_handler(self, handler: Callable[..., Any]) -> bool:
        """Remove ``handler`` wherever it is registered (topics, queues, services, callbacks);
        True if it was anywhere. Never raises."""
        with self._stop_lock:
            found = self._registry.remove_handler(handler)
        if found:
            self._engine.registry_changed()
        return found

    def _mark_stopped(self) -> None:
        """Mark the node stopped (before its stop begins): from now on it takes no handlers."""
        with self._stop_lock:
            self._stopped = True

    def _refuse_if_stopped(self) -> None:
        """(Holding `_stop_lock`.) Raises `NodeClosedError` once the node was marked stopped."""
        if self._stopped:
            raise NodeClosedError("this node was stopped (or failed to start): it takes no handlers, nothing would "
                                  "call them; create a new one")

    def _unregister(self, kind: str, name: str, handler: Callable[..., Any] | None) -> bool:
        with self._stop_lock:
            removed = self._registry.remove(kind, name, handler)
        if removed:
            self._engine.registry_changed()
        return removed

    def _callback(self, event: str, handler: Any) -> Any:
        """Register ``handler`` for ``event``; raises `ArgumentTypeError` (a ``TypeError``)
        if it cannot be called, `ZmqMeshError` in a process forked after the node was
        built, `NodeClosedError` once the node was stopped."""
        if not callable(handler):
            raise ArgumentTypeError(f"a callback must be callable, got {type(handler).__name__}")
        self._check_process()
        with self._stop_lock:
            self._refuse_if_stopped()
            self._registry.add_callback(event, handler)
        return handler

    def on_join(self, handler: Handler) -> Handler:
        """Call ``handler(peer)`` when a peer joins the mesh (decorator).
        Raises `ArgumentTypeError` (a ``TypeError``) if it cannot be called,
        `NodeClosedError` once the node was stopped."""
        return self._callback("join", handler)  # type: ignore[no-any-return]

    def on_leave(self, handler: Handler) -> Handler:
        """Call ``handler(peer)`` when a peer leaves, crashes or goes silent (decorator).
        Raises `ArgumentTypeError` (a ``TypeError``) if it cannot be called,
        `NodeClosedError` once the node was stopped."""
        return self._callback("leave", handler)  # type: ignore[no-any-return]

    def on_whisper(self, handler: Handler) -> Handler:
        """Call ``handler(msg)`` for each ZRE WHISPER; ``msg.data`` is the list of frames.
        Raises `ArgumentTypeError` (a ``TypeError``) if it cannot be called,
        `NodeClosedError` once the node was stopped."""
        return self._callback("whisper", handler)  # type: ignore[no-any-return]

    def on_shout(self, handler: Handler) -> Handler:
        """Call ``handler(msg)`` for each ZRE SHOUT to a joined group (``msg.group``, ``msg.data`` frames).
        Raises `ArgumentTypeError` (a ``TypeError``) if it cannot be called,
        `NodeClosedError` once the node was stopped."""
        return self._callback("shout", handler)  # type: ignore[no-any-return]

    # views -------------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers present now (snapshots): id, name, address, groups, offers, last seen
        (none while the node is not running). Never raises."""
        return self._engine.directory.peers()

    def as_peer(self) -> Peer:
        """This node, described as its peers see it. Never raises."""
        return self._engine.self_peer()

    def providers(self, service: str) -> list[Peer]:
        """The nodes offering ``service`` now, this one included (for scatter-gather).
        Raises `ConfigError` (a ``ValueError``) for a name no service can have (as `request` does)."""
        check_name("service", service)
        directory = self._engine.directory
        found = (directory.lookup_peer(i) for i in directory.providers("services", service))
        return [p for p in found if p is not None]

    def stats(self) -> dict[str, Any]:
        """Counters and gauges, as plain data: ``sent``/``received``/``dropped``/``errors`` per
        pattern (``pubsub``, ``pipeline``, ``request``, ``service``, ``zre``; ``request`` has
        ``abandoned`` too, and once none is in flight its ``sent`` is ``received + errors +
        abandoned``), ``names``
        (messages per pattern, direction and topic, queue or service), ``latency`` (per
        service called: a histogram of seconds until the answer), ``peers`` (received per
        peer), ``rejected`` (inputs dropped, by reason), ``membership`` (joins, leaves) and
        ``gauges`` (``peers``, ``queued``, ``queue_backlog``, ``send_queue_bytes``,
        ``durable_buffered_bytes``). See docs/operations.md. Never raises (a node not
        running answers its last counts)."""
        return self._engine.counters()

    def _check_open(self) -> None:
        """Raises `ZmqMeshError` in a process forked after the node was built (its I/O thread
        and sockets are the parent's), `NodeClosedError` unless the node runs."""
        self._check_process()
        self._engine.ensure_running()

    def _stopped_as_collected(self) -> bool:
        """Whether this node, collected while it runs, is stopped then by its node kind
        (which says so in the log). Never raises."""
        return False

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is None or not engine.started or getattr(self, "_stopped", True) or self._forked():
            return
        warnings.warn(f"zmqmesh node {engine.name!r} was garbage-collected without stop()",
                      ResourceWarning, stacklevel=2)
        if self._stopped_as_collected():  # (its own warning says so: not told it "may lose" what it stops to send)
            return
        try:  # (also said in the log: Python shows no ResourceWarning by default, and this one may lose messages)
            queued = engine.counters()["gauges"]["queued"]
            log.warning("node %s was garbage-collected while it ran, never stopped: what it had not sent yet (%d "
                        "message(s)) may be lost; keep a running node referenced, and stop it (`with node:`, or "
                        "`stop()`)", engine.name, queued)
        except Exception:  # (the interpreter is shutting down)
            pass

    # the calls, as plans (the node kinds run them) -----------------------------------------------

    def _headed(self, body: bytes, headers: dict[str, str]) -> Headed:
        """``body`` carrying ``headers`` (checked), an id and the time. Raises `EncodeError`,
        `ConfigError` for bad headers."""
        headed = Headed(body)
        headed.headers = self._engine.codec.encode(check_headers(headers))
        headed.id = self._next_id()
        headed.timestamp = time.time()
        return headed

    def _publish_now(self, topic: str, data: Any, headers: dict[str, str] | None = None,
                     ) -> tuple[bytes, bytes] | None:
        """Encode ``data`` and queue it on the publish queue if that has room right now:
        None then; otherwise ``(topic, body)``, for the caller to queue once there is room
        (`_publish_many_plan`). Raises `NodeClosedError`, `EncodeError`, `MessageTooLargeError`,
        `ConfigError` for a bad topic or headers."""
        active = tracing.active
        if active is not None:
            headers = _sent_traced(active, "publish", topic, headers)
        body = self._encode(data, headers)
        name = self._topic_names.get(topic) or self._name_bytes(self._topic_names, "topic", topic)
        engine = self._engine
        publisher = engine.publisher
        q = publisher.queue  # type: ignore[union-attr]
        if len(q) >= publisher.queue_max or publisher.held_bytes >= publisher.max_bytes:  # type: ignore[union-attr]
            return name, body  # (`Publisher.full`, spared its call)
        size = len(body) if type(body) is bytes else wire_size(body)  # (weighed first: the count's read and
        q.append((name, body))  # write below have no call between them, where another thread could add)
        publisher.held_bytes += size  # type: ignore[union-attr]  # (see `Publisher`)
        outbound = engine.outbound
        if not outbound.scheduled:  # type: ignore[union-attr]  # (per message: spare the call when it has nothing to do)
            outbound.wake()  # type: ignore[union-attr]
        return None

    def _encode(self, data: Any, headers: dict[str, str] | None) -> bytes:
        """``data`` encoded (carrying ``headers``, if any) by a running node. Raises
        `NodeClosedError`, `EncodeError`, `MessageTooLargeError`, `ConfigError`."""
        body = self._ready().codec.encode(data)
        return self._headed(body, headers) if headers else body

    def _ready(self) -> Engine:
        """The engine of a node that runs, in this process. Raises `NodeClosedError`."""
        engine = self._engine
        if engine.closed or self._forks != _FORKS[0]:
            self._check_process()
            engine.ensure_running()
        return engine

    def _push_now(self, queue: str, data: Any, headers: dict[str, str] | None = None,
                  timeout: float | None = None) -> bytes | RawPayload | None:
        """Encode ``data`` (large bytes: as they are, a `RawPayload`) and queue it on the
        send queue of ``queue`` if that takes it right now: None then; otherwise the body,
        for the caller to queue once `_push_plan` got it the socket, a puller or room.
        Raises `NodeClosedError`, `EncodeError`, `MessageTooLargeError`, `ConfigError` for
        bad headers, then `ConfigError` for a bad ``timeout``."""
        active = tracing.active
        if active is not None:
            headers = _sent_traced(active, "push", queue, headers)
        engine = self._engine
        if engine.closed or self._forks != _FORKS[0]:  # (`_ready`'s test, spared its call per message)
            engine = self._ready()
        codec = engine.codec
        body: bytes | RawPayload
        extra = 0  # (the headers' bytes: they wait in the send queue with the payload)
        if headers or type(data) is not bytes:
            body = codec.encode(data)
            if headers:
                headed = self._headed(body, headers)
                body, extra = headed, len(headed.headers)
        else:
            length, bins = len(data), codec.short_bins
            if length < len(bins):  # (as `Codec.encode` encodes it, spared its call per message)
                body = bins[length] + data
            elif length < LARGE_FRAME:
                body = codec.encode(data)
            else:
                body = codec.raw(data)  # travels uncopied
        if timeout is not None:
            check_timeout(timeout)
        # (`_push_queue`, inline: per message, its call cost more than the node-wide bound's
        # compare and count together)
        pusher = engine.pusher
        try:
            q = pusher.queues[queue]  # type: ignore[union-attr]
        except KeyError:
            return body
        if queue not in engine.directory.offers["queues"] or len(q) >= self.config.send_queue_max \
                or pusher.held >= pusher.held_max or pusher.held_bytes >= pusher.max_bytes:  # type: ignore[union-attr]
            return body
        size = len(body) + extra  # (weighed first: a `RawPayload`'s len is a call, where another thread
        q.append(body)  # could add between the count's read and its write below, and be lost)
        pusher.held += 1  # type: ignore[union-attr]  # (see `Pusher`: the loop recounts them)
        pusher.held_bytes += size  # type: ignore[union-attr]
        outbound = engine.outbound
        if not outbound.scheduled:  # type: ignore[union-attr]  # (per message: spare the call when it has nothing to do)
            outbound.wake()  # type: ignore[union-attr]
        return None

    def _push_queue(self, queue: str) -> deque[Any] | None:
        """The send queue of ``queue`` if it takes messages right now; None when the socket,
        a puller or room (in it, or in all send queues together) is missing (then
        `_push_plan` waits)."""
        engine = self._engine
        pusher = engine.pusher
        q = pusher.queues.get(queue)  # type: ignore[union-attr]  # (`Pusher.queue_of`, spared its call)
        if q is None or queue not in engine.directory.offers["queues"] or len(q) >= self.config.send_queue_max \
                or pusher.held >= pusher.held_max or pusher.held_bytes >= pusher.max_bytes:  # type: ignore[union-attr]
            return None  # (`Pusher.full`, spared its call)
        return q

    def _encode_many(self, operation: str, name: str, items: Iterable[Any], headers: dict[str, str] | None,
                     ) -> list[Any]:
        """Every item encoded (carrying ``headers``, and the trace context of one span for
        them all) before any is sent: one that cannot be encoded fails the call, and
        nothing of it is sent. A push's large ``bytes`` without headers stay as they are,
        as `_push_now` leaves them (`Codec.encode_pushes`). Raises as `_encode` does (an
        item that cannot be encoded named by its index), `ArgumentTypeError` for ``items``
        that cannot be iterated."""
        if type(items) is not list:
            items = list(check_items(items))
        if not items:  # (nothing to send: the call still raises what one with items would)
            self._ready()
            check_name("queue" if operation == "push" else "topic", name)
            return []
        active = tracing.active
        if active is not None:
            headers = _sent_traced(active, operation, name, headers)
        codec = self._ready().codec
        if headers:
            headed = self._headed
            return [headed(body, headers) for body in codec.encode_many(items)]
        return codec.encode_pushes(items) if operation == "push" else codec.encode_many(items)

    def _encode_publications(self, topic: str, items: Iterable[Any], headers: dict[str, str] | None,
                             ) -> list[tuple[bytes, Any]]:
        """``(topic, body)`` of every item (see `_encode_many`)."""
        bodies = self._encode_many("publish", topic, items, headers)
        name = self._topic_names.get(topic) or self._name_bytes(self._topic_names, "topic", topic)
        return [(name, body) for body in bodies]

    def _durable_ticket(self, queue: str, items: Iterable[Any], headers: dict[str, str] | None) -> Ticket | None:
        """Durable messages encoded for the store, as one call to commit (None for no
        items). The facades then commit it in turn with the calls of other threads or
        tasks (a group commit), and the loop delivers them when a puller is there (they
        come here for a ``durable`` switch that `check_switch` reads as on).

        Raises `ConfigError` without a store, `EncodeError` for unencodable data or
        headers, `MessageTooLargeError`, `NodeClosedError`, `ArgumentTypeError` for
        ``items`` that cannot be iterated.
        """
        engine = self._engine
        self._check_process()
        engine.ensure_running()
        if engine.durable is None:
            raise ConfigError("durable=True needs a store: Node(..., store='path/dir')")
        check_name("queue", queue)
        items = items if type(items) is list else check_items(items)  # (a list: `encode_many`'s quick path)
        active = tracing.active
        if active is not None:
            headers = _sent_traced(active, "push", queue, headers)
        codec = engine.codec
        packed = codec.encode(check_headers(headers)) if headers else None
        bodies = codec.encode_many(items)
        if not bodies:
            return None
        return engine.durable.ticket(queue, self._id_run(len(bodies)), time.time(), packed, bodies)

    def _push_deadline(self, timeout: float | None) -> float:
        """When a push given ``timeout`` (default ``push_timeout_s``) gives up. Raises
        `ConfigError` for a bad one."""
        return time.monotonic() + (self.config.push_timeout_s if timeout is None else check_timeout(timeout))

    def _push_many_plan(self, queue: str, bodies: list[Any], timeout: float | None) -> Plan:
        """Queue ``bodies`` on the send queue of ``queue`` as room allows, waiting as `push`
        does (for the socket, a puller, room), all within one ``timeout``. Raises as
        `_push_plan` does; a timeout part-way leaves the bodies before it queued."""
        deadline = self._push_deadline(timeout)

        def room() -> Plan:
            q = self._push_queue(queue)
            return q if q is not None else (yield from self._push_plan(queue, deadline))

        yield from self._fill_plan(bodies, room, push=True)

    def _publish_many_plan(self, entries: list[tuple[bytes, Any]]) -> Plan:
        """Queue ``entries`` on the publish queue as room allows (back-pressure), within
        one ``push_timeout_s``."""
        deadline = time.monotonic() + self.config.push_timeout_s

        def room() -> Plan:
            publisher = self._engine.publisher
            assert publisher is not None
            if publisher.full():
                yield from self._room_plan(publisher, deadline - time.monotonic())
            return publisher.queue

        yield from self._fill_plan(entries, room)

    def _fill_plan(self, items: list[Any], room: Callable[[], Plan], push: bool = False) -> Plan:
        """Extend the send queue ``room()`` gives (waiting for room there) with ``items``,
        as many at a time as it has room for, in messages and bytes (``push``: a push
        queue, `Pusher.take`, within what all of them may hold together too; else the
        publish queue, `Publisher.take`)."""
        limit = self.config.send_queue_max
        engine = self._engine
        done = 0
        while done < len(items):
            q = yield from room()
            chunk = items[done:done + max(1, limit - len(q))]
            done += engine.pusher.take(q, chunk) if push else engine.publisher.take(chunk)  # type: ignore[union-attr]
            engine.outbound.wake()  # type: ignore[union-attr]

    def _room_plan(self, publisher: Publisher, timeout: float) -> Plan:
        """Wait for room in the full publish queue (back-pressure). Raises
        `MeshTimeoutError` if none comes within ``timeout``."""
        if not (yield Room(publisher.full, time.monotonic() + timeout)):
            self._engine.stats.add("pubsub", "refused_queue_full")
            raise publisher.refusal()

    def _push_plan(self, queue: str, deadline: float) -> Plan:
        """Create the queue's socket, wait for a puller, wait for room until ``deadline``:
        whatever push lacks.

        Raises `NoProviderError` when nobody pulls ``queue`` in time, `MeshTimeoutError`
        when there is no room in time: in its send queue (``send_queue_max``), or in all
        send queues together (``send_queue_total_max``, ``send_queue_max_bytes``); each counted
        (``pipeline.refused_queue_full``, ``pipeline.refused_node_full``).
        """
        engine = self._engine
        pusher = engine.pusher
        assert pusher is not None
        try:
            if pusher.queue_of(queue) is None:
                yield OnLoop(self._ensure_push_socket, (check_name("queue", queue),))
            if not engine.directory.offers["queues"].get(queue):
                try:
                    yield Until(lambda: bool(engine.directory.offers["queues"].get(queue)), deadline,
                                f"a puller of {queue!r}")
                except MeshTimeoutError:
                    yield OnLoop(pusher.release, (queue,))  # a failed queue keeps no socket
                    raise NoProviderError(f"no node pulls the queue {queue!r} in mesh {self.config.mesh!r}") from None
        except GeneratorExit:  # the call was cancelled or interrupted (its runner closes the plan): nor does that
            if not engine.closed:  # (after the socket's making, if that was under way: the loop's calls keep their order)
                with contextlib.suppress(RuntimeError):  # (the loop is gone, and the socket with it)
                    engine.call_soon(pusher.release, queue)
            raise
        q = pusher.queue_of(queue)
        while q is None:  # released while this call waited (another push to it gave up): again
            yield OnLoop(self._ensure_push_socket, (queue,))
            q = pusher.queue_of(queue)
        if pusher.full(q):
            if self._own_caller_holds_up(queue, q):
                # (a burst may have filled it before the loop flushed it into ZeroMQ, which may
                # still take it: refused only once ZeroMQ took all it takes, if no room came)
                held_up = functools.partial(self._held_up_by_own_caller, queue, q, pusher.refusals)
                yield Room(lambda: pusher.full(q) and not held_up(), deadline)
                if held_up():
                    counter, bound = pusher.bound_met(queue, q)
                    engine.stats.add("pipeline", counter)
                    raise self._own_caller_holds_up_error(queue, bound, counter == "refused_node_full")
            room = yield Room(functools.partial(pusher.full, q), deadline)
            if pusher.queue_of(queue) is not q or not engine.directory.offers["queues"].get(queue):
                # its pullers left, and what waited is being dropped (the room seen may be the
                # drop's, under way on the loop): again, from waiting for a puller
                return (yield from self._push_plan(queue, deadline))
            if not room:
                counter, refused = pusher.refusal(queue, q)
                engine.stats.add("pipeline", counter)
                raise refused
        return q

    def _own_caller_holds_up(self, queue: str, q: deque[Any]) -> bool:
        """Whether the full send queue ``q`` of ``queue`` can only empty into this node,
        whose handler is the caller and which runs one handler at a time (and, when all
        send queues together are full, so can every one that holds messages): once ZeroMQ
        holds what it can, the room comes only when the caller returned, so a push waited
        its whole timeout (10 s by default) in vain."""
        engine = self._engine
        inbox, pusher = engine.inbox, engine.pusher
        if inbox is None or pusher is None or not inbox.waits_for_caller() or not self._only_this_node_pulls(queue):
            return False
        return len(q) >= self.config.send_queue_max or all(
            self._only_this_node_pulls(name) for name, held in list(pusher.queues.items()) if held)

    def _held_up_by_own_caller(self, queue: str, q: deque[Any], since: int) -> bool:
        """Whether a push to ``queue`` (send queue ``q``) is held up for good by its own
        caller (`_own_caller_holds_up`): the bound it meets is still met, and ZeroMQ took
        all it takes of the queues that would make room (`Pusher.stalled`: it refused their
        last frame after the push began to wait, when `Pusher.refusals` was ``since``), so
        nothing will until the caller returns."""
        pusher = self._engine.pusher
        if pusher is None or not pusher.full(q) or not self._own_caller_holds_up(queue, q):
            return False
        if len(q) >= self.config.send_queue_max:
            return pusher.stalled.get(queue, 0) > since
        stalled = pusher.stalled
        return all(stalled.get(name, 0) > since for name, held in list(pusher.queues.items()) if held)

    def _only_this_node_pulls(self, queue: str) -> bool:
        directory = self._engine.directory
        return directory.providers("queues", queue) == (directory.node_id,)

    def _own_caller_holds_up_error(self, queue: str, bound: str, together: bool) -> MeshTimeoutError:
        """The error of a push to ``queue`` refused as `_own_caller_holds_up` says; ``bound``:
        what is full (`Pusher.bound_met`), all send queues ``together`` or that of ``queue``."""
        pulled = f"{queue!r} and every other queue holding messages" if together else repr(queue)
        return MeshTimeoutError(
            f"{bound}, and only this node pulls {pulled}, whose handler is pushing and which runs one handler at a time "
            f"(handler_concurrency={self.config.handler_concurrency}): it takes nothing until the push returns. "
            "Raise handler_concurrency, or push fewer from one handler")

    def _ensure_push_socket(self, queue: str) -> None:
        self._engine.ensure_running()
        self._engine.pusher.ensure_socket(queue)  # type: ignore[union-attr]

    def _request_plan(self, service: str, data: Any, timeout: float | None, peer: str | Peer | None,
                      headers: dict[str, str] | None = None) -> Plan:
        """Call ``service`` (see `Node.request` for what it raises)."""
        body = self._encode_call(data)  # (first: a call raises what its data does before the rest)
        return self._plan_call(self._prepare_calls(service, timeout, peer, headers), body)

    def _node_stats_plan(self, peer: str | Peer, timeout: float) -> Plan:
        """Ask ``peer`` for its counters (see `Node.node_stats` for what it raises)."""
        return _counters_answer(self._request_plan(STATS_SERVICE, None, timeout, peer_id_of(peer)))

    def _request_call(self, service: str, data: Any, timeout: float | None, peer: str | Peer | None,
                      headers: dict[str, str] | None = None, blocking: bool = True) -> Plan | QuickRequest:
        """`_request_plan`, or its `QuickRequest` when the call may go the quick way (for a
        driver that keeps it while the call is made: `Pipelined`; `Node.request` and
        `AsyncNode.request` carry out `_encoded_call`'s parts themselves). ``blocking=False``:
        the caller does not block while the call is made (`Node.submit`)."""
        calls, body, calling = self._encoded_call(service, data, timeout, peer, headers, blocking)
        return self._quick_or_plan(calls, body, calling)

    def _encoded_call(self, service: str, data: Any, timeout: float | None, peer: str | Peer | None,
                      headers: dict[str, str] | None = None, blocking: bool = True,
                      packer: msgpack.Packer | None = None) -> tuple[_Calls, bytes, Calling | None]:
        """What a call of ``service`` shares with the others alike (`_prepare_calls`), its
        ``data`` encoded (with ``packer``, the calling thread's `Codec.thread_packer`, if
        given), and the `Calling` it may go the quick way with now (None: it is a plan,
        `_plan_call`): made into a call by `_quick_or_plan`, or by a driver itself. Raises
        what `_request_plan` raises, in its order."""
        engine = self._engine
        # `_encode_call`, its checks made inline: only a forked or stopped node goes through it
        body = self._encode_call(data) if self._forks != _FORKS[0] or engine.closed else \
            engine.codec.encode(data, None, packer)
        calls = self._prepare_calls(service, timeout, peer, headers, blocking)
        return calls, body, calls.quick()

    def _request_calls(self, service: str, items: Iterable[Any], timeout: float | None, peer: str | Peer | None,
                       headers: dict[str, str] | None) -> ItemCalls:
        """The calls of ``service`` once per item (as `_request_call`), made as they are
        asked for (`ItemCalls.take`): what the calls share is checked once, with the first
        item, after its data is encoded (each item raises what `_request_plan` raises, in
        the same order; an item that cannot be encoded is named by its index). Raises
        `ArgumentTypeError` at once for ``items`` that cannot be iterated."""
        return ItemCalls(self, service, items, timeout, peer, headers)

    def _quick_or_plan(self, calls: _Calls, body: bytes, calling: Calling | None) -> Plan | QuickRequest:
        """The call of ``calls`` with ``body``: its `QuickRequest` with ``calling`` (what
        `_encoded_call` gives), or, without one, its plan."""
        if calling is not None:
            now = time.monotonic()
            return QuickRequest(calling, body, now + calls.seconds, now)
        return self._plan_call(calls, body)

    def _encode_call(self, data: Any) -> bytes:
        """``data`` encoded for a call of this running node, in this process. Raises
        `ZmqMeshError`, `NodeClosedError`, `EncodeError`, `MessageTooLargeError`."""
        self._check_process()
        self._engine.ensure_running()
        return self._engine.codec.encode(data)

    def _prepare_calls(self, service: str, timeout: float | None, peer: str | Peer | None,
                       headers: dict[str, str] | None, blocking: bool = True) -> _Calls:
        """What calls of ``service`` from this thread share (``blocking``: the thread
        blocks while they are made). Raises `ConfigError` for a bad service name or
        timeout."""
        engine = self._engine
        # the nodes whose handlers wait for this call and serve nothing until it returns: up
        # the chain of requests made from handlers, and this node if a handler of it calls
        chain = serving_chain()
        blocked = frozenset(chain) if chain else _NO_NODES
        inbox = engine.inbox
        if inbox is not None:
            if inbox.waits_for_caller():
                chain = (*chain, engine.directory.node_id)[-MAX_CHAIN:]
                blocked = frozenset(chain)
            elif blocking and inbox.async_handlers and inbox.service_waits_for_caller(service):  # (this node only)
                blocked |= {engine.directory.node_id}
        # what plain calls share depends only on these: made once, not per call
        key = (service, timeout, peer) if not blocked and headers is None and type(peer) in _PLAIN_PEERS and \
            type(timeout) in _PLAIN_TIMEOUTS else None
        if key is not None:
            known = self._plain_calls.get(key)
            if known is not None:
                return known
        service_b = self._service_name(service)
        seconds = self.config.request_timeout_s if timeout is None else check_timeout(timeout)
        if seconds == 0:  # (sent, it would run on the provider for a caller already gone. Not sent: counted nowhere)
            raise MeshTimeoutError(f"request to {service!r} timed out: timeout=0 leaves no time for a reply, "
                                   "so it was not sent")
        only = peer_id_of(peer)
        quick = not headers and not blocked and not service.startswith("\x00")
        calling = Calling(engine.directory, engine.codec, engine.stats, service, service_b, only) if quick else None
        calls = _Calls(service, service_b, seconds, only, chain, blocked, headers, calling)
        if key is not None:
            if len(self._plain_calls) >= _NAME_CACHE_MAX:
                self._plain_calls.clear()
            self._plain_calls[key] = calls
        return calls

    def _plan_call(self, calls: _Calls, body: bytes) -> Plan:
        """The plan of one of ``calls`` with the encoded ``body``; its time begins now.
        Raises `ConfigError` when every provider waits for this very call (a cycle),
        `EncodeError` or `ConfigError` for bad headers."""
        engine = self._engine
        headers, chain, service = calls.headers, calls.chain, calls.service
        if calls.blocked:  # (calls made from handlers only: who provides may have changed)
            offered = engine.directory.providers("services", service) if calls.only is None else (calls.only,)
            if offered and all(i in calls.blocked for i in offered):
                engine.stats.reject("call_cycle")
                raise ConfigError(self._cycle_message(service, chain, offered))
        if headers:
            headers = check_headers(headers)  # (before a span: a bad header raises here, no span begun)
        deadline = time.monotonic() + calls.seconds
        active = tracing.active if not service.startswith("\x00") else None
        span = None
        if active is not None:
            span = tracing.send_span(active, "request", service, "CLIENT")
            headers = tracing.inject(span, headers)
        meta = None
        if headers or chain:  # (the chain travels on: the provider's own calls must avoid these nodes too)
            meta = engine.codec.encode({"h": headers or {}, "t": time.time(),
                                        **({"v": list(chain)} if chain else {})})
        plan = request_plan(engine.directory, engine.codec, service, calls.service_b, body, deadline, calls.only,
                            meta, engine.stats, calls.blocked)
        return plan if span is None else _traced_plan(plan, span)

    def _cycle_message(self, service: str, chain: tuple[str, ...], offered: tuple[str, ...]) -> str:
        node_id = self._engine.directory.node_id
        if set(offered) == {node_id}:
            inbox = self._engine.inbox
            reasons, remedies = [], []
            if node_id in chain:  # (`waits_for_caller`)
                reasons.append(f"runs one handler at a time (handler_concurrency={self.config.handler_concurrency})")
                remedies.append("raise handler_concurrency")
            if inbox is not None and inbox.service_waits_for_caller(service):
                reasons.append("runs its async def handlers on one event loop, which this blocking call from one of "
                               "them holds")
                remedies.append("await the call (await asyncio.wrap_future(node.submit(...)))")
            if reasons:
                return (f"the service {service!r} is offered only by this node, whose handler is calling it, and "
                        f"which {' and '.join(reasons)}: the call would wait for its own caller. Call the function "
                        f"directly, or {' and '.join(remedies)}")
        names = " -> ".join(i[:8] for i in (*chain, offered[0]))
        return (f"a call cycle ({names}): every provider of {service!r} waits, up this chain of requests, for "
                "this very call, and runs one handler at a time. Raise handler_concurrency on the nodes of the "
                "cycle, or break it")

    def _until(self, predicate: Callable[[], bool], timeout: float, what: str) -> Plan:
        """Wait until ``predicate()`` holds on the loop. Raises `MeshTimeoutError`."""
        self._check_process()
        self._engine.ensure_running()
        yield Until(predicate, time.monotonic() + check_timeout(timeout), what)  # (no wait is endless)

    def _peers_plan(self, n: int, timeout: float) -> Plan:
        """Wait for ``n`` peers present: known, and their subscriptions in place here (a
        publication made afterwards reaches them)."""
        check_count(n)
        engine = self._engine
        engine.ensure_running()
        directory, publisher = engine.directory, engine.publisher
        assert publisher is not None

        def present() -> bool:
            own = directory.node_id
            return sum(1 for i in directory.alive_ids if i != own and publisher.subscriptions_in_place(i)) >= n

        yield from self._until(present, timeout, f"{n} peer(s)")
        return directory.peers()

    def _subscribers_plan(self, topic: str, n: int, timeout: float) -> Plan:
        check_name("topic", topic)
        check_count(n)
        self._engine.ensure_running()
        publisher = self._engine.publisher
        assert publisher is not None
        yield from self._until(lambda: publisher.subscribers_ready(topic, n), timeout,
                               f"{n} subscriber(s) of {topic!r}")

    def _offer_plan(self, kind: str, name: str, n: int, timeout: float) -> Plan:
        check_name("service" if kind == "services" else "queue", name)  # (as a call with the name would)
        check_count(n)
        directory = self._engine.directory
        what = {"services": "provider(s) of service", "queues": "puller(s) of queue", "keepers": "keeper(s) of queue"}[kind]
        yield from self._until(lambda: len(directory.providers(kind, name)) >= n, timeout, f"{n} {what} {name!r}")

    def _service_name(self, service: str) -> bytes:
        """``service`` checked and encoded (remembered: requests repeat their service names)."""
        return self._service_names.get(service) or self._name_bytes(self._service_names, "service", service)

    @staticmethod
    def _name_bytes(cache: dict[str, bytes], kind: str, name: str) -> bytes:
        """``name`` checked and encoded, remembered in ``cache`` for the next call (bounded)."""
        encoded = check_name(kind, name).encode()
        if len(cache) >= _NAME_CACHE_MAX:
            cache.clear()
        cache[name] = encoded
        return encoded
