"""An `AsyncNode`'s stop: the one stop plan (`_engine.stop`), its steps awaited on the
node's loop (`stop_async`)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..._engine.api import advance
from ..._engine.engine import Engine
from ..._engine.stop import AFTER_LOOP, CALLER, INBOX, ON_LOOP, stop_plan
from .inbox import LoopInbox

__all__ = ["stop_async"]

log = logging.getLogger("zmqmesh.aio")


async def stop_async(engine: Engine, inbox: LoopInbox, timeout: float) -> None:
    """Run the stop plan on the node's loop. Never raises: a step that fails is logged and
    the later steps still run.

    Nor does cancelling its task end the stop half-way: the step under way ends at once
    (the handlers still running are cut short), and the later steps still run, within the
    stop's bound. ``asyncio.run`` cancels every task left when its coroutine returns, such
    as the stop of a ``node.stop()`` that ``asyncio.wait_for`` gave up on; that left the
    node's ZeroMQ context and some 30 descriptors open, and said no goodbye."""
    plan = stop_plan(engine, timeout)
    value: Any = None
    while True:
        finished, step = advance(plan, value, None)
        if finished:
            return
        value = None
        try:
            if step.where == ON_LOOP:
                value = step.fn(*step.args)
            elif step.where == INBOX:
                await inbox.stop(*step.args)
            elif step.where == CALLER:  # (it blocks: never on the loop)
                await _off_the_loop(step.fn)
            elif step.where == AFTER_LOOP:
                bound = engine.config.linger_s + 1  # the lingers were set within linger_s
                await asyncio.wait_for(_off_the_loop(step.fn), bound)
            else:
                await asyncio.sleep(step.args[0])
        except asyncio.CancelledError:
            log.debug("node %s: the stop's task was cancelled while %s; the stop goes on", engine.name, step.what)
            uncancel = getattr(asyncio.current_task(), "uncancel", None)
            if uncancel is not None:  # (Python 3.11+: the task no longer counts as being cancelled)
                uncancel()
        except Exception as exc:
            log.warning("node %s: %s failed while stopping: %s", engine.name, step.what, exc)


async def _off_the_loop(fn: Callable[[], Any]) -> Any:
    """``fn()``, run on another thread than the loop's: the loop's default executor, or a
    thread of its own once that executor takes no more work (the interpreter exits: a
    node still running then is stopped, `at_exit`), or on the loop's own thread when no
    thread can be started then (Python 3.12.0 and 3.12.1)."""
    loop = asyncio.get_running_loop()
    try:
        handed = loop.run_in_executor(None, fn)
    except RuntimeError:  # ("cannot schedule new futures after interpreter shutdown")
        handed = None  # (not around the await: a RuntimeError of fn's own would run it twice)
    if handed is not None:
        return await handed
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # (cancelled: the stop went on without it)
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    try:
        threading.Thread(target=run, name="zmqmesh-stop-step", daemon=True).start()
    except RuntimeError:  # (Python 3.12.0 and 3.12.1 start no thread at exit: run here, the loop held meanwhile)
        return fn()
    return await done
