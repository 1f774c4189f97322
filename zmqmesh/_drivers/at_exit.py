"""The nodes still running when the interpreter exits, stopped then.

A script that pushes or publishes and returns without `stop()` lost what its node had not
sent yet, and said nothing: a warning of a node collected while running is a
`ResourceWarning`, which Python does not show by default, and at the interpreter's exit
nothing is collected (2,000 pushes of 30 KB from a script that returned at once: 0 to 74
delivered in 5 runs). Each node kind registers its running nodes here (`running`) with
the way to stop it; at exit every node still running is stopped, all at once, each
within its own bound, after a logged warning naming it. (Python 3.12.0 and 3.12.1 start no
thread at exit: there they are stopped one after another on the exiting thread, each
within what is left of its bound from the exit's start.)
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

__all__ = ["running", "stopped", "Stop", "STOP_TIMEOUT_S", "say_stopping", "say_still_stopping"]

STOP_TIMEOUT_S = 5.0
"""The stop's timeout for a node still running at the interpreter's exit (`stop`'s default)."""

log = logging.getLogger("zmqmesh.node")

Stop = Callable[[Any, "float | None"], None]
"""How a node is stopped at exit: ``stop(node, bound)``, where ``bound`` is None when a
thread of `at_exit`'s own waits for it, and otherwise the seconds it may wait for what it
hands to other threads, after which it raises ``TimeoutError``."""

_RUNNING: weakref.WeakKeyDictionary[Any, tuple[Stop, float]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_REGISTERED = [False]


def _forget_in_child() -> None:
    # (a forked child: its parent's nodes are not its own to stop, and a lock another thread
    # of the parent held at the fork would stay held for ever: the child's exit hung on it)
    global _RUNNING, _LOCK
    _RUNNING = weakref.WeakKeyDictionary()
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def running(node: Any, stop: Stop, bound_s: float) -> None:
    """``node`` runs: at the interpreter's exit, unless `stopped` before, ``stop(node, None)``
    is called on a thread of its own, and waited for up to ``bound_s`` (where no thread can
    be started then, ``stop(node, seconds left of bound_s)`` on the exiting thread). Holds
    no strong reference to the node (one collected meanwhile is forgotten). Never raises."""
    with _LOCK:
        _RUNNING[node] = (stop, bound_s)
        if not _REGISTERED[0]:
            # (registered late, so run early: before the handlers of modules imported
            # earlier, logging's shutdown among them, which these warnings need)
            atexit.register(_stop_running)
            _REGISTERED[0] = True


def stopped(node: Any) -> None:
    """``node`` was stopped: nothing to do for it at exit. Never raises."""
    with _LOCK:
        _RUNNING.pop(node, None)


def say_stopping(name: str, queued: int, how: str) -> None:
    """Log that node ``name`` still runs as the interpreter exits and is stopped now, with
    the ``queued`` messages it had not sent, and ``how`` to stop it in the program."""
    log.warning("node %s still runs as the interpreter exits: stopping it, so that what it queued goes out "
                "(%d message(s) not sent yet); stop it in the program (%s)", name, queued, how)


def say_still_stopping(name: str) -> None:
    """Log that node ``name``'s stop, begun in one of its handlers, is waited for at exit."""
    log.warning("node %s is still stopping as the interpreter exits (a stop begun in one of its handlers): "
                "waiting for it, so that what it queued goes out", name)


def _stop_running() -> None:
    with _LOCK:
        left = list(_RUNNING.items())
        _RUNNING.clear()
    if not left:
        return
    waits = []
    began = time.monotonic()
    for node, (stop, bound_s) in left:
        thread = threading.Thread(target=_stop_one, args=(node, stop, None, bound_s), name="zmqmesh-stop-at-exit",
                                  daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # (no new thread now: stopped here, one after another)
            log.warning("stopping node %s at exit on this thread (%s)", getattr(node, "name", node), exc)
            _stop_one(node, stop, max(0.0, began + bound_s - time.monotonic()), bound_s)
            continue
        waits.append((thread, bound_s, node))
    for thread, bound_s, node in waits:  # (all at once: each bound counts from the start, not from the last join)
        thread.join(max(0.0, began + bound_s - time.monotonic()))
        if thread.is_alive():
            _say_not_ended(node, bound_s)


def _stop_one(node: Any, stop: Stop, bound: float | None, bound_s: float) -> None:
    try:
        stop(node, bound)
    except (TimeoutError, FutureTimeoutError):  # (the two differ before Python 3.11)
        _say_not_ended(node, bound_s)
    except Exception as exc:
        log.warning("node %s: its stop at exit failed: %s", getattr(node, "name", node), exc)


def _say_not_ended(node: Any, bound_s: float) -> None:
    log.warning("node %s: its stop at exit did not end within %.1f s; exiting without it",
                getattr(node, "name", node), bound_s)
