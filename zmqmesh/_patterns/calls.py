"""A handler invocation and the ways to run one, shared by the inbox and its drivers."""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from .._mesh.registry import PullOptions
from .._observe import tracing
from ..errors import NodeClosedError

__all__ = ["Call", "BatchAck", "CursorMark", "CutShort", "Heeding", "PassedOver", "is_async", "handler_failure", "run_sync", "run_async", "run_batch", "serving_chain", "serve_as", "served",
           "handler_raised"]

log = logging.getLogger("zmqmesh.inbox")


class BatchAck:
    """Acknowledges an at-least-once batch once every message of it has been handled,
    naming the durable items whose handler failed (``failures``). A batch a stop cut short
    (``cut_short``) is never acknowledged whole: ``left`` holds the positions of the items the
    stop left unhandled (`AckedIntake.leave`), which are all its pusher deals again.
    ``unstamped``: the positions of durable items whose sender's clock was no finite number
    (their messages show no timestamp, yet a failure of theirs goes back to the pusher as any
    durable one's). ``sender``: the pusher's node id, if it named itself."""

    __slots__ = ("route", "remaining", "queue", "options", "failures", "cut_short", "unstamped", "left", "sender")

    def __init__(self, route: tuple[bytes, bytes], remaining: int, queue: str = "",
                 options: PullOptions | None = None) -> None:
        self.route = route
        self.remaining = remaining
        self.queue = queue
        self.options = options or PullOptions(at_least_once=True)
        self.failures: list[list[Any]] = []
        self.cut_short = False
        self.unstamped: set[int] | None = None
        self.left: list[int] | None = None
        self.sender: str | None = None


class CutShort(NodeClosedError):
    """What a handler its node's stop cut short leaves as its outcome: one the stop's
    timeout cut short (an ``async def`` one a `Node` runs on its handler loop), or one its
    node refused with `NodeClosedError` as it stopped (`Dispatcher.complete`). Its message
    is counted as left at the stop (``dropped``, named in the stop's warning; at least
    once, it is dealt again), not as the handler's failure; a request is also answered
    with it (as `NodeClosedError`)."""


class PassedOver(Exception):
    """What a call not run leaves as its outcome: its subscription's handler was removed
    (``unsubscribe``) after the call was gathered (`Heeding.unsubscribed`). Counted in
    ``stats()["pubsub"]["after_unsubscribe"]``; neither the handler's failure nor a message
    lost (a durable subscription's place stays before it)."""


class Heeding(Protocol):
    """What `run_batch` asks of the inbox before each call: ``watching`` (a stop began, or a
    subscription's handler was removed, since the calls were gathered) and, only then,
    whether a stop's deadline passed and whether the call's handler was removed."""

    watching: bool

    def abandoned(self) -> bool: ...

    def unsubscribed(self, call: Call) -> bool: ...


class CursorMark(NamedTuple):
    """The place of one message of a durable subscription (a call's route)."""

    name: str
    stream: str
    topic: str
    seq: int
    pos: int


class Call:
    """One handler invocation: ``handler(arg)``, and where its reply goes, if anywhere."""

    __slots__ = ("handler", "arg", "route", "pattern", "index")

    def __init__(self, handler: Callable[..., Any], arg: Any,
                 route: tuple[bytes, bytes] | BatchAck | CursorMark | None, pattern: str) -> None:
        self.handler = handler
        self.arg = arg
        self.route = route
        self.pattern = pattern

    def in_batch(self, index: int) -> Call:
        """Note the call's place in its at-least-once batch (set only there: calls are
        made per message on the hot paths)."""
        self.index = index
        return self


_ASYNC: dict[Any, bool] = {}
_MAX_CACHED = 4096


def is_async(handler: Callable[..., Any]) -> bool:
    """True for ``async def`` handlers (and callables whose ``__call__`` is one); cached."""
    try:
        return _ASYNC[handler]
    except (KeyError, TypeError):
        import inspect  # (here, not at the top: a node that serves nothing never loads it)

        found = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)
        try:
            if len(_ASYNC) >= _MAX_CACHED:  # bounded: callables made per call would grow it
                _ASYNC.clear()
            _ASYNC[handler] = found
        except TypeError:  # unhashable callable
            pass
        return found


_SERVING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("zmqmesh_serving", default=())
"""The chain of waiting nodes of the request the current service handler serves (a
context variable: per thread, and per task on an event loop)."""


