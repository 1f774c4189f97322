"""A `Node`'s stop: the one stop plan (`_engine.stop`), its steps carried out from the
calling thread (`stop_blocking`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..._engine.api import advance
from ..._engine.engine import Engine
from ..._engine.stop import AFTER_LOOP, CALLER, INBOX, ON_LOOP, stop_plan
from ..._io.reactor import Reactor, run_on
from .inbox import ThreadInbox
from .waits import LATE_LOOP_S

__all__ = ["stop_blocking"]

log = logging.getLogger("zmqmesh.node")


def stop_blocking(engine: Engine, inbox: ThreadInbox, loop: Reactor, thread: threading.Thread, timeout: float) -> None:
    """Run the stop plan from a caller's thread, then end the I/O thread (bounded).

    Never raises: a step that fails is logged and the later steps still run, so a half-dead
    node still releases its threads and sockets.
    """
    step_timeout = engine.config.linger_s + 1  # no loop step takes long; this bounds a wedged loop
    plan = stop_plan(engine, timeout)
    value: Any = None
    loop_ended = False
    while True:
        finished, step = advance(plan, value, None)
        if finished:
            break
        value = None
        try:
            if step.where == ON_LOOP:
                value = run_on(loop, step.fn, *step.args, timeout=step_timeout)
            elif step.where == INBOX:
                inbox.stop(*step.args)
            elif step.where == CALLER:
                step.fn()
            elif step.where == AFTER_LOOP:
                loop_ended = True
                _end_loop(loop, thread, timeout)
                if thread.is_alive():  # a wedged loop may still use its sockets: leak them rather than crash
                    log.warning("node %s: the I/O thread did not end; its ZeroMQ context is left open", engine.name)
                    continue
                if engine.store is not None:  # (first: handed over, the inbox thread may close it at once)
                    engine.store.close_later()
                if inbox.after_exit(step.fn):  # a handler outlived the stop: its thread closes up after it
                    log.warning("node %s: a handler did not return within the stop's timeout; the node's inbound "
                                "sockets, ZeroMQ context and store close when it does (what is left is counted then)",
                                engine.name)
                    continue
                step.fn()
            else:
                time.sleep(step.args[0])
        except Exception as exc:
            log.warning("node %s: %s failed while stopping: %s", engine.name, step.what, exc)
    if not loop_ended:
        _end_loop(loop, thread, timeout)


def _end_loop(loop: Reactor, thread: threading.Thread, timeout: float) -> None:
    loop.stop()
    if thread is not threading.current_thread():
        # (a moment at least: with ``timeout`` 0 the thread had seldom ended yet, and its
        # context was left open, as for a wedged loop)
        thread.join(max(timeout, LATE_LOOP_S))
