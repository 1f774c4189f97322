"""The outcomes of many calls, made one by one in item order with a bounded number
running, and answered in that order (sans I/O): the rules of `Node.request_many` and
`AsyncNode.request_many`, whose drivers differ only in how they wait.

Once a call failed, no more are made; the calls before it are still waited for, so that
the failure raised is the first *in item order*, not the first seen.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

__all__ = ["InOrder"]

Running = TypeVar("Running")


class InOrder(Generic[Running]):
    """Results by item index, the failures, and what runs (one owner: not thread-safe)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.results: list[Any] = []
        self.failures: dict[int, BaseException] = {}
        self.running: dict[int, Running] = {}
        self._first_failure = -1  # the least index that failed (-1: none)
        self._lowest = 0  # no call before this index still runs (it only moves on: `waiting`)

    def begin(self, running: Running) -> int:
        """A call is made, for the next item: its index."""
        index = len(self.results)
        self.results.append(None)
        self.running[index] = running
        return index

    def end(self, index: int, value: Any, error: BaseException | None) -> None:
        """The call of item ``index`` returned ``value``, or failed with ``error``."""
        del self.running[index]
        if error is not None:
            self.failures[index] = error
            if self._first_failure < 0 or index < self._first_failure:
                self._first_failure = index
        else:
            self.results[index] = value

    def room(self) -> bool:
        """Whether the next call may be made now (none failed, fewer than the window run)."""
        return not self.failures and len(self.running) < self.window

    def free(self) -> int:
        """How many more calls the window has room for."""
        return self.window - len(self.running)

    def waiting(self) -> bool:
        """Whether a call still running is worth waiting for: one before the first failure.
        (Constant time, amortised: it is asked after every reply.)"""
        if not self.running:
            return False
        if not self.failures:
            return True
        running = self.running
        while self._lowest not in running:
            self._lowest += 1
        return self._lowest < self._first_failure

    def outcome(self) -> list[Any]:
        """The results in item order; raises the failure of the first item that failed."""
        if self.failures:
            raise self.failures[self._first_failure]
        return self.results
