"""`BlockingRunner`: carries out a plan's steps (and a request the quick way while all goes
well) by blocking the calling thread."""

from __future__ import annotations

from typing import Any

import zmq

from ..._engine.api import Plan, advance
from ..._engine.engine import Engine
from ..._patterns.reqrep import Exchange, QuickRequest
from ..._wire import frames as wire
from ..failures import closed_or_failed
from .requests import ThreadRequester, ThreadRequesters
from .waits import carry_out

__all__ = ["BlockingRunner"]


class BlockingRunner:
    """Runs plans (and requests that go the quick way, `QuickRequest`) on the calling
    thread (never the loop's), blocking where they wait."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, call: Plan | QuickRequest) -> Any:
        """Carry out ``call``, a plan or a request's `QuickRequest` (`advance_call`), and
        return its result; raises what it raises. A raw ZeroMQ error becomes `ZmqMeshError`
        (`NodeClosedError` once the node stopped). The calling thread's requester carries
        out its exchanges and counts what they do in its tally. Interrupted (a signal's
        `KeyboardInterrupt`), it closes the plan, which lets go of what it holds."""
        value: Any = None
        error: BaseException | None = None
        requester = None
        if isinstance(call, QuickRequest):
            # its quick way, as `advance_call` takes it, spared the steps: the exchange, and
            # the result of an OK reply; otherwise the plan goes on from there, with the outcome
            quick, requester = call, self._requester()
            step = quick.begin(requester.tally)
            if step is not None:
                value, error = self._exchange_outcome(requester, step)
                if error is None and value[0] == wire.STATUS_OK:  # (`QuickRequest.advance`'s way, spared its call)
                    return quick.result(value[1], requester.tally)
            call = quick.plan()
        while True:
            finished, step = advance(call, value, error)
            if finished:
                return step
            try:
                if type(step) is not Exchange:
                    value, error = self.carry_out(step)
                    continue
                if requester is None:
                    requester = self._requester()
                value, error = self._exchange_outcome(requester, step)
            except BaseException:  # interrupted (a signal's KeyboardInterrupt): the plan lets go of what it holds
                call.close()
                raise

    def _exchange_outcome(self, requester: ThreadRequester, step: Exchange) -> tuple[Any, BaseException | None]:
        """Carry out an exchange on the calling thread's ``requester``: ``(reply, None)``,
        or ``(None, the error)``."""
        try:
            return requester.exchange(step), None
        except zmq.ZMQError as exc:
            return None, closed_or_failed(self.engine, exc)
        except Exception as exc:
            return None, exc

    def _requester(self) -> ThreadRequester:
        requesters = self.engine.requests
        assert isinstance(requesters, ThreadRequesters), "the node is not started"
        return requesters.current()

    def carry_out(self, step: Any) -> tuple[Any, BaseException | None]:
        """Carry out one step of a plan other than an exchange (`run` does those):
        ``(value, None)``, or ``(None, the error)`` (`waits.carry_out`)."""
        return carry_out(self.engine, step)
