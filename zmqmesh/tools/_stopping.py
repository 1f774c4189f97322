"""How the long-running commands stop: SIGINT, SIGTERM and SIGHUP raise a flag that every
wait of the command looks at (`SignalStop`, `until`, `sliced`), never an exception raised by
the handler. An exception raised while a finalizer runs (a ZeroMQ frame's or socket's, a
garbage collection's) is printed as "Exception ignored in ..." and lost, and the command
went on; raised in the middle of a node's start or stop, it cut that short.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from zmqmesh import MeshTimeoutError, StopFlag

__all__ = ["LOOK_S", "STOP_SIGNALS", "SignalStop", "Stopped", "ignore_stop_signals", "sliced", "until"]

STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                                      if hasattr(signal, name))
"""What stops a long-running command: Ctrl-C, SIGTERM, and the hangup of its terminal."""

LOOK_S = 0.1
"""How often a wait that cannot sleep on the flag itself looks whether it was raised."""


class Stopped(Exception):
    """A signal raised the flag while a command waited (`until`, `sliced`)."""


class SignalStop:
    """SIGINT, SIGTERM and SIGHUP raise ``flag`` (a new `StopFlag` unless given) while the
    handlers are in place (`take` to `give_back`, or a ``with`` block), and which came is
    remembered: `interrupted` tells a Ctrl-C (status 130) from a SIGTERM or a hangup.
    Outside the main thread nothing is put in place (signals go to the main thread's
    handlers only)."""

    def __init__(self, flag: StopFlag | None = None) -> None:
        self.flag = flag if flag is not None else StopFlag()
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @property
    def interrupted(self) -> bool:
        """Whether a Ctrl-C (SIGINT) came."""
        return signal.SIGINT in self.received

    def take(self) -> SignalStop:
        """Put the handlers in place (from the main thread; elsewhere, none); returns self.
        A signal the process was started ignoring stays ignored (``nohup`` ignores SIGHUP, a
        shell script's background job SIGINT: the command outlives its terminal, or the
        script's Ctrl-C, as asked)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig not in self._previous and signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._raise)
        return self

    def give_back(self) -> None:
        """Put back the handlers `take` replaced. Never raises."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> SignalStop:
        return self.take()

    def __exit__(self, *exc: object) -> None:
        self.give_back()

    def _raise(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        self.flag.set()


def ignore_stop_signals() -> None:
    """The process's status is decided and it only exits now: SIGINT, SIGTERM and SIGHUP
    are ignored from here on (from the main thread; elsewhere, nothing changes). Past
    Python's own end a handler is the system's default again, and a late signal ended
    the process with another status (Ctrl-C: killed by SIGINT, not 130)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def until(stop: StopFlag, done: Callable[[], bool], timeout: float, every: float | None = None) -> bool:
    """Wait until ``done()`` holds (True) or ``timeout`` seconds passed (False), looking
    every ``every`` seconds (`LOOK_S` by default: less where the command waits for
    ``done`` alone, as soon as it holds). Raises `Stopped` once ``stop`` is raised."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if stop.wait(min(LOOK_S if every is None else every, left)):
            raise Stopped
    return True


def sliced(stop: StopFlag, wait: Callable[[float], Any], timeout: float) -> Any:
    """What ``wait(seconds)`` returns, called with slices of at most `LOOK_S` until it
    does not time out, within ``timeout`` seconds. Raises `Stopped` once ``stop`` is
    raised, `MeshTimeoutError` when the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        if stop.is_set():
            raise Stopped
        left = deadline - time.monotonic()
        try:
            return wait(max(0.0, min(LOOK_S, left)))
        except MeshTimeoutError:
            if left <= LOOK_S:
                raise
