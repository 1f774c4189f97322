"""The one stop plan both node kinds follow, as steps their drivers carry out.

The order: refuse new work, drain, withdraw the offers, let the handlers finish what
already arrived and answer it, say goodbye, close the sockets, terminate the context:

1. ``begin_stop`` (loop): refuse new work; None if the node was not running; then
   ``close_metrics`` (by the caller, needing no loop): stop serving metrics.
2. ``send_queued`` (loop), with a short pause between rounds: drain the send queues
   until they are empty or ``linger_s`` has passed (half of it, when keepers are there
   for durable queues: ``drain_deadline``); then ``hand_over`` the durable messages still
   stored to the keepers of their queues, within the whole deadline, and (after a drain
   that gave way) drain the rest until then.
3. ``withdraw_offers`` (loop): leave the service and queue groups, so that peers choose
   this node no more; then pauses of 25 ms, until one passes with nothing new received
   (what peers sent before they knew), within the same deadline.
4. ``close_outbound`` (loop): count what is left, fail waits and requests.
5. the inbox's stop: handle what already arrived, within ``timeout``, and send the
   replies. The goodbye comes after them: a caller that heard it first would give up
   the request whose reply was on its way.
6. ``say_goodbye`` (loop), then ``close_sockets`` (loop): close membership and the
   outbound sockets.
7. ``destroy_context`` (off the loop, once it stopped): terminate ZeroMQ.

A driver runs each step where it says, logs a step that fails and goes on with the
next (the step's result is then None), so a half-dead node still releases what it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from .engine import Engine

__all__ = ["StopStep", "stop_plan", "ON_LOOP", "CALLER", "INBOX", "AFTER_LOOP", "PAUSE_S"]

ON_LOOP = "on the loop"
CALLER = "by the caller"
INBOX = "the inbox"
AFTER_LOOP = "after the loop"
PAUSE = "pause"
PAUSE_S = 0.005
WITHDRAWN_PAUSE_S = 0.025  # after a withdrawal, while something arrived in the last one: see `stop_plan`


class StopStep(NamedTuple):
    """One step: ``what`` it does (for the log), ``where`` it runs, and the call."""

    what: str
    where: str
    fn: Callable[..., Any] | None
    args: tuple[Any, ...] = ()


def stop_plan(engine: Engine, timeout: float) -> Generator[StopStep, Any, None]:
    """The steps stopping ``engine``: draining takes at most ``min(linger_s, timeout)``, the
    handlers ``timeout``, and the rest about ``linger_s``."""
    deadline = yield StopStep("starting the stop", ON_LOOP, engine.begin_stop, (timeout,))
    if deadline is None:
        return
    yield StopStep("stopping the metrics server", CALLER, engine.close_metrics)
    drain_until = yield StopStep("choosing when draining gives way to keepers", ON_LOOP, engine.drain_deadline,
                                 (deadline,))
    yield from _drain(engine, drain_until or deadline)
    while (yield StopStep("handing durable messages to keepers", ON_LOOP, engine.hand_over, (deadline,))):
        yield StopStep("waiting for the keepers", PAUSE, None, (PAUSE_S,))
    if drain_until is not None and drain_until < deadline:  # (the drain gave way half-way: the rest drains on)
        yield from _drain(engine, deadline)
    if (yield StopStep("withdrawing the offers", ON_LOOP, engine.withdraw_offers)):
        # what peers sent before they took the withdrawal in is still coming: wait until a
        # pause passes with nothing new, within the draining deadline
        seen = None
        while time.monotonic() < deadline:
            yield StopStep("waiting for what peers sent before they knew", PAUSE, None, (WITHDRAWN_PAUSE_S,))
            arrived = yield StopStep("counting what arrived", ON_LOOP, engine.arrivals)
            if arrived == seen:
                break
            seen = arrived
    yield StopStep("closing the outbound queues", ON_LOOP, engine.close_outbound)
    yield StopStep("stopping the handlers", INBOX, None, (timeout,))
    yield StopStep("saying goodbye", ON_LOOP, engine.say_goodbye)
    yield StopStep("closing the sockets", ON_LOOP, engine.close_sockets, (deadline,))
    yield StopStep("terminating the ZeroMQ context", AFTER_LOOP, engine.destroy_context)


def _drain(engine: Engine, until: float) -> Generator[StopStep, Any, None]:
    """The steps sending what is queued, with a short pause between rounds, until it is
    all sent or ``until`` has passed."""
    while (yield StopStep("sending what is queued", ON_LOOP, engine.send_queued, (until,))):
        yield StopStep("waiting for the sockets to take more", PAUSE, None, (PAUSE_S,))