serving_chain: Callable[[], tuple[str, ...]] = _SERVING.get
"""The nodes whose handlers wait, up the chain, for the request being served here: the
context variable's own ``get`` (asked by every call a node makes: no Python frame)."""


def handler_raised(handler: Callable[..., Any]) -> int:
    """Log the error a handler run in place just raised (call in its ``except``); one
    error, for the caller to count."""
    log.exception("handler %s raised", getattr(handler, "__qualname__", handler))
    return 1


def handler_failure(exc: BaseException) -> BaseException:
    """``exc``, which a handler raised, as the handler's failure; raised again if it must
    end the program: `KeyboardInterrupt` or `SystemExit` on the main thread (Ctrl-C,
    ``sys.exit()`` in an `AsyncNode`'s handler, as asyncio lets them through). On a node's
    own threads they would end the thread alone, and the node would go deaf while its
    peers still route to it."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) and threading.current_thread() is threading.main_thread():
        raise exc
    return exc


def run_sync(call: Call) -> tuple[Any, BaseException | None]:
    """Call a sync handler, capturing its outcome (see `handler_failure`)."""
    if tracing.active is None and (call.pattern != "service" or not call.arg.via):  # (nothing to serve as)
        try:
            return call.handler(call.arg), None
        except BaseException as exc:
            return None, handler_failure(exc)
    token = serve_as(call)
    error: BaseException | None = None
    try:
        return call.handler(call.arg), None
    except BaseException as exc:
        error = handler_failure(exc)
        return None, error
    finally:
        served(token, error)


async def run_async(call: Call) -> tuple[Any, BaseException | None]:
    """Await a handler (sync handlers here are only the loop's own callbacks), capturing
    its outcome (see `handler_failure`; a cancellation goes on)."""
    token = serve_as(call)
    error: BaseException | None = None
    try:
        result = call.handler(call.arg)
        if isinstance(result, Awaitable):
            result = await result
        return result, None
    except Exception as exc:
        error = exc
        return None, exc
    except BaseException as exc:
        import asyncio  # (loaded already, as this runs on a loop: a sync node never imports it)

        if isinstance(exc, asyncio.CancelledError):
            raise
        error = handler_failure(exc)
        return None, error
    finally:
        served(token, error)


def run_batch(batch: list[Call], inbox: Heeding, started: list[Call],
              outcomes: list[tuple[Any, BaseException | None]], slice_s: float = math.inf) -> None:
    """Call the sync handlers of a burst in order (on a worker thread), until
    ``inbox.abandoned()`` says a stop's deadline passed, or, once one has returned,
    ``slice_s`` seconds have passed since this began (the caller then answers those and
    hands the rest over again): each call goes into ``started`` as it begins, and its
    outcome into ``outcomes`` as it returns (what a caller that stopped waiting can tell of
    the worker's progress). A call whose handler was unsubscribed since it was gathered
    (``inbox.unsubscribed``) is not run: its outcome is a `PassedOver`."""
    until = time.monotonic() + slice_s  # (from here: the hand-over to this thread may have taken longer)
    for call in batch:
        if inbox.watching:  # (a stop, or a handler removed: nothing else is read per call)
            if inbox.abandoned():
                break
            if inbox.unsubscribed(call):
                started.append(call)
                outcomes.append((None, PassedOver("unsubscribed")))
                continue
        if outcomes and time.monotonic() >= until:
            break
        started.append(call)
        outcomes.append(run_sync(call))


class _Traced(NamedTuple):
    chain: contextvars.Token[tuple[str, ...]] | None
    running: tracing.HandlerSpan | None


Serving = contextvars.Token[tuple[str, ...]] | _Traced | None
"""What `serve_as` gives back to `served`."""


def serve_as(call: Call) -> Serving:
    """Mark the current context as serving ``call`` (and, when traces are on, start its
    span, current until `served`); give the token back to `served`."""
    # (a handler's context starts with no chain: only a chain to carry needs setting)
    via = call.arg.via if call.pattern == "service" else None
    chain = _SERVING.set(via) if via else None
    active = tracing.active
    if active is None:
        return chain
    return _Traced(chain, tracing.handler_span(active, call.pattern, call.arg))


def served(token: Serving, error: BaseException | None = None) -> None:
    """Undo `serve_as` (the handler failed with ``error``, if given)."""
    if type(token) is _Traced:
        if token.running is not None:
            tracing.end_handler_span(token.running, error)
        token = token.chain
    if token is not None:
        _SERVING.reset(token)  # type: ignore[arg-type]
