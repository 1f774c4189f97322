"""`BlockingRunner`: carries out a plan's steps (and a request the quick way while all goes
well: `request`) by blocking the calling thread."""

from __future__ import annotations

import time
from typing import Any

import zmq

from ..._engine.api import Plan, advance
from ..._engine.engine import Engine
from ..._mesh.directory import Provider
from ..._patterns.reqrep import Calling, Exchange, QuickRequest
from ..._wire import frames as wire
from ..failures import closed_or_failed
from .requests import ThreadRequester, ThreadRequesters
from .waits import carry_out

__all__ = ["BlockingRunner"]


class BlockingRunner:
    """Runs plans (and requests that go the quick way: `request`) on the calling thread
    (never the loop's), blocking where they wait."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, call: Plan, value: Any = None, error: BaseException | None = None,
            requester: ThreadRequester | None = None) -> Any:
        """Carry out the plan ``call`` and return its result; raises what it raises. A raw
        ZeroMQ error becomes `ZmqMeshError` (`NodeClosedError` once the node stopped). The
        calling thread's requester carries out its exchanges and counts what they do in its
        tally. Interrupted (a signal's `KeyboardInterrupt`), it closes the plan, which lets
        go of what it holds. ``value``, ``error``: the outcome of the step it took already
        (`request`)."""
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
                value, error = self._exchange_outcome(requester, *step)
            except BaseException:  # interrupted (a signal's KeyboardInterrupt): the plan lets go of what it holds
                call.close()
                raise

    def request(self, calling: Calling, body: bytes, seconds: float, requester: ThreadRequester | None = None) -> Any:
        """Carry out a call that may go the quick way (`Calling`, `QuickRequest`'s way), of
        the encoded ``body``, within ``seconds`` from now, and return its result; raises
        what `run` raises. The calling thread's requester (``requester``, if the caller
        has it) sends it to the provider `Calling.choose` gives and waits for the reply
        itself: no `QuickRequest` and no plan are made unless the quick way ends (no
        provider it may go to, a reply not OK, a failure), and then the call's plan goes on
        from there, with that outcome."""
        started = time.monotonic()
        deadline = started + seconds
        if requester is None:
            requester = self._requester()
        tally = requester.tally
        provider, sent = calling.choose(body, tally)
        value: Any = None
        error: BaseException | None = None
        if sent:
            assert provider is not None  # (sent: to the one chosen)
            value, error = self._exchange_outcome(requester, provider, calling.service, calling.service_b, body,
                                                  deadline, None, True)
            if error is None and value[0] == wire.STATUS_OK:
                return calling.result(value[1], tally, started)
        return self.run(QuickRequest(calling, body, deadline, started, provider, sent).plan(), value, error, requester)

    def _exchange_outcome(self, requester: ThreadRequester, provider: Provider, service: str, service_b: bytes,
                          body: bytes, deadline: float, meta: bytes | None, compact: bool
                          ) -> tuple[Any, BaseException | None]:
        """Carry out an exchange (an `Exchange`'s fields, each its own parameter: no tuple
        packed and unpacked a call) on the calling thread's ``requester``: ``(reply,
        None)``, or ``(None, the error)``."""
        try:
            return requester.exchange(provider, service, service_b, body, deadline, meta, compact), None
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
