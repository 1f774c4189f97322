"""Futures of the replies that a loop's gathered requests wait for (`ReplyFuture`), whose
awaiting tasks are woken together: one callback of the loop for all the replies read in a
pass, not one each (`Wakes`).

An asyncio future schedules a callback of the loop for each task that awaits it (a
handle made, queued and run: some 5,000 instructions a reply, with 64 coroutines each
awaiting its request). A `ReplyFuture` is an asyncio future (its result, exception and
cancellation are the base class's) whose awaiting task is woken by `Wakes`: the tasks
of every reply set since the last pass of the loop run in one callback, in the order
their replies came, and once they all ran (each until it awaits again), `Wakes` tells
its owner (``after``): the requests those tasks made meanwhile were gathered, to go out
together then (`waking`). (A request sent alone, at once, waits on a plain asyncio
future: the waking of a lone task, through the task's own path, costs less.)
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

__all__ = ["ReplyFuture", "Wakes"]

_Callback = Callable[[Any], object]

_set_result = asyncio.Future.set_result
_set_exception = asyncio.Future.set_exception
_cancel = asyncio.Future.cancel


class ReplyFuture(asyncio.Future):  # type: ignore[type-arg]  # (its result is what the requester sets)
    """An asyncio future whose done callbacks (the awaiting task's wake-up) run through its
    `Wakes`, together with those of the other replies of the pass. Made by `Wakes.future`."""

    __slots__ = ("wakes", "woken")

    wakes: Wakes
    woken: list[tuple[_Callback, contextvars.Context]] | None  # (its done callbacks, until it is done)

    def add_done_callback(self, fn: _Callback, *, context: contextvars.Context | None = None) -> None:
        """Call ``fn(self)`` once the future is done (in the next pass of the loop, if it is)."""
        if context is None:
            context = contextvars.copy_context()
        if self.done():  # (as the base class does)
            self.get_loop().call_soon(fn, self, context=context)
        elif self.woken is None:
            self.woken = [(fn, context)]
        else:
            self.woken.append((fn, context))

    def remove_done_callback(self, fn: _Callback) -> int:
        """Forget every ``fn`` added by `add_done_callback`, not called yet; how many."""
        woken = self.woken or []
        kept = [entry for entry in woken if entry[0] != fn]
        self.woken = kept or None
        return len(woken) - len(kept)

    def set_result(self, result: Any) -> None:
        """Mark it done with ``result``, its callbacks to run in the next wake-up pass.
        Raises `asyncio.InvalidStateError` when it is done already."""
        _set_result(self, result)
        if self.woken is not None:  # (a task awaits it: `Wakes.add`, inline)
            due = self.wakes.due
            if not due:
                self.wakes.schedule()
            due.append(self)

    def set_exception(self, exception: type | BaseException) -> None:
        """Mark it failed with ``exception``, its callbacks to run in the next wake-up pass.
        Raises `asyncio.InvalidStateError` when it is done already."""
        _set_exception(self, exception)
        if self.woken is not None:
            self.wakes.add(self)

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel it, its callbacks to run in the next wake-up pass; False when it is done already."""
        if not _cancel(self, msg):
            return False
        if self.woken is not None:
            self.wakes.add(self)
        return True


class Wakes:
    """The futures (`ReplyFuture`) done since the last wake-up pass whose callbacks wait to run:
    they run in one callback of ``loop``, in the order the futures were done; then, if
    they were several, ``after()``, and while they run `waking` is True."""

    __slots__ = ("loop", "after", "waking", "due")

    def __init__(self, loop: asyncio.AbstractEventLoop, after: Callable[[], None]) -> None:
        self.loop = loop
        self.after = after
        self.waking = False
        """Whether the tasks of a pass are being woken, more than one (a request made now
        goes with the others those tasks make: ``after``)."""
        self.due: list[ReplyFuture] = []
        """The futures whose callbacks run in the next pass (`add`; none: no pass scheduled)."""

    def future(self) -> ReplyFuture:
        """A new future of this loop, its awaiting task woken by this."""
        future = ReplyFuture(loop=self.loop)
        future.wakes = self
        future.woken = None
        return future

    def add(self, future: ReplyFuture) -> None:
        """Run the callbacks of ``future`` (done) in the next wake-up pass."""
        if not self.due:
            self.schedule()
        self.due.append(future)

    def schedule(self) -> None:
        """Make the next wake-up pass run in the loop's next pass (`due` is empty: none is scheduled)."""
        self.loop.call_soon(self._run)

    def _run(self) -> None:
        due, self.due = self.due, []
        waking = self.waking = len(due) > 1  # (a lone task's request goes as it makes it)
        future: ReplyFuture | None = None
        try:
            for future in due:
                woken, future.woken = future.woken, None
                for fn, context in woken or ():
                    try:
                        context.run(fn, future)
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:  # (as the loop's handles report what their callback raises)
                        self.loop.call_exception_handler({
                            "message": f"Exception in callback {fn!r}", "exception": exc, "future": future})
        except BaseException:  # (interrupted: the futures after this one wake in the next pass, before any added since)
            rest = due[0 if future is None else due.index(future) + 1:]
            if rest:
                if not self.due:
                    self.schedule()
                self.due[:0] = rest
            if waking:
                self.loop.call_soon(self.after)
            raise
        finally:
            self.waking = False
        if waking:
            self.after()
