"""Blocking waits of a `Node`'s calling threads: for a condition (`wait_until`), for room
in a send queue (`wait_for_room`), and any step of a plan but an exchange (`carry_out`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import zmq

from ..._engine.api import OnLoop, advance
from ..._engine.engine import Engine
from ..._mesh.waiters import Room, Until
from ...errors import ZmqMeshError
from ..failures import closed_or_failed
from ..room import room_waits

__all__ = ["POLL_SLICE_S", "LATE_LOOP_S", "carry_out", "wait_until", "wait_for_room"]


POLL_SLICE_S = 0.05
"""The longest a calling thread (or the inbox's) blocks in one poll or future wait before it
looks again (whether the node stops, a deadline passed)."""
LATE_LOOP_S = 1.0
"""How long past a deadline a calling thread still waits for the loop to answer (a loop that
is late), and the least a stop waits for the loop's thread to end."""


def wait_until(engine: Engine, predicate: Callable[[], bool], deadline: float | None, what: str) -> None:
    """Block the calling thread (not the loop's) until ``predicate()`` holds on the loop
    (`Engine.watch`).

    The condition is checked at least once, also when the deadline has passed; None waits
    as long as the node runs. Raises `MeshTimeoutError` at the deadline, `NodeClosedError`
    if the node stops. Interrupted meanwhile (a signal's `KeyboardInterrupt`), it has the
    loop forget the wait (`Engine.forget_watch`) before the interruption goes on.
    """
    engine.ensure_running()
    if engine.on_loop_thread():
        raise ZmqMeshError("a blocking Node call was made on the node's own I/O thread")
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    # (the loop fails the waiter at the deadline; a moment more for a loop that is late. A
    # timeout past what a lock can wait, ~292 years, raised OverflowError: the loop's own
    # deadline alone then ends the wait)
    wait = None if timeout is None or timeout + LATE_LOOP_S >= threading.TIMEOUT_MAX else timeout + LATE_LOOP_S
    waiter: futures.Future[None] = futures.Future()  # (made here: an interruption in `watch` forgets it too)
    try:
        engine.watch(predicate, deadline, what, waiter)
        waiter.result(wait)
    except futures.TimeoutError:
        raise engine.timed_out(what, timeout) from None
    except Exception:  # (what the loop failed the wait with: it watches no more)
        raise
    except BaseException:  # interrupted (a signal's KeyboardInterrupt): the loop watches no more either
        engine.forget_watch(waiter)
        raise


def wait_for_room(engine: Engine, full: Callable[[], bool], deadline: float) -> bool:
    """Block while ``full()`` holds (back-pressure): True once there is room, False at
    ``deadline`` (`room_waits`). Raises `NodeClosedError` if the node stops."""
    space = engine.space
    waits = room_waits(engine, full, deadline)
    with space.condition:
        space.waiting += 1
        try:
            finished, step = advance(waits, None, None)
            while not finished:
                finished, step = advance(waits, space.condition.wait(step), None)
            return bool(step)
        finally:
            space.waiting -= 1


def carry_out(engine: Engine, step: Any) -> tuple[Any, BaseException | None]:
    """Carry out one step of a plan other than an exchange (`BlockingRunner.run` does
    those) on the calling thread: ``(value, None)``, or ``(None, the error)``."""
    try:
        if isinstance(step, Until):
            wait_until(engine, step.predicate, step.deadline, step.what)
        elif isinstance(step, Room):
            return wait_for_room(engine, step.full, step.deadline), None
        elif isinstance(step, OnLoop):
            return engine.call_on_loop(step.fn, *step.args), None
        else:
            raise TypeError(f"unknown step {step!r}")
        return None, None
    except zmq.ZMQError as exc:
        return None, closed_or_failed(engine, exc)
    except Exception as exc:
        return None, exc
